"""The floor of the exact cell search on this machine: its first pass (the int8 path-table product in ONNX Runtime,
``geosurge.runtime.cellsearch``) right after a model inference, as a camera loop runs it (docs/benchmarks.md,
"Cell search: the floor").

The first pass reads the whole int8 path table (n_finest x dim bytes: 9.3 MB for the default hierarchy at 512) once
per query. After an inference has streamed the model's weights through the caches, that read comes from DRAM. Each
round sleeps ``--pause-ms`` (a camera at 10 fps), runs one model inference, then times one contender cold (and the
same call again at once, warm); contenders are interleaved round by round:

* ``runtime (1 thread)``: the runtime's own scoring session and I/O binding (its table is the bundle's);
* ``onnxruntime 2 threads``: the same product on a session with 2 intra-op threads (not spinning);
* ``2 halves, 2 threads``: the table split in two column halves, one session each, the halves run at once (one on a
  waiting Python thread; onnxruntime releases the GIL);
* ``read only (numpy sum)``: a plain sequential read of as many bytes (numpy sum of a uint64 view): the memory floor;
* ``exact search``: ``CellScorer.search`` of one real embedding (golden input), top-5, without the probabilities of
  every cell — the whole search, for scale.

Then the whole search once more per round, cold, stage by stage (its own rounds after the contenders': the query's
normalisation, then ``cellsearch.STAGES`` as ``PathIndex.search_one`` marks them), as a second table.

Last, what makes the search cold: the whole search timed after each of five preceding conditions, interleaved round
by round — the camera loop's pause and inference; the pause alone (the core idles); the inference alone; a 40 MB
read alone (caches evicted, no idle); nothing (warm) — as a third table.

The product's cost does not depend on the table's values (integer GEMM), so the extra sessions use a random int8
table of the bundle's shape.

    .venv/bin/python benchmarks/search_product.py BUNDLE [--iters 60] [--pause-ms 100] [--threads 2] [--json FILE]

Prints a table (cold / warm p50 and p95, ms), writes JSON (default ``benchmarks/results/search_product.json``).
"""
from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

from geosurge.report import format_table, write_json
from geosurge.runtime import cellsearch
from geosurge.runtime.localizer import Localizer


def _session(table: np.ndarray, threads: int):
    """The runtime's scoring session (``cellsearch._session``) over ``table`` with ``threads`` intra-op threads."""
    d, n = table.shape
    return cellsearch._session(cellsearch._matmul_integer_graph(d, n), table, threads)


class Halves:
    """The product over two column halves at once: the second half on a waiting worker thread."""

    def __init__(self, table: np.ndarray, query: np.ndarray):
        h = table.shape[1] // 2
        self.a, self.b = _session(table[:, :h], 1), _session(table[:, h:], 1)
        self.feed = {"query": query}
        self.go, self.done = threading.Event(), threading.Event()
        threading.Thread(target=self._worker, daemon=True).start()

    def _worker(self):
        while True:
            self.go.wait()
            self.go.clear()
            self.b.run(None, self.feed)
            self.done.set()

    def __call__(self):
        self.go.set()
        self.a.run(None, self.feed)
        self.done.wait()
        self.done.clear()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=2, help="the model's threads")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/search_product.json"))
    a = ap.parse_args()

    loc = Localizer(a.bundle, threads=a.threads)
    sc = loc.scorer
    index = sc.prepare_search()
    if index is None:
        raise SystemExit("this CPU's int8 kernel failed its exactness check: the search runs brute force here")
    with np.load(loc.bundle.path("golden")) as g:
        x = g["inputs"][:1]
    emb = loc.embed(x)[0]
    n, d = index.n, index.dim
    table = np.random.default_rng(0).integers(-127, 128, (d, n)).astype(np.int8)
    query = np.full((2, d), cellsearch.QUERY_ZERO_POINT + 7, np.uint8)
    work = index._work()
    cellsearch.quantize_query(sc._query64(emb), out=work.query)
    two = _session(table, 2)
    halves = Halves(table, query)
    flat = np.ones(n * d // 8, np.uint64)  # as many bytes as the int8 table
    calls = {
        "runtime (1 thread)": lambda: index.session.run_with_iobinding(work.io),
        "onnxruntime 2 threads": lambda: two.run(None, {"query": query}),
        "2 halves, 2 threads": halves,
        "read only (numpy sum)": lambda: flat.sum(),
        "exact search": lambda: sc.search(emb, 5),
    }
    cold = {k: [] for k in calls}
    warm = {k: [] for k in calls}
    for it in range(a.iters + 2):
        for name, call in calls.items():
            time.sleep(a.pause_ms / 1e3)
            loc.embed(x)  # the inference a camera loop runs before each search
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            call()
            t2 = time.perf_counter()
            if it >= 2:
                cold[name].append((t1 - t0) * 1e3)
                warm[name].append((t2 - t1) * 1e3)
        if (it + 1) % 20 == 0:
            print(f"  round {it + 1}/{a.iters + 2}", flush=True)
    stage_names = ("normalise the query",) + cellsearch.STAGES
    stages = []
    for it in range(a.iters + 2):
        time.sleep(a.pause_ms / 1e3)
        loc.embed(x)
        marks = [time.perf_counter_ns()]
        y = sc._query64(emb)[0]
        marks.append(time.perf_counter_ns())
        index.search_one(y, 5, lambda cells: sc._exact_sums(y, cells), marks=marks)
        if it >= 2:
            stages.append(np.diff(marks) / 1e6)
    stages = np.asarray(stages)
    big = np.ones(40_000_000 // 8)  # 40 MB: more than this machine's caches
    before = {"pause + inference (camera loop)": lambda: (time.sleep(a.pause_ms / 1e3), loc.embed(x)),
              "pause only": lambda: time.sleep(a.pause_ms / 1e3),
              "inference only": lambda: loc.embed(x),
              "40 MB read only": lambda: big.sum(),
              "nothing (warm)": lambda: None}
    after = {k: [] for k in before}
    for it in range(a.iters + 2):
        for name, prior in before.items():
            prior()
            t0 = time.perf_counter()
            sc.search(emb, 5)
            if it >= 2:
                after[name].append((time.perf_counter() - t0) * 1e3)
    pct = lambda v, q: float(np.percentile(v, q))  # noqa: E731
    rows = [{"contender": k, "cold_p50_ms": pct(cold[k], 50), "cold_p95_ms": pct(cold[k], 95),
             "warm_p50_ms": pct(warm[k], 50), "warm_p95_ms": pct(warm[k], 95),
             "cold_GB_s": (n * d / 1e9) / (pct(cold[k], 50) / 1e3) if k != "exact search" else None}
            for k in calls]
    print(format_table(rows, title=f"exact search's first pass after an inference: {n} x {d} int8 "
                                   f"({n * d / 2**20:.1f} MB), paced {a.pause_ms:g} ms, {a.iters} rounds"))
    stage_rows = [{"stage": s, "cold_p50_ms": pct(stages[:, i], 50), "cold_p95_ms": pct(stages[:, i], 95)}
                  for i, s in enumerate(stage_names)]
    total = stages.sum(1)
    stage_rows.append({"stage": "the whole search", "cold_p50_ms": pct(total, 50), "cold_p95_ms": pct(total, 95)})
    print(format_table(stage_rows, title="the exact search stage by stage, cold (after an inference, paced)"))
    cond_rows = [{"before each search": k, "p50_ms": pct(v, 50), "p95_ms": pct(v, 95),
                  "x_warm_p50": pct(v, 50) / pct(after["nothing (warm)"], 50)} for k, v in after.items()]
    print(format_table(cond_rows, title=f"what makes the search cold (the whole search after each condition; "
                                        f"pause {a.pause_ms:g} ms)"))
    write_json(a.json, {"bundle": str(a.bundle), "n_finest": n, "dim": d, "table_mb": n * d / 2**20,
                        "iters": a.iters, "pause_ms": a.pause_ms, "model_threads": a.threads,
                        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                    "python": sys.version.split()[0]},
                        "rows": rows, "cold_ms": cold, "warm_ms": warm, "stages": stage_rows,
                        "conditions": cond_rows, "condition_ms": after})
    print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
