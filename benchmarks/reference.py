"""The reference model's accuracy in km (docs/benchmarks.md): trained here on downward views of NASA Blue Marble (frozen
EfficientNet-Lite0, cached features), evaluated on held-out views whose centres lie at least --min-km from every
training centre, and on the same centres rendered from a second mosaic (appearance shift), beside two baselines
measured in the same run (the prior's most likely cell; the untrained model). Then (unless --no-precisions) FP32,
FP16 and INT8 (precision search) bundles of the trained model: parity vs FP32 torch on held-out views, and their
accuracy in km on the held-out views of both sources through `geosurge eval` beside the two baselines, with the
task-level drift of FP16 / INT8 vs FP32 (geodesic km between predictions, acc@km deltas). Optionally (--distill)
the trained model is then distilled with `geosurge distill` into a smaller student, and teacher and student are
compared with `geosurge eval` on the held-out views.

    .venv/bin/python benchmarks/reference.py [--train-views 10000] [--epochs 3] [--distill]
        [--out runs/bench-reference] [--json benchmarks/results/reference.json]
    .venv/bin/python benchmarks/reference.py --shipped     # the shipped weights (figures of their training run)

Timings are wall-clock on this machine's cores as shared at the time (indicative, not a controlled measurement).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> int:
    from geosurge.report import format_table, write_json
    from geosurge.training.reference import ReferenceRecipe, train_reference

    d = ReferenceRecipe()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=d.config)
    ap.add_argument("--train-views", type=int, default=d.train_views)
    ap.add_argument("--test-views", type=int, default=d.test_views)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--min-km", type=float, default=d.min_km)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--table-lr", type=float, default=d.table_lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--feature-cache", help="reuse rendered-view backbone features between runs")
    ap.add_argument("--out", default="runs/bench-reference")
    ap.add_argument("--distill", action="store_true", help="then distil the trained model (teacher) into --student")
    ap.add_argument("--student", default="edge-small", help="student for --distill: a config name, a JSON config, or "
                                                            "edge-small (default: the edge model with a 1-block "
                                                            "128-wide fusion and 256-d cells, same frozen backbone)")
    ap.add_argument("--distill-images", type=int, default=600, help="unlabelled training-region views")
    ap.add_argument("--distill-epochs", type=int, default=4)
    ap.add_argument("--json", default="benchmarks/results/reference.json")
    ap.add_argument("--shipped", action="store_true", help="no training: the shipped weights (geosurge/data/"
                    "reference) assembled over their packages; the training figures are those of their record")
    ap.add_argument("--no-precisions", action="store_true", help="skip the FP32 / FP16 / INT8 bundles")
    ap.add_argument("--calib-size", type=int, default=128, help="calibration views for INT8 (not held out)")
    ap.add_argument("--eval-views", type=int, default=500, help="held-out views per source in the precision "
                                                                "table (default: all 500)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    recipe = ReferenceRecipe(config=args.config, train_views=args.train_views, test_views=args.test_views,
                             epochs=args.epochs, min_km=args.min_km, lr=args.lr, table_lr=args.table_lr,
                             seed=args.seed)
    if args.shipped:
        from geosurge import api

        ref = api.reference(recipe=recipe, cache_dir=out / "cache", threads=args.threads)
        report, checkpoint = ref.report, ref.checkpoint
    else:
        report = train_reference(recipe, out / "reference", feature_cache=args.feature_cache, threads=args.threads)
        checkpoint = out / "reference" / "checkpoint"
    print(report["table"])
    result = {"reference": {k: v for k, v in report.items() if k != "table"}}
    write_json(args.json, result)
    if not args.no_precisions:
        result["precisions"] = precisions_step(args, out, checkpoint, report)
        write_json(args.json, result)
    if args.distill:
        result["distillation"] = distill_step(args, out, report)
        write_json(args.json, result)
    print(f"\nresults -> {args.json}")
    return 0


def precisions_step(args, out: Path, checkpoint: Path, report: dict) -> dict:
    """FP32 / FP16 / INT8 (precision search) bundles of the trained model: parity vs FP32 torch on 48 held-out views
    (the gates of the bundle's manifest), then every bundle, the torch checkpoint and the two baselines in km on the
    held-out views of both sources (`geosurge eval`), and the drift of FP16 / INT8 vs the FP32 bundle."""
    import csv

    from geosurge import api
    from geosurge.evaluation.baselines import PRIOR_LABEL, UNTRAINED_LABEL, baselines, drift_km
    from geosurge.geo import build_default_hierarchy
    from geosurge.report import format_table

    with open(report["heldout_manifest"], newline="") as f:
        rows = list(csv.DictReader(f))
    root = Path(report["heldout_manifest"]).parent
    by_source: dict[str, list] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    chosen = [r for g in by_source.values() for r in g[:args.eval_views]]
    manifest = out / "heldout.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "lat", "lon", "source"])
        w.writerows([(str((root / r["path"]).resolve()), r["lat"], r["lon"], r["source"]) for r in chosen])
    first = next(iter(by_source.values()))
    golden = [root / r["path"] for r in first[:6]]
    parity_images = [root / r["path"] for g in by_source.values() for r in g[:24]]
    model, source = api.load_model(checkpoint)
    calib = api.views(out / "calib", count=args.calib_size, seed=123)
    bundles, export_s, parity = {}, {}, []
    for precision, search in (("fp32", None), ("fp16", None), ("int8", "auto")):
        t0 = time.perf_counter()
        bundles[precision] = api.export(model, out / f"bundle-{precision}", source=source, golden=golden,
                                        precision=None if precision == "fp32" else precision,
                                        precision_search=search, calibration=calib if precision == "int8" else None,
                                        calib_size=args.calib_size, threads=args.threads, log=lambda m: None)
        export_s[precision] = time.perf_counter() - t0
        par = api.parity(bundles[precision], parity_images, checkpoint=checkpoint, threads=args.threads,
                         log=lambda m: None)
        m = par["metrics"]
        parity.append({"precision": precision, "export_s": export_s[precision], "n": m["n"],
                       "cos_mean": m["cosine_mean"], "cos_min": m["cosine_min"],
                       "level_agree": m["level_top1_agreement_min"], "top1_in_top5": m["top1_in_top5"],
                       "parity": "PASS" if par["passed"] else "FAIL"})
    print("\n" + format_table(parity, title=f"parity vs FP32 torch on {len(parity_images)} held-out views"))
    labels = ["FP32 torch (checkpoint)"] + [f"{k.upper()} bundle" for k in bundles]
    hierarchy = build_default_hierarchy()
    ev = api.evaluate([*baselines(report["recipe"]["config"], hierarchy, report["recipe"]["seed"]), checkpoint,
                       *bundles.values()], manifest, output=out / "eval-precisions",
                      labels=[PRIOR_LABEL, UNTRAINED_LABEL, *labels], threads=args.threads, log=None)
    print("\n" + ev.table)
    fp32 = ev.results[3]
    drift = [{"vs FP32 bundle": lab, **drift_km(fp32, r)} for lab, r in zip(labels[2:], ev.results[4:])]
    print("\n" + format_table(drift, ["vs FP32 bundle", "n", "same_point", "drift_median_km", "drift_p95_km",
                                      "delta_acc@750km", "delta_acc@2500km"], title="task-level drift"))
    return {"parity": parity, "eval": [{"label": r.model["label"], **r.summary()} for r in ev.results],
            "drift_vs_fp32": drift, "table": ev.table, "plots": ev.plots,
            "model_mb": {k: b.manifest.file_record("model").bytes / 1e6 for k, b in bundles.items()}}


def distill_step(args, out: Path, report: dict) -> dict:
    """Distil the trained reference model into --student on unlabelled views of the training region, then compare
    teacher and student in km on the held-out views (both through torch)."""
    import numpy as np

    from geosurge.data import load_raster
    from geosurge.data.views import draw_centres, draw_view_specs, render_views, write_view_manifest
    from geosurge import api
    from geosurge.report import format_table
    from geosurge.training.distill import DistillConfig, distill

    raster = load_raster(report["recipe"]["source"])
    rng = np.random.default_rng(args.seed + 1000)
    lat, lon = draw_centres(args.distill_images, rng, raster=raster)
    specs = [s for s in draw_view_specs(lat, lon, rng, tuple(report["recipe"]["footprint_km"]), 256, raster) if s]
    images = write_view_manifest(out / "distill-images", [(raster.name, specs, render_views(raster, specs))])
    teacher = out / "reference" / "checkpoint"
    student_spec = args.student
    if student_spec == "edge-small":
        student_spec = str(write_edge_small(out / "edge-small.json"))
    t0 = time.perf_counter()
    state = distill(DistillConfig(teacher=str(teacher), student=student_spec, images=str(images),
                                  output=str(out / "student"), epochs=args.distill_epochs, batch_size=32,
                                  views=2, progress=False))
    seconds = time.perf_counter() - t0
    student = out / "student" / "best"
    if not (student / "config.json").is_file():
        student = out / "student" / "checkpoint"
    ev = api.evaluate([teacher, student], report["heldout_manifest"],
                      labels=[f"teacher ({report['recipe']['config']})", f"student ({args.student})"],
                      output=out / "eval-distill", threads=args.threads, log=None)
    print("\n" + ev.table)
    fin = state.get("final") or {}
    print(f"distillation: {len(specs)} unlabelled views, {state['epoch']} epoch(s) in {seconds:.0f}s; held-out "
          f"teacher/student top-1 agreement {fin.get('mean_agreement', float('nan')):.3f}, embedding cosine "
          f"{fin.get('embedding_cosine', float('nan')):.3f}")
    return {"student": args.student, "images": len(specs), "seconds": seconds, "final": fin,
            "initial": state.get("initial"), "eval": [r.summary() for r in ev.results],
            "labels": [r.model["label"] for r in ev.results], "table": ev.table}


def write_edge_small(path: Path) -> Path:
    """A smaller student than ``edge``: the same frozen EfficientNet-Lite0 (ImageNet weights), a 1-block 128-wide
    fusion instead of 2 x 256, 256-d cell embeddings (the teacher's table projected by PCA) instead of 512."""
    from dataclasses import replace

    from geosurge.models.config import FusionConfig, HeadConfig, edge_config

    cfg = edge_config()
    cfg = replace(cfg, name="edge-small", backbone=replace(cfg.backbone, trainable_blocks=0),
                  segmenter=replace(cfg.segmenter, head_hidden=64),
                  fusion=FusionConfig(dim=128, num_blocks=1, num_heads=4, mlp_ratio=2.0, query_self_attention=True),
                  head=HeadConfig(embed_dim=256, init_from_geoclip=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_json())
    return path


if __name__ == "__main__":
    raise SystemExit(main())
