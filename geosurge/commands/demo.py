"""``geosurge demo``: README command 1, the toolkit on a model that knows where things are.

The reference model (``edge`` trained on downward views of NASA Blue Marble; assembled from its shipped weights in
seconds, or reused from the cache, or trained when the shipped weights do not match the recipe) -> FP32 bundle ->
on-device verify -> workstation parity on held-out views -> the torch-free runtime locates held-out views (true
place, prediction, error in km) -> FP16 and INT8 bundles -> accuracy in km of FP32 / FP16 / INT8 on held-out views of
both sources beside the two baselines (``geosurge.api.evaluate``: table, JSON, two PNGs) -> the ``geosurge
benchmark`` short form (``geosurge.api.benchmark``). Exit 1 when one of the demo's gates fails: verify, parity of the
FP32 bundle, or the trained model not beating both baselines on the held-out views. FP16 / INT8 parity is reported
(a quantized bundle failing it is a measured outcome: its own export exits 1).
"""
from __future__ import annotations

import time

WHAT_IT_IS = """\
WHAT THIS MODEL IS: the reference GeoSURGE model (`edge`: EfficientNet-Lite0 + segmentation fusion + 512-d S2-cell
  embeddings) trained here to locate DOWNWARD VIEWS OF THE EARTH at ~2.5-6 km per pixel (views 600-1,600 km wide,
  NASA Blue Marble), the task of offline field teams and GPS-denied drones. It is NOT a street-photo model: a
  holiday photo gives it nothing to go on. To locate ground photos, bring a photo model: point the `paper` config
  at your local CLIP / SegFormer (or OneFormer) folders (docs/model.md, "User weights"; nothing downloads), then
    geosurge train --init runs/my-start --manifest photos.csv -o runs/mine   (your geotagged photos: path,lat,lon)
    geosurge distill --teacher runs/mine/best --student edge --images photos/ -o runs/student
    geosurge demo --checkpoint runs/student/best --heldout my_labelled.csv"""


def register(sub) -> None:
    from ..models.config import CONFIGS

    p = sub.add_parser("demo", help="the toolkit end to end on the reference model (README command 1)")
    p.add_argument("-o", "--output", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--cache", default="~/.cache/geosurge", help="where the reference model is kept (default "
                                                                "~/.cache/geosurge)")
    p.add_argument("--checkpoint", help="your own trained checkpoint instead of the reference model")
    p.add_argument("--heldout", metavar="CSV", help="labelled images (path,lat,lon[,source]) for the accuracy "
                                                    "table (default: the reference model's held-out views)")
    p.add_argument("--model", default="edge", choices=list(CONFIGS), help="the reference model's config "
                                                                          "(default edge: the shipped one)")
    p.add_argument("--views", type=int, default=150, help="held-out views per source in the accuracy table "
                                                          "(default 150)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-quant", action="store_true", help="skip the FP16 / INT8 bundles")
    p.add_argument("--calib-size", type=int, default=128, help="calibration views for the INT8 bundle (views "
                                                               "that are not held out)")
    p.add_argument("--no-benchmark", action="store_true", help="skip the `geosurge benchmark` short form")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from pathlib import Path

    import torch

    from .. import api
    from ..geo import build_default_hierarchy
    from ..parity import format_parity
    from ..evaluation.evaluate import PERCENT_DECIMALS
    from ..report import format_table, write_json
    from .cells import print_info

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    t_all = time.perf_counter()
    steps = {}
    print("== geosurge demo ==")
    print(WHAT_IT_IS if not args.checkpoint else f"model: your checkpoint {args.checkpoint}")

    print("\n[1/9] cell hierarchy from the real MP-16 photo density (100K sample shipped in geoclip)")
    t0 = time.perf_counter()
    h = build_default_hierarchy()
    print_info(h.info(), False, title=f"      {len(h):,} cells in {h.num_levels} levels, built in "
                                      f"{time.perf_counter() - t0:.2f}s")
    steps["hierarchy_s"] = time.perf_counter() - t0

    indent = lambda m: print("      " + m)  # noqa: E731
    t0 = time.perf_counter()
    if args.checkpoint:
        print(f"\n[2/9] your checkpoint {args.checkpoint}")
        checkpoint, ref = Path(args.checkpoint), None
        if not args.heldout:
            print("      (no --heldout: predictions are shown on the sample photos, and there is no accuracy table)")
    else:
        from ..training.reference import ReferenceRecipe

        print("\n[2/9] the reference model (shipped weights assembled over the packaged backbone and GeoCLIP cell "
              "init; cached afterwards)")
        ref = api.reference(recipe=ReferenceRecipe(config=args.model), cache_dir=args.cache, threads=args.threads,
                            progress=True, log=indent)
        checkpoint = ref.checkpoint
        measured = {(r["model"], r["views"]): r for r in ref.report["rows"]}
        ho = measured.get(("reference model", "heldout"), {})
        print(f"      {checkpoint}\n      when trained: {ho.get('acc@750km', float('nan')):.1f}% of held-out views "
              f"within 750 km, {ho.get('acc@2500km', float('nan')):.1f}% within 2,500 km, median "
              f"{ho.get('median_km', float('nan')):,.0f} km (report: {checkpoint.parent / 'report.json'})")
    steps["model_s"] = time.perf_counter() - t0

    views = demo_views(args, out, ref)
    golden = [it.path for it in views.golden]
    model, source = api.load_model(checkpoint)
    print(f"      {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    print("\n[3/9] export the FP32 ONNX bundle" + ("" if views.manifest is None else
                                                  f", its probabilities calibrated on the {views.what}"))
    t0 = time.perf_counter()
    bundle = api.export(model, out / "bundle-fp32", source=source, golden=golden, threads=args.threads,
                        uncertainty_images=views.manifest, log=indent)
    steps["export_fp32_s"] = time.perf_counter() - t0

    print("\n[4/9] on-device check: geosurge-run verify (checksums + golden replay)")
    ver = api.verify(bundle, threads=args.threads)
    print(format_parity(ver["metrics"], ver["gates"], title="      golden replay vs FP32 torch reference"))
    print(f"      verify: {'PASS' if ver['passed'] else 'FAIL'}")

    print(f"\n[5/9] workstation parity: FP32 torch vs the bundle on {len(views.parity)} {views.what}")
    par = bundle_parity(bundle, views.parity, checkpoint, args.threads, log=indent)
    print(format_parity(par["metrics"], par["gates"], title=f"      {par['metrics']['n']} images"))
    print(f"      parity: {'PASS' if par['passed'] else 'FAIL'}")

    print(f"\n[6/9] the torch-free runtime locates {views.what}")
    rows = locate(bundle, views.shown, args.threads)
    print(format_table(rows, decimals=LOCATE_DECIMALS))
    u = bundle.manifest.uncertainty
    print("      radius_km: the radius holding 68% of the probability" + (
        f"; calibrated (temperature {u.temperature:.3g}), it covered the truth on {u.coverage:.0%} of {u.images} "
        f"{views.what} (uncalibrated: {u.coverage_before:.0%}; docs/export.md)" if u is not None else
        " (uncalibrated: give --heldout to calibrate it)"))

    t0 = time.perf_counter()
    bundles = {"fp32": bundle}
    quant = []
    if not args.no_quant:
        what = ("augmented sample photos" if args.checkpoint else
                "other Blue Marble views (seed 123), none of the held-out ones; drawn like the training views, so "
                "the export's check accuracy on them is not held-out accuracy: the km table below is")
        print(f"\n[7/9] FP16, and INT8 with the precision search (calibration: {args.calib_size} {what})")
        calib = api.views(out / "calib", count=args.calib_size, seed=123) if not args.checkpoint else None
        for precision, search in (("fp16", None), ("int8", "auto")):
            bundles[precision] = api.export(model, out / f"bundle-{precision}", source=source, golden=golden,
                                            precision=precision, precision_search=search, calibration=calib,
                                            calib_size=args.calib_size, threads=args.threads, log=indent)
        quant = precision_rows(bundles, views.parity, checkpoint, args.threads, measured={"fp32": par})
        print(format_table(quant, title=f"\nFP32 vs FP16 vs INT8: size, parity vs FP32 torch on {len(views.parity)} "
                                        f"{views.what} (speed: step 9)"))
    steps["quantized_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    acc = None
    if views.manifest is not None:
        print(f"\n[8/9] accuracy in km on {views.what} ({views.manifest}), beside two baselines")
        acc = accuracy(args, views, bundles, model, out / "eval")
        print(format_table(acc["rows"], ["model", "source", "n", "acc@25km", "acc@200km", "acc@750km", "acc@2500km",
                                         "median_km"], title="      % of views within each distance",
                           decimals=PERCENT_DECIMALS))
        if views.second_source:
            print(f"      {views.second_source}: the same places from another mosaic the model never saw (other "
                  f"colours and shading): a test of appearance shift, expected far below {views.first_source}")
        if acc["drift_vs_fp32"]:
            print(format_table(acc["drift_vs_fp32"], ["bundle", "n", "same_point", "drift_median_km", "drift_p95_km",
                                                      "delta_acc@750km", "delta_acc@2500km"],
                               decimals={"delta_acc@750km": 1, "delta_acc@2500km": 1}, title="      FP16 / INT8 vs the FP32 bundle on the same views (task-level drift)"))
        print(f"      plots: {', '.join(acc['plots'].values())}")
        print("      " + acc["gate"]["line"])
    steps["accuracy_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bench = None
    if not args.no_benchmark:
        print(f"\n[9/9] geosurge benchmark --quick (short form; every installed backend beside torch eager FP32, "
              f"{args.threads} threads; `geosurge benchmark` without --quick for figures)")
        bench = benchmark(bundles, out, args.threads, log=indent)
        for text in bench["short"]:
            print(text)
    steps["benchmark_s"] = time.perf_counter() - t0

    quant_failed = [r["precision"] for r in quant if r["parity"] != "PASS"]
    quant_ok = not quant_failed
    summary = {"model": {"checkpoint": str(checkpoint), "reference": None if ref is None else {
                   "origin": ref.report.get("origin"), "recipe": ref.report["recipe"],
                   "report": str(checkpoint.parent / "report.json"), "measured_when_trained": ref.report["rows"]}},
               "bundle": str(bundle), "bundle_mb": bundle_mb(bundle), "verify": ver["passed"],
               "parity": par["passed"], "parity_metrics": par["metrics"], "predictions": rows,
               "precisions": quant, "accuracy": acc,
               "benchmark": None if bench is None else {"json": bench["json"], "png": bench["png"],
                                                        "summary": bench["report"]["summary"]},
               "steps_s": steps, "threads": args.threads, "seconds": time.perf_counter() - t_all}
    write_json(out / "demo.json", summary)
    acc_ok = acc is None or acc["gate"]["passed"]
    verdict = [f"verify {'PASS' if ver['passed'] else 'FAIL'}", f"parity {'PASS' if par['passed'] else 'FAIL'}"]
    if quant:
        verdict.append("FP16/INT8 parity " + ("PASS" if quant_ok else
                                              f"FAIL for {', '.join(quant_failed)}: that export exits 1 and "
                                              "is not for deployment on this CPU (the gate doing its job)"))
    if acc is not None:
        verdict.append(f"trained beats baselines {'PASS' if acc_ok else 'FAIL'}")
    print(f"\ndone in {summary['seconds']:.0f}s: {', '.join(verdict)}; report {out / 'demo.json'}")
    # the demo's own gates: the deployed FP32 bundle verifies and matches torch, the trained model beats both
    # baselines. A quantized bundle that fails parity is a measured outcome the demo reports (its export exits 1)
    return 0 if ver["passed"] and par["passed"] and acc_ok else 1


class DemoViews:
    """The images the demo shows: ``golden`` (probes stored in the bundle), ``parity`` (paths), ``shown`` (items
    located in step 6), ``manifest`` (the accuracy table's rows; None: no table), ``what`` (in words)."""

    def __init__(self, golden, parity, shown, manifest, what, first_source, second_source=None):
        self.golden, self.parity, self.shown = golden, parity, shown
        self.manifest, self.what, self.first_source = manifest, what, first_source
        #: the reference model's appearance-shift source(s) (views of the same places from another mosaic)
        self.second_source = second_source


def demo_views(args, out, ref) -> DemoViews:
    """The held-out views (``args.views`` per source, in manifest order) as a manifest in ``out``; with a user
    checkpoint and no ``--heldout``, the sample photos (no ground truth)."""
    import csv
    import io

    from ..evaluation import EvalItem, read_items
    from ..fsutil import atomic_write_bytes
    from ..samples import copy_samples

    source = args.heldout or (ref.heldout_manifest if ref is not None else None)
    if source is None:
        photos = copy_samples(out / "samples")
        items = [EvalItem(p, None, None) for p in photos]
        return DemoViews(items[:6], photos, items[:8], None, "sample photos (no ground truth)", None)
    items, _ = read_items(source)
    by_source: dict[str, list] = {}
    for it in items:
        by_source.setdefault(it.source, []).append(it)
    chosen = [it for group in by_source.values() for it in group[:args.views]]
    lines = [("path", "lat", "lon", "source")] + [(str(it.path.resolve()), it.lat, it.lon, it.source) for it in chosen]
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    manifest = out / "heldout.csv"
    atomic_write_bytes(manifest, buf.getvalue().encode())
    groups = list(by_source.values())
    shown = [it for g in groups for it in g[:4]]
    golden = [it for g in groups for it in g[4:7]]
    parity = [it.path for g in groups for it in g[:24]]
    what = ("held-out views" if args.heldout is None else "labelled images") + f" ({', '.join(by_source)})"
    second = ", ".join(list(by_source)[1:]) if args.heldout is None and len(by_source) > 1 else None
    return DemoViews(golden, parity, shown, manifest, what, next(iter(by_source)), second)


def bundle_parity(bundle, images, checkpoint, threads: int, log=lambda m: None) -> dict:
    """The demo's one parity call (steps 5 and 7): FP32 torch vs ``bundle`` on ``images`` under the bundle's gates
    (``geosurge.api.parity``). Returns its report (``passed``, ``metrics``, ``gates``)."""
    from .. import api

    return api.parity(bundle, images, checkpoint=checkpoint, threads=threads, log=log)


#: step 6's table: degrees to 2 decimals (about 1 km, far finer than a cell), km whole
LOCATE_DECIMALS = {"true lat": 2, "true lon": 2, "pred lat": 2, "pred lon": 2, "error_km": 0, "radius_km": 0}


def locate(bundle, shown, threads: int) -> list[dict]:
    """Step 6: the runtime's prediction for each shown item, with its true place and the error in km when known."""
    from ..geo import haversine_km
    from ..runtime import Localizer

    rows = []
    with Localizer(bundle, threads=threads) as loc:
        for it in shown:
            pred = loc.locate(it.path, top_k=3)
            place = pred["place"] or {}
            row = {"view": f"{it.path.parent.name}/{it.path.name}"}
            if it.lat is not None:
                row.update({"true lat": it.lat, "true lon": it.lon})
            row.update({"pred lat": pred["lat"], "pred lon": pred["lon"]})
            if it.lat is not None:
                row["error_km"] = float(haversine_km(it.lat, it.lon, pred["lat"], pred["lon"]))
            row.update({"confidence": pred["confidence"], "radius_km": pred["uncertainty_km"],
                        "nearest place": f"{place.get('name')}, {place.get('country')}"})
            rows.append(row)
    return rows


def bundle_mb(bundle) -> float:
    """The bundle's size (every checksummed file and the manifest), MB."""
    from ..manifest import MANIFEST_FILE

    return (sum(f.bytes for f in bundle.manifest.files.values()) + (bundle / MANIFEST_FILE).stat().st_size) / 1e6


def precision_rows(bundles: dict, images, checkpoint, threads: int, measured: dict | None = None) -> list[dict]:
    """FP32 / FP16 / INT8 side by side: model and bundle MB, parity vs FP32 torch in km (:func:`bundle_parity`;
    cosine a diagnostic), the gates that failed. ``measured``: parity reports already taken on ``images`` (the FP32
    bundle's from step 5), not measured again."""
    rows = []
    for k, b in bundles.items():
        par = (measured or {}).get(k) or bundle_parity(b, images, checkpoint, threads)
        m = par["metrics"]
        failed = [g["gate"] for g in par["gates"] if g["pass"] == "FAIL"]
        rows.append({"precision": k, "model_mb": b.manifest.file_record("model").bytes / 1e6,
                     "bundle_mb": bundle_mb(b), "drift_median_km": m["median_drift_km"],
                     "drift_p95_km": m["p95_drift_km"], "agree_confident": m["top1_agreement_confident"],
                     "cos_mean": m["cosine_mean"], "parity": "PASS" if par["passed"] else "FAIL",
                     "failed_gates": ", ".join(failed)})
    return rows


def accuracy(args, views: DemoViews, bundles: dict, model, out) -> dict:
    """Step 8: every bundle and the two baselines (``geosurge.evaluation.baselines``: the prior's most likely cell;
    the untrained model: ``model``'s config and hierarchy, seed 0, torch) on the held-out manifest, side by side:
    acc@km and median km per source, the drift of FP16 / INT8 vs FP32 in km; ``eval.json``, ``error_cdf.png`` and
    ``world_map.png`` in ``out``."""
    from .. import api
    from ..evaluation.baselines import PRIOR_LABEL, UNTRAINED_LABEL, baselines, drift_km

    labels = [f"{k.upper()} bundle" for k in bundles]
    rep = api.evaluate([*baselines(model.config, model.hierarchy), *bundles.values()], views.manifest, output=out,
                       labels=[PRIOR_LABEL, UNTRAINED_LABEL, *labels], threads=args.threads, log=None)
    several = len(rep.results[0].sources()) > 1
    rows = [r for r in rep.rows() if not several or r["source"] != "all"]
    fp32 = rep.results[2]
    drift = [{"bundle": label, **drift_km(fp32, r)} for label, r in zip(labels[1:], rep.results[3:])]
    return {"rows": rows, "baselines": [PRIOR_LABEL, UNTRAINED_LABEL], "table": rep.table, "plots": rep.plots,
            "eval_json": str(out / "eval.json"), "inputs": rep.inputs(), "drift_vs_fp32": drift,
            "gate": beats_baselines(rows, labels[0], [PRIOR_LABEL, UNTRAINED_LABEL], views.first_source)}


def beats_baselines(rows: list[dict], model: str, baselines: list[str], source: str) -> dict:
    """The demo's accuracy gate on ``source`` (the held-out views of the training raster): ``model`` puts more views
    within 750 km and within 2,500 km than every baseline, and its median error in km is lower than theirs.
    Returns ``passed``, the rows compared and a one-line verdict."""
    by = {r["model"]: r for r in rows if r["source"] in (source, "all")}
    if model not in by or any(b not in by for b in baselines):
        return {"passed": False, "line": f"accuracy gate: no rows for {model} and the baselines on {source}"}
    m, base = by[model], [by[b] for b in baselines]
    passed = all(m["acc@750km"] > b["acc@750km"] and m["acc@2500km"] > b["acc@2500km"]
                 and m["median_km"] < b["median_km"] for b in base)
    best = max(base, key=lambda b: b["acc@750km"])
    line = (f"held-out {source}: the trained model puts {m['acc@750km']:.1f}% of views within 750 km and "
            f"{m['acc@2500km']:.1f}% within 2,500 km (median {m['median_km']:,.0f} km); the best baseline "
            f"{best['acc@750km']:.1f}% / {max(b['acc@2500km'] for b in base):.1f}% (median "
            f"{min(b['median_km'] for b in base):,.0f} km): {'PASS' if passed else 'FAIL'}")
    return {"passed": passed, "model": m, "baselines": base, "line": line}


def benchmark(bundles: dict, out, threads: int, log) -> dict:
    """Step 9: ``geosurge benchmark --quick`` on the demo's bundles (every installed backend, torch eager FP32 as the
    anchor; torch.compile left to the full command, it compiles for minutes) -> the short form of each bundle;
    ``benchmark.json`` and ``benchmark.png`` in ``out``."""
    from .. import api
    from ..errors import GeosurgeError
    from ..export.benchmark import short_form

    rep = api.benchmark([b.root for b in bundles.values()], quick=True, anchors=("eager",), pools=("threads",),
                        threads=threads, json=out / "benchmark.json", png=out / "benchmark.png", log=log)
    short = []
    for b in bundles.values():
        try:
            short.append(short_form(rep, b.root))
        except GeosurgeError as e:  # no installed backend ran this bundle: say so, the others still print
            short.append(f"      {b.root}: {e}")
    return {"report": rep, "short": short, "json": str(out / "benchmark.json"), "png": rep.get("png")}
