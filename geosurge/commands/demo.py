"""``geosurge demo``: the main job on embedded defaults (README command 1), through the Python API.

The ``edge`` model from real pretrained parts (EfficientNet-Lite0 ImageNet weights, cell embeddings from GeoCLIP's
location encoder over the default hierarchy) -> FP32 ONNX bundle -> on-device verify -> workstation parity on real
photos -> the torch-free runtime locates the sample photos -> timings -> FP16 and INT8 bundles side by side.
"""
from __future__ import annotations

import time


def register(sub) -> None:
    from ..models.config import CONFIGS

    p = sub.add_parser("demo", help="run the demo pipeline on the embedded defaults")
    p.add_argument("-o", "--output", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", default="edge", choices=list(CONFIGS))
    p.add_argument("--checkpoint", help="a trained checkpoint (predictions are meaningful only with one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-quant", action="store_true", help="skip the FP16 / INT8 bundles (step 7)")
    p.add_argument("--calib-size", type=int, default=128, help="calibration views for the INT8 bundle")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from pathlib import Path

    import torch

    from .. import api
    from ..export.compare import time_torch_vs_runtime
    from ..export.source import load_model
    from ..geo import build_default_hierarchy
    from ..parity import format_parity
    from ..report import format_table, write_json
    from ..runtime import Localizer
    from ..runtime.golden import Golden
    from ..samples import copy_samples
    from .cells import print_info

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    t_all = time.perf_counter()
    print("== geosurge demo ==")
    if not args.checkpoint:
        print("NOTE: no trained checkpoint (--checkpoint): the model is built from real pretrained parts but its "
              "fusion layers are untrained,\n      so the predicted places below are NOT meaningful. The pipeline, "
              "parity and timings are real.")
    print("\n[1/7] cell hierarchy from the real MP-16 photo density (100K sample shipped in geoclip)")
    t0 = time.perf_counter()
    h = build_default_hierarchy()
    print_info(h.info(), False, title=f"      {len(h):,} cells in {h.num_levels} levels, built in "
                                      f"{time.perf_counter() - t0:.2f}s")

    print(f"\n[2/7] {args.checkpoint or args.model} model (EfficientNet-Lite0 ImageNet weights, GeoCLIP cell init)")
    model, source = load_model(args.model, args.checkpoint, seed=0, hierarchy=h)
    samples = copy_samples(out / "samples")
    print(f"      {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {len(samples)} sample photos "
          f"-> {out / 'samples'}")

    print("\n[3/7] export FP32 ONNX bundle")
    indent = lambda m: print("      " + m)  # noqa: E731
    bundle = api.export(model, out / "bundle-fp32", source=source, golden=samples, threads=args.threads, log=indent)

    print("\n[4/7] on-device check: geosurge-run verify (checksums + golden replay)")
    ver = api.verify(bundle, threads=args.threads)
    print(format_parity(ver["metrics"], ver["gates"], title="      golden replay vs FP32 torch reference"))
    print(f"      verify: {'PASS' if ver['passed'] else 'FAIL'}")

    print("\n[5/7] workstation parity: FP32 torch vs the bundle on the sample photos")
    par = api.parity(bundle, out / "samples", checkpoint=args.checkpoint, threads=args.threads, log=indent)
    print(format_parity(par["metrics"], par["gates"], title=f"      {par['metrics']['n']} photos"))
    print(f"      parity: {'PASS' if par['passed'] else 'FAIL'}")

    print("\n[6/7] the torch-free runtime locates the sample photos")
    with Localizer(bundle, threads=args.threads) as loc:
        rows = []
        for p in samples:
            pred = loc.locate(p, top_k=3)
            place = pred["place"] or {}
            rows.append({"photo": p.name, "lat": pred["lat"], "lon": pred["lon"], "confidence": pred["confidence"],
                         "radius_km": pred["uncertainty_km"],
                         "nearest place": f"{place.get('name')}, {place.get('country')}",
                         "ms": sum(pred["timing_ms"].values())})
        print(format_table(rows))
        # timings: torch eager FP32 vs onnxruntime, batch 1, same input, side by side
        timing = time_torch_vs_runtime(model, loc, Golden.load(bundle.path("golden")).inputs[:1], iters=20)
    b = api.bench(bundle, threads=args.threads, iters=30, warmup=3)
    print(format_table(timing, title=f"\ninference latency, batch 1, {args.threads} threads (speed-up "
                                     f"{timing[0]['p50_ms'] / timing[1]['p50_ms']:.1f}x)"))
    print(format_table(b["stages"], title=f"\nruntime end to end per stage (throughput {b['throughput_img_s']:.1f} "
                                          f"img/s; peak RSS of this torch-loaded process {b['peak_rss_mb']:.0f} MB "
                                          "— `geosurge-run bench` measures the runtime alone)"))
    size = bundle_mb(bundle)
    quant = [] if args.no_quant else quantized_bundles(model, source, samples, out, bundle, args)
    quant_ok = all(r["parity"] == "PASS" for r in quant)
    summary = {"bundle": str(bundle), "bundle_mb": size, "verify": ver["passed"], "parity": par["passed"],
               "parity_metrics": par["metrics"], "latency_ms": timing, "runtime_stages": b["stages"],
               "peak_rss_mb": b["peak_rss_mb"], "predictions": rows, "checkpoint": args.checkpoint,
               "precisions": quant, "seconds": time.perf_counter() - t_all}
    write_json(out / "demo.json", summary)
    print(f"\ndone in {summary['seconds']:.0f}s: bundle {bundle} ({size:.1f} MB), verify "
          f"{'PASS' if ver['passed'] else 'FAIL'}, parity {'PASS' if par['passed'] else 'FAIL'}; report "
          f"{out / 'demo.json'}")
    return 0 if ver["passed"] and par["passed"] and quant_ok else 1


def bundle_mb(bundle) -> float:
    """The bundle's size (every checksummed file and the manifest), MB."""
    from ..manifest import MANIFEST_FILE

    return (sum(f.bytes for f in bundle.manifest.files.values()) + (bundle / MANIFEST_FILE).stat().st_size) / 1e6


def quantized_bundles(model, source, samples, out, fp32_bundle, args) -> list[dict]:
    """Step 7: FP16 and INT8 (precision search) bundles, then FP32 / FP16 / INT8 side by side: size, inference
    latency (interleaved, batch 1), parity vs FP32 torch on the sample photos."""
    import numpy as np

    from .. import api
    from ..report import format_table
    from ..runtime import Localizer
    from ..runtime.golden import Golden
    from ..timing import interleaved

    print("\n[7/7] quantized bundles: FP16, and INT8 with the precision search (calibration: augmented views of "
          "the sample photos)")
    indent = lambda m: print("      " + m)  # noqa: E731
    bundles = {"fp32": fp32_bundle}
    for precision, search in (("fp16", None), ("int8", "auto")):
        bundles[precision] = api.export(model, out / f"bundle-{precision}", source=source, golden=samples,
                                        precision=precision, precision_search=search, calib_size=args.calib_size,
                                        threads=args.threads, log=indent)
    x = Golden.load(fp32_bundle.path("golden")).inputs[:1]
    locs = {k: Localizer(v, threads=args.threads) for k, v in bundles.items()}
    try:
        times = interleaved({k: (lambda loc=loc: loc.embed(x)) for k, loc in locs.items()}, iters=20, warmup=5)
    finally:
        for loc in locs.values():
            loc.close()
    rows = []
    for k, b in bundles.items():
        par = api.parity(b, out / "samples", checkpoint=args.checkpoint, threads=args.threads, log=lambda m: None)
        m = par["metrics"]
        rows.append({"precision": k, "model_mb": b.manifest.file_record("model").bytes / 1e6,
                     "bundle_mb": bundle_mb(b), "infer_p50_ms": float(np.median(times[k])),
                     "cos_mean": m["cosine_mean"], "cos_min": m["cosine_min"],
                     "level_agree": m["level_top1_agreement_min"], "top1_in_top5": m["top1_in_top5"],
                     "parity": "PASS" if par["passed"] else "FAIL"})
    print(format_table(rows, title=f"\nFP32 vs FP16 vs INT8 (onnxruntime CPU, batch 1, {args.threads} threads; "
                                   "parity vs FP32 torch on the sample photos)"))
    return rows
