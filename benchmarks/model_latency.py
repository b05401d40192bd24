"""Forward latency of the paper and edge models on this CPU at batch 1 (torch eager, FP32).

    .venv/bin/python benchmarks/model_latency.py [--threads 2] [--configs paper edge] [--json out.json]

Prints a table and writes JSON. Both models are measured in one run, side by side; GFLOPs/params from
geosurge.models.info. The paper model is random-initialised (no CLIP weights offline): latency does not depend on
the weight values.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import torch

from geosurge.geo import build_default_hierarchy
from geosurge.models import GeoSurge, get_config
from geosurge.models.info import model_info
from geosurge.report import format_table, write_json


def measure(model, x, warmup: int, iters: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model.embed(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model.head.level_logits(model.embed(x))
            times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["paper", "edge"])
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: 5 paper, 50 others)")
    ap.add_argument("--json", default="benchmarks/results/model_latency.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = build_default_hierarchy()
    rows = []
    for name in args.configs:
        cfg = get_config(name)
        cfg = replace(cfg, head=replace(cfg.head, init_from_geoclip=False))
        info = {r["part"]: r for r in model_info(cfg, h)["parts"]}
        model = GeoSurge(cfg, h).eval()
        x = torch.randn(1, 3, cfg.preprocess.size, cfg.preprocess.size)
        iters = args.iters or (5 if name == "paper" else 50)
        t = measure(model, x, warmup=1 if name == "paper" else 5, iters=iters)
        rows.append({"config": name, "input": cfg.preprocess.size, "params_M": info["total"]["params_M"],
                     "GFLOPs": info["total"]["GFLOPs"], "iters": iters, "p50_ms": statistics.median(t),
                     "p95_ms": sorted(t)[max(0, int(round(0.95 * len(t))) - 1)], "min_ms": min(t)})
        print(f"  measured {name}: p50 {rows[-1]['p50_ms']:.1f} ms", flush=True)
        del model
    if len(rows) == 2:
        print(f"{rows[0]['config']} / {rows[1]['config']} latency ratio: {rows[0]['p50_ms'] / rows[1]['p50_ms']:.1f}x")
    print(format_table(rows, title=f"forward latency, batch 1, torch {torch.__version__} eager FP32, "
                                   f"{args.threads} threads, {platform.processor() or platform.machine()}"))
    write_json(args.json, {"threads": args.threads, "torch": torch.__version__, "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
