"""The reference model's accuracy in km (issue 15): trained here on downward views of NASA Blue Marble (frozen
EfficientNet-Lite0, cached features), evaluated on held-out views whose centres lie at least --min-km from every
training centre, and on the same centres rendered from a second mosaic (appearance shift), beside two baselines
measured in the same run (the prior's most likely cell; the untrained model). Optionally (--distill) the trained
model is then distilled with `geosurge distill` into a smaller student, and teacher and student are compared with
`geosurge eval` on the held-out views.

    .venv/bin/python benchmarks/reference.py [--train-views 10000] [--epochs 3] [--distill]
        [--out runs/bench-reference] [--json benchmarks/results/reference.json]

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
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    recipe = ReferenceRecipe(config=args.config, train_views=args.train_views, test_views=args.test_views,
                             epochs=args.epochs, min_km=args.min_km, lr=args.lr, table_lr=args.table_lr,
                             seed=args.seed)
    report = train_reference(recipe, out / "reference", feature_cache=args.feature_cache, threads=args.threads)
    print(report["table"])
    result = {"reference": {k: v for k, v in report.items() if k != "table"}}
    write_json(args.json, result)
    if args.distill:
        result["distillation"] = distill_step(args, out, report)
        write_json(args.json, result)
    print(f"\nresults -> {args.json}")
    return 0


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
