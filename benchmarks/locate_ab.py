"""A/B latency of ``Localizer.locate`` between two runtime settings, interleaved: two worker processes (A and B)
hold a Localizer each on the same bundle; the parent asks them in turn (A, B, B, A, ...) to locate the same image,
paced (``--pause-ms`` before each call, as a 10 fps camera), and compares per-image p50 / p95 of the call's wall time
(in the worker) and the predictions (every field but ``timing_ms`` must be equal). Each side's settings are module
attributes set in its worker before the Localizer opens, e.g. the fixed mmap threshold against glibc's default:

    .venv/bin/python benchmarks/locate_ab.py /tmp/q-edge --b-set geosurge.runtime.memory.MMAP_THRESHOLD=None \\
        --rounds 60 --json benchmarks/results/locate_ab.json

Values are Python literals (``None``, ``262144``, ``"mmap"``). Defaults: the benchmark's 12 MP and small JPEGs
(``geosurge.runtime.benchmark.bench_images``). Also reports each worker's peak RSS (MB) at the end (the ORDER of
calls differs from ``benchmarks/runtime_rss.py``; that script is the RSS figure of record).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np


def _apply(settings: list[str]) -> None:
    for s in settings:
        target, _, value = s.partition("=")
        module, _, attr = target.rpartition(".")
        mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            raise SystemExit(f"--set {s}: {module} has no attribute {attr}")
        setattr(mod, attr, ast.literal_eval(value))


def _worker(conn, bundle: str, settings: list[str], images: list[str]) -> None:
    _apply(settings)
    from geosurge.runtime.bench import peak_rss_mb
    from geosurge.runtime.localizer import Localizer

    with Localizer(bundle, verify=False) as loc:
        for p in images:  # warm-up: every image once
            loc.locate(p)
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                break
            t0 = time.perf_counter()
            pred = loc.locate(images[msg])
            dt = (time.perf_counter() - t0) * 1e3
            pred.pop("timing_ms")
            conn.send((dt, json.dumps(pred, sort_keys=True)))
    conn.send(peak_rss_mb())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--images", nargs="*", default=None)
    ap.add_argument("--a-set", action="append", default=[], metavar="MODULE.ATTR=VALUE")
    ap.add_argument("--b-set", action="append", default=[], metavar="MODULE.ATTR=VALUE")
    ap.add_argument("--rounds", type=int, default=40, help="calls per image per side")
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.images:
        images = [str(Path(p)) for p in a.images]
    else:
        from geosurge.runtime.benchmark import bench_images
        from geosurge.runtime.bundle import open_bundle

        imgs = bench_images(folder_size=1, bundle=open_bundle(a.bundle, verify=False))
        images = [str(imgs.phone), str(imgs.small)]
    ctx = mp.get_context("spawn")  # fresh interpreters: nothing of this process's heap or settings carries over
    sides = {}
    for name, settings in (("A", a.a_set), ("B", a.b_set)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, a.bundle, settings, images), daemon=True)
        proc.start()
        sides[name] = (proc, parent, settings)
    for _, conn, _ in sides.values():
        if conn.recv() != "ready":
            raise SystemExit("a worker failed to start")
    times = {(s, i): [] for s in sides for i in range(len(images))}
    preds = {(s, i): set() for s in sides for i in range(len(images))}
    for r in range(a.rounds):
        for i in range(len(images)):
            for s in (("A", "B") if (r + i) % 2 == 0 else ("B", "A")):
                time.sleep(a.pause_ms / 1e3)
                conn = sides[s][1]
                conn.send(i)
                dt, pred = conn.recv()
                times[(s, i)].append(dt)
                preds[(s, i)].add(pred)
    rss = {}
    for s, (proc, conn, _) in sides.items():
        conn.send(None)
        rss[s] = conn.recv()
        proc.join(30)
    rows = []
    print(f"{'image':<48} {'side':<4} {'p50 ms':>8} {'p95 ms':>8}")
    for i, p in enumerate(images):
        row = {"image": p}
        for s in sides:
            v = np.asarray(times[(s, i)])
            row[s] = {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)), "n": v.size}
            print(f"{Path(p).name:<48} {s:<4} {row[s]['p50_ms']:8.2f} {row[s]['p95_ms']:8.2f}")
        row["b_over_a_p50"] = row["B"]["p50_ms"] / row["A"]["p50_ms"]
        row["b_over_a_p95"] = row["B"]["p95_ms"] / row["A"]["p95_ms"]
        row["same_predictions"] = len(preds[("A", i)] | preds[("B", i)]) == 1
        print(f"{'':<48} B/A  {row['b_over_a_p50']:8.3f} {row['b_over_a_p95']:8.3f}  "
              f"predictions {'equal' if row['same_predictions'] else 'DIFFER'}")
        rows.append(row)
    print(f"peak RSS (MB): A {rss['A']:.1f}, B {rss['B']:.1f}")
    out = {"bundle": a.bundle, "a_set": a.a_set, "b_set": a.b_set, "rounds": a.rounds, "pause_ms": a.pause_ms,
           "images": rows, "peak_rss_mb": rss}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    if not all(r["same_predictions"] for r in rows):
        raise SystemExit("predictions differ between A and B")


if __name__ == "__main__":
    main()
