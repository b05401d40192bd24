"""Exact top-5 cell search on the device (docs/benchmarks.md, "Cell search"): latency p50/p95 of the runtime's search before
(numpy: an FP32 copy of the table, BLAS products), as first made exact (int8 path-table scoring graph in ONNX
Runtime, every bound candidate re-scored in float64; :class:`ExactSearchBefore`) and now (the same int8 pass into
preallocated buffers, candidates from the lower bounds of the k best approximate cells, lazy re-scoring in
decreasing upper bound), on the default hierarchy with the real GeoCLIP-initialised table of an edge bundle;
whether each returns the exact top-5; and the runtime's peak RSS with the table loaded.

Each search follows a model inference, as in a camera loop, in two modes: *paced* (a camera at 10 fps: a
``--pause-ms`` sleep before the inference) and *back-to-back*; with the model session's ONNX Runtime worker threads
spinning (ORT's default) and not. Contenders are interleaved per iteration (paced) or in alternating blocks
(back-to-back). Exactness is checked against brute force in float64 over the stored table. RSS is measured in fresh
processes (VmHWM; anonymous vs file-backed pages: the new runtime memory-maps the table's rows).

    .venv/bin/python benchmarks/cell_search.py [--bundle DIR] [--iters 40] [--pause-ms 100] [--threads 2]
        [--json benchmarks/results/cell_search.json] [--skip-rss]

The machine is shared: figures are indicative; compare the contenders within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geosurge.report import format_table, write_json
from geosurge.runtime.cells import CellScorer, log_softmax


class NumpySearchBefore:
    """The runtime's cell search before the speed work (2026-11-24): an FP32 copy of every level, the per-level logits by a BLAS
    product, log-softmax, the sum over ancestors for every finest cell, argpartition for the top-k."""

    def __init__(self, table_path, ancestors: np.ndarray):
        with np.load(table_path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            tables = [z[f"emb_{k}"] for k in range(meta["levels"])]
            if meta.get("dtype") == "int8":
                tables = [t.astype(np.float32) * z[f"scale_{k}"][:, None] for k, t in enumerate(tables)]
            self.tables = [np.asarray(t, np.float32) for t in tables]
            self.temperatures = z["temperature"]
            self.projection = z["projection"] if "projection" in z.files else None
        self.ancestors = ancestors

    def topk(self, emb: np.ndarray, k: int = 5) -> np.ndarray:
        z = np.asarray(emb, np.float32).reshape(1, -1)
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        if self.projection is not None:
            z = z @ self.projection
        lps = [log_softmax(z @ t.T / self.temperatures[i]) for i, t in enumerate(self.tables)]
        score = lps[-1].copy()
        for i in range(len(lps) - 1):
            score += lps[i][:, self.ancestors[:, i]]
        score = score[0]
        best = np.argpartition(-score, k - 1)[:k]
        return best[np.argsort(-score[best], kind="stable")]


class ExactSearchBefore:
    """The runtime's exact search as first merged, kept here to be measured beside the current
    one: the int8 pass through ``session.run`` (new output arrays per call), ``Ã`` and the per-cell bound over
    every cell in float64, ``tau`` = the k-th lower bound by a partition over every cell, all candidates re-scored
    in float64 one level at a time, the normaliser over a float32 copy of every score."""

    def __init__(self, scorer: CellScorer):
        self.sc, self.index = scorer, scorer.prepare_search()

    def _exact(self, y: np.ndarray, cells: np.ndarray) -> np.ndarray:
        sc, anc = self.sc, self.sc.ancestors[cells]
        rows = np.empty((sc.num_levels, len(cells), sc.dim), np.float64)
        for k in range(sc.num_levels):
            rows[k] = sc._rows_f64(k, anc[:, k])
        vals = np.einsum("lmd,d->lm", rows, y)
        vals /= sc.temperatures.astype(np.float64)[:, None]
        return vals.sum(0)

    def topk(self, emb: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        from geosurge.runtime.cellsearch import select_candidates

        y = self.sc._query64(emb)
        approx, ynorm, ry = self.index.approx(y)
        e, emax = self.index.bound(ynorm[0], ry[0])
        cand = select_candidates(approx[0], e, k)
        exact = self._exact(y[0], cand)
        scores = approx[0].astype(np.float32)  # the normaliser, as before (float32 copy, exp over every cell)
        scores[cand] = exact
        m = float(exact.max())
        log_norm = m + np.log(np.exp(scores - np.float32(m)).sum(dtype=np.float64))
        order = np.lexsort((cand, -exact))[:k]
        return cand[order], exact[order] - log_norm


def _status() -> dict:
    """Memory of this process in MB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        text = Path("/proc/self/status").read_text()
        get = lambda key: int(text.split(key + ":")[1].split()[0]) / 1024  # noqa: E731
        return {"rss_mb": get("VmRSS"), "peak_rss_mb": get("VmHWM"), "anon_mb": get("RssAnon"),
                "file_mb": get("RssFile")}
    except (OSError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2 ** 20)
        return {"rss_mb": None, "peak_rss_mb": peak, "anon_mb": None, "file_mb": None}


def rss_child(kind: str, bundle: str, queries_path: str, threads: int) -> None:
    """One fresh runtime (model session + places + the cell search of ``kind``), then model + search for every
    query; prints its memory as JSON."""
    from geosurge.runtime.backends import open_runner
    from geosurge.runtime.bundle import open_bundle
    from geosurge.runtime.places import Places

    start = _status()
    b = open_bundle(bundle)
    runner = open_runner(b, "onnxruntime", threads)
    with np.load(b.path("golden")) as g:
        feed = {b.manifest.io.input.name: g["inputs"][:1]}
    runner.infer(feed)
    before = _status()
    if kind == "before":
        old = NumpySearchBefore(b.path("cell_table"), CellScorer.load(b.path("cells"), b.path("cell_table"),
                                                                      mmap_rows=False).ancestors)
        search = old.topk
    else:
        sc = CellScorer.load(b.path("cells"), b.path("cell_table"), mmap_rows=(kind == "now"))
        sc.prepare_search()
        search = lambda e: sc.search(e, 5)  # noqa: E731
    loaded = _status()
    places = Places.load(b.path("places")) if b.has("places") else None
    for q in np.load(queries_path):
        runner.infer(feed)
        search(q)
    end = _status()
    print(json.dumps({"kind": kind, "start": start, "before_table": before, "table_loaded": loaded, "end": end,
                      "places": places is not None}))


def measure_rss(kind: str, bundle: Path, queries_path: Path, threads: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--rss-child", kind, str(bundle), str(queries_path),
                        "--threads", str(threads)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"rss child {kind} failed: {r.stderr[-2000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"runtime": {"before": "numpy FP32 copy (before)", "now": "exact search, rows memory-mapped",
                        "in-memory": "exact search, rows in memory"}[kind],
            "peak_rss_mb": d["end"]["peak_rss_mb"], "rss_end_mb": d["end"]["rss_mb"],
            "anon_end_mb": d["end"]["anon_mb"], "file_end_mb": d["end"]["file_mb"],
            "without_table_mb": d["before_table"]["rss_mb"],
            "table_rss_mb": d["table_loaded"]["rss_mb"] - d["before_table"]["rss_mb"],
            "table_peak_mb": d["table_loaded"]["peak_rss_mb"] - d["before_table"]["rss_mb"],
            "table_rss_end_mb": d["end"]["rss_mb"] - d["before_table"]["rss_mb"]}


def brute_force64(sc: CellScorer, emb: np.ndarray) -> np.ndarray:
    """(N, n_finest) float64 logit sums over the stored rows (the reference for exactness)."""
    y = sc._query64(emb)
    a = np.zeros((len(y), sc.ancestors.shape[0]))
    for k in range(sc.num_levels):
        for s in range(0, sc.hierarchy.sizes[k], 8192):
            idx = np.arange(s, min(s + 8192, sc.hierarchy.sizes[k]))
            part = y @ sc._rows_f64(k, idx).T / np.float64(sc.temperatures[k])
            sel = (sc.ancestors[:, k] >= s) & (sc.ancestors[:, k] < s + 8192)
            a[:, sel] += part[:, sc.ancestors[sel, k] - s]
    return a


def other_threads_cpu_ms() -> float | None:
    """CPU time (ms) used so far by this process's threads other than the calling one (Linux /proc), or None."""
    try:
        me, total = str(os.getpid()), 0
        for t in os.listdir("/proc/self/task"):
            if t != me:
                f = Path(f"/proc/self/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])
        return total * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="an edge FP32 bundle (default: export one to a temp dir, ~1 min)")
    ap.add_argument("--iters", type=int, default=40, help="searches per contender and mode")
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--json", default="benchmarks/results/cell_search.json")
    ap.add_argument("--skip-rss", action="store_true", help="skip the fresh-process memory measurement")
    ap.add_argument("--rss-child", nargs=3, metavar=("KIND", "BUNDLE", "QUERIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child, threads=args.threads)
        return 0

    from geosurge.export.prune import probe_embeddings
    from geosurge.runtime import Localizer
    from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from geosurge.samples import sample_photo_paths

    work = Path(tempfile.mkdtemp(prefix="geosurge-cellsearch-"))
    bundle = Path(args.bundle) if args.bundle else work / "edge-fp32"
    if not args.bundle:
        from geosurge.export.bundle import write_bundle
        from geosurge.export.source import load_model

        print("exporting an edge bundle (GeoCLIP-initialised cell table) ...", flush=True)
        model, source = load_model("edge", seed=0)
        write_bundle(bundle, model, source, sample_photo_paths(), log=lambda m: None)
    loc = Localizer(bundle, threads=args.threads)
    sc = loc.scorer
    photos = [loc.preprocess(p) for p in sample_photo_paths()]
    with np.load(loc.bundle.path("golden")) as g:
        golden = g["embedding"]
    photo_emb = loc.embed(np.stack(photos))
    probes = np.concatenate([probe_embeddings(sc, args.probes // 2, seed=1, noise=0.6)[0],
                             probe_embeddings(sc, args.probes - args.probes // 2, seed=2, noise=1.5)[0]])
    queries = np.concatenate([golden, photo_emb, probes]).astype(np.float32)
    qpath = work / "queries.npy"
    np.save(qpath, queries)
    print(f"{len(queries)} queries: {len(golden)} golden + {len(photo_emb)} photo embeddings (edge model, untrained "
          f"head) + {len(probes)} probe embeddings (finest-cell rows + noise)", flush=True)

    # ---- exactness --------------------------------------------------------------------------------------------
    before = NumpySearchBefore(loc.bundle.path("cell_table"), sc.ancestors)
    ref = brute_force64(sc, queries)
    ref5 = np.stack([np.lexsort((np.arange(r.size), -r))[:5] for r in ref])
    res = sc.search(queries, 5)
    lse = np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1)) + ref.max(1)
    lp_err = np.abs(res.log_probs - (np.take_along_axis(ref, res.indices, 1) - lse[:, None]))
    old5 = np.stack([before.topk(q) for q in queries])
    full = sc.search(queries, 5, with_scores=True)  # what the Localizer uses, vs the exact distribution
    conf_err, radius_err = [], []
    for i in range(len(queries)):
        best = int(ref5[i, 0])
        lat, lon = float(sc.rep_lat[best]), float(sc.rep_lon[best])
        p = np.exp(ref[i] - lse[i])
        conf_err.append(abs(np.exp(full.log_probs[i, 0]) - p[best]) / p[best])
        approx_p = np.exp(full.scores[i] - np.float32(full.log_norm[i]))
        radius_err.append(abs(sc.uncertainty_km(approx_p, lat, lon) - sc.uncertainty_km(p, lat, lon)))
    first = ExactSearchBefore(sc)
    first5 = np.stack([first.topk(q)[0] for q in queries])
    exact = {"queries": len(queries), "new_top5_equal": int((res.indices == ref5).all(1).sum()),
             "first_exact_top5_equal": int((first5 == ref5).all(1).sum()),
             "before_top5_equal": int((old5 == ref5).all(1).sum()),
             "candidates_p50": pct(res.candidates, 50), "candidates_p95": pct(res.candidates, 95),
             "candidates_max": int(res.candidates.max()), "bound_max_logit": float(res.bound.max()),
             "log_norm_error_bound_p50": pct(res.log_norm_error, 50),
             "log_norm_error_bound_max": float(res.log_norm_error.max()),
             "log_prob_error_observed_max": float(lp_err.max()),
             "confidence_rel_error_max": float(max(conf_err)), "uncertainty_km_error_max": float(max(radius_err))}
    print(format_table([exact], title="exactness vs float64 brute force over the stored table"), flush=True)

    # ---- latency ----------------------------------------------------------------------------------------------
    feed = {loc.input: photos[0][None]}
    model = {True: OnnxRuntimeRunner(loc.bundle.path("model"), args.threads, spinning=True),
             False: OnnxRuntimeRunner(loc.bundle.path("model"), args.threads, spinning=False)}
    contenders = {"numpy FP32 (before)": before.topk, "exact search (first)": first.topk,
                  "exact search (now)": lambda e: sc.search(e, 5),
                  "predict_embedding (now)": lambda e: loc.predict_embedding(e, 5)}
    try:
        from threadpoolctl import threadpool_limits

        def pinned(e, _lim=threadpool_limits):
            with _lim(1, user_api="blas"):
                return before.topk(e)
        contenders["numpy FP32, BLAS pinned to 1 thread"] = pinned
    except ImportError:
        pass
    for m in model.values():  # warm up
        for _ in range(3):
            m.infer(feed)
    for f in contenders.values():
        f(queries[0])
    times = {(c, mode, spin): ([], []) for c in contenders for mode in ("paced", "back-to-back") for spin in model}
    pause = args.pause_ms / 1e3

    def one(c, spin, i):
        t0 = time.perf_counter()
        model[spin].infer(feed)
        t1 = time.perf_counter()
        contenders[c](queries[i % len(queries)])
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    print(f"paced: {len(contenders) * 2} x {args.iters} searches, {args.pause_ms:.0f} ms pause before each "
          "inference ...", flush=True)
    for i in range(args.iters):
        for spin in model:
            for c in contenders:
                time.sleep(pause)
                tm, ts = one(c, spin, i)
                times[(c, "paced", spin)][0].append(tm)
                times[(c, "paced", spin)][1].append(ts)
    print("back-to-back ...", flush=True)
    block = 10
    for b0 in range(0, args.iters, block):
        for spin in model:
            for c in contenders:
                for i in range(b0, min(args.iters, b0 + block)):
                    tm, ts = one(c, spin, i)
                    times[(c, "back-to-back", spin)][0].append(tm)
                    times[(c, "back-to-back", spin)][1].append(ts)
    rows = []
    for (c, mode, spin), (tm, ts) in times.items():
        rows.append({"search": c, "mode": mode, "model_spinning": spin,
                     "search_p50_ms": pct(ts, 50), "search_p95_ms": pct(ts, 95),
                     "model_p50_ms": pct(tm, 50), "model_p95_ms": pct(tm, 95),
                     "total_p95_ms": pct(np.add(tm, ts), 95)})
    print(format_table(rows, title=f"model inference then top-5 cell search ({args.threads} ORT threads; "
                                   f"{sc.ancestors.shape[0]:,} finest / {sum(sc.hierarchy.sizes):,} cells x "
                                   f"{sc.dim}, {sc.table_dtype})"), flush=True)

    # ---- idle threads: CPU burnt by other threads after each call ---------------------------------------------
    burn = []
    for name, fn in [(f"model session, spinning={spin}", lambda m=m: m.infer(feed)) for spin, m in model.items()] + [
            ("exact search (now)", lambda: sc.search(queries[0], 5)), ("numpy FP32 (before)",
                                                                       lambda: before.topk(queries[0]))]:
        time.sleep(0.3)
        c0 = other_threads_cpu_ms()
        for _ in range(10):
            fn()
            time.sleep(pause)
        c1 = other_threads_cpu_ms()
        if c0 is not None:
            burn.append({"call": name, "other_threads_cpu_ms_per_call": (c1 - c0) / 10})
    if burn:
        print(format_table(burn, title=f"CPU used by the process's other threads per call ({args.pause_ms:.0f} ms "
                                       "pause after each; spinning pools keep a core busy after the call)"))

    # ---- memory (fresh processes) -----------------------------------------------------------------------------
    if not args.skip_rss:
        print("peak RSS in fresh processes ...", flush=True)
    rss = [] if args.skip_rss else [measure_rss(kind, bundle, qpath, args.threads)
                                    for kind in ("before", "now", "in-memory")]
    if rss:
        print(format_table(rss, title="runtime memory (MB): model session + places + cell search, after "
                                      f"{len(queries)} inferences + searches"), flush=True)
    index = sc.prepare_search()
    table = {"dtype": sc.table_dtype, "cells": int(sum(sc.hierarchy.sizes)), "finest": int(sc.ancestors.shape[0]),
             "dim": sc.dim, "stored_mb": sc.table_bytes / 1e6,
             "fp32_copy_mb": sum(sc.hierarchy.sizes) * sc.dim * 4 / 1e6,
             "int8_path_table_mb": None if index is None else index.table_bytes / 1e6}
    write_json(args.json, {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                       "python": platform.python_version()},
                           "bundle": str(bundle), "table": table, "iters": args.iters, "pause_ms": args.pause_ms,
                           "threads": args.threads, "exactness": exact, "latency": rows, "idle_threads": burn,
                           "memory": rss})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
