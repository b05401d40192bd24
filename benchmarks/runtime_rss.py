"""Peak RSS of the runtime alone, as `geosurge benchmark` measures it (`geosurge.runtime.benchmark.runtime_peak_rss`:
a fresh process that imports only `geosurge.runtime`, opens the bundle with the default backend and locates a 12 MP
JPEG and a small JPEG `--calls` times each), repeated `--runs` times; prints a table and writes JSON.

    .venv/bin/python benchmarks/runtime_rss.py /tmp/q-edge --runs 3 --json benchmarks/results/runtime_rss.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from geosurge.runtime.benchmark import bench_images, runtime_peak_rss
from geosurge.runtime.bundle import open_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    imgs = bench_images(folder_size=1, bundle=open_bundle(a.bundle, verify=False))
    images = [imgs.phone, imgs.small]
    runs = []
    for i in range(a.runs):
        r = runtime_peak_rss(a.bundle, None, a.threads, images, calls=a.calls)
        if r.get("peak_rss_mb") is None:
            raise SystemExit(f"run {i + 1}: {r['error']}")
        runs.append(round(r["peak_rss_mb"], 1))
        print(f"run {i + 1}: peak RSS {runs[-1]:.1f} MB (heavy modules: {r['heavy_modules'] or 'none'})")
    out = {"bundle": a.bundle, "images": [str(p) for p in images], "calls": a.calls, "runs_mb": runs,
           "min_mb": min(runs), "max_mb": max(runs)}
    print(f"peak RSS of the runtime alone: {min(runs):.1f}-{max(runs):.1f} MB over {len(runs)} runs")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
