"""Speed and error of INT8 mixes: all-INT8 PTQ with the k worst nodes kept float, against FP32, on this machine.

The precision search picks how many nodes to keep float from the gates; this shows the price of each count, so a
QAT run can be aimed at a mix that is still fast enough (``geosurge export --qat --exclude-nodes ...``). The
ranking (worst node first) is the one a precision search recorded in an INT8 bundle's manifest
(``quantization.search.ranking``). For each k: the prepared FP32 graph quantized by onnxruntime static QDQ with the
first k ranked nodes excluded (float weights; calibrated once on ``--calib-n`` images, ranges cached), without and
with bias correction (``--bias-correction``: off, on or both, the default; the biases absorb the mean error of the
rounded weights, measured on the calibration images), its mean embedding cosine to FP32 on the next ``--eval-n``
images, and its latency on one image, batch 1, through the
runtime's onnxruntime runner (the deployed session options), all mixes and FP32 interleaved call by call with a
``--pause-ms`` pause before each (a camera's pace).

    .venv/bin/python benchmarks/int8_mixes.py FP32_BUNDLE --ranking INT8_SEARCH_BUNDLE --images IMAGES \\
        [--k 0 4 8 12 16 24 38] [--bias-correction both] [--calib-n 256] [--eval-n 64] [--iters 40]
        [--pause-ms 50] [--threads 2] [--json F]

``IMAGES``: a manifest or folder (the first ``--calib-n`` calibrate, the next ``--eval-n`` evaluate). Prints a
table, writes JSON (default ``benchmarks/results/int8_mixes.json``); exit 0 (a measurement, no gate). Cost: one
quantization and one pass over the evaluation images per mix (bias correction adds one FP32 pass over the
calibration images), then the timing (~4 min for 7 k both ways on 2 cores).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geosurge.calibration import build_calibration_set
from geosurge.export.precision.config import QuantConfig
from geosurge.export.precision.ort_static import prepare
from geosurge.export.precision.search import Quantizer, run_embeddings
from geosurge.report import format_table, write_json
from geosurge.runtime import open_bundle
from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner, int8_saturates
from geosurge.timing import interleaved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="the FP32 bundle (its model and preprocessing)")
    ap.add_argument("--ranking", required=True, help="an INT8 bundle whose manifest holds a precision-search ranking")
    ap.add_argument("--images", required=True)
    ap.add_argument("--k", type=int, nargs="+", default=[0, 4, 8, 12, 16, 24, 38])
    ap.add_argument("--bias-correction", choices=["off", "on", "both"], default="both")
    ap.add_argument("--calib-n", type=int, default=256)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/int8_mixes.json")
    a = ap.parse_args(argv)

    fp32 = open_bundle(a.bundle)
    q = open_bundle(a.ranking).manifest.quantization
    search = (q.extra.get("search") if q is not None else None) or {}
    ranking = [r["node"] for r in search.get("ranking") or []]
    if not ranking:
        print(f"{a.ranking}: its manifest has no precision-search ranking (export it with --precision-search auto)",
              file=sys.stderr)
        return 2
    spec = fp32.manifest.preprocess
    cs = build_calibration_set(a.images, spec, size=a.calib_n + a.eval_n, seed=0, log=lambda s: None)
    cal, ev = cs.subset(np.arange(a.calib_n)), cs.subset(np.arange(a.calib_n, len(cs))).inputs
    rows, runners = [], {}
    with tempfile.TemporaryDirectory(prefix="geosurge-mixes-") as td:
        work = Path(td)
        prep = prepare(fp32.path("model"), work / "prepared.onnx")
        ref = run_embeddings(prep, ev, a.threads)
        paths = {"FP32": prep}
        modes = {"off": [False], "on": [True], "both": [False, True]}[a.bias_correction]
        quantizers = {bc: Quantizer(prep, QuantConfig("int8", excluded_weights="fp32", bias_correction=bc), cal,
                                    work / "ranges.json", log=lambda s: None) for bc in modes}
        for k in a.k:
            for bc, quantizer in quantizers.items():
                name = f"{k} float" + (" + BC" if bc else "")
                dst = work / f"mix{k}{'-bc' if bc else ''}.onnx"
                quantizer(dst, ranking[:k])
                e = run_embeddings(dst, ev, a.threads)
                cos = (ref * e).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(e, axis=1)
                paths[name] = dst
                rows.append({"mix": name, "kept_float": k, "bias_correction": bc, "cosine_mean": float(cos.mean()),
                             "cosine_min": float(cos.min())})
                print(f"  {name}: cosine {cos.mean():.4f}", flush=True)
        try:
            runners = {name: OnnxRuntimeRunner(p, threads=a.threads) for name, p in paths.items()}
            feed = {runners["FP32"].input_names[0]: ev[:1]}
            t = interleaved({n: (lambda r=r: r.infer(feed)) for n, r in runners.items()}, a.iters, 3,
                            pause_ms=a.pause_ms)
        finally:
            for r in runners.values():
                r.close()
    base = float(np.median(t["FP32"]))
    for row in rows:
        ms = t[row["mix"]]
        row.update(p50_ms=float(np.median(ms)), p95_ms=float(np.percentile(ms, 95)),
                   x_fp32=base / float(np.median(ms)))
    rows.insert(0, {"mix": "FP32", "kept_float": None, "p50_ms": base, "p95_ms": float(np.percentile(t["FP32"], 95)),
                    "x_fp32": 1.0})
    print(format_table(rows, ["mix", "cosine_mean", "cosine_min", "p50_ms", "p95_ms", "x_fp32"],
                       title=f"INT8 mixes vs FP32: {len(ev)} evaluation images, batch 1, {a.threads} threads, "
                             f"{a.iters} interleaved runs paced {a.pause_ms:g} ms"))
    write_json(a.json, {"bundle": str(a.bundle), "ranking_from": str(a.ranking), "images": str(a.images),
                        "bias_correction": a.bias_correction,
                        "calib_n": a.calib_n, "eval_n": len(ev), "threads": a.threads, "iters": a.iters,
                        "pause_ms": a.pause_ms, "machine": platform.processor() or platform.machine(),
                        "int8_saturates": int8_saturates(), "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
