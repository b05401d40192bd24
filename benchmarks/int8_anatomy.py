"""Where all-INT8 loses on a model, and how much of it this CPU's integer kernels add (docs/quantization.md).

For each post-training-quantization variant (onnxruntime static QDQ of the bundle's FP32 ONNX, as the export
quantizes it: ``geosurge.export.precision.ort_static``), every evaluation image is embedded twice:

* **grid** (fake-quant): the QDQ graph with onnxruntime's graph optimisations off, so each QuantizeLinear /
  DequantizeLinear pair runs as float arithmetic around float Conv / MatMul: the error of the quantization grid
  alone — what exact integer kernels give (CPUs with VNNI / AMX, ARM dot-product);
* **kernels**: the same graph as deployed (optimisations on: QLinearConv / MatMulIntegerToFloat on this CPU's
  integer kernels; x86 without VNNI sums pairs of u8 x s8 products in int16 with saturation, onnxruntime's
  quantization docs: "reduce_range ... on non-VNNI machines").

Both are compared with FP32 on the task (``geosurge.parity.compare``: tie-aware drift median / p95 km, top-1
agreement where FP32 is confident, accuracy deltas with ground truth, the default gates; cosine as a diagnostic),
and the deployed graph's inference is timed against FP32 (batch 1, p50, interleaved call by call, paced).

Variants (``--variants``; default all): ``ptq`` (the export's settings: per-channel int8 weights, uint8
activations, MinMax), ``percentile`` / ``entropy`` (calibration methods), ``reduce-range`` (7-bit),
``u8u8`` (uint8 weights: no int16 saturation on AVX2, slow kernels), ``conv-only`` / ``matmul-only`` (only those
compute ops quantized: which part of the model loses), ``no-depthwise`` (every grouped Conv left float).

``--tuned MODEL.onnx``: the same variants are also made from this FP32 ONNX of the same model with other weights
(QAT's: ``geosurge export --qat --qat-save CKPT ...``, then ``geosurge export --checkpoint CKPT --precision fp32``)
and compared with the bundle's FP32 all the same (rows ``tuned:VARIANT``): whether QAT closes the gap the grid
opens.

    .venv/bin/python benchmarks/int8_anatomy.py BUNDLE --images IMAGES [--source bmng] [--eval-n 200] \\
        [--calib-n 192] [--threads 2] [--iters 20] [--pause-ms 100] [--variants ptq conv-only ...] \\
        [--tuned qat-fp32.onnx] [--out runs/int8-anatomy] [--json FILE]

``IMAGES``: a ``path,lat,lon[,source]`` manifest (ground truth: the accuracy deltas are gated too) or a folder. The
first ``--eval-n`` images are evaluated, the next ``--calib-n`` calibrate every variant (disjoint by position).
Prints a table, writes JSON (default ``benchmarks/results/int8_anatomy.json``); exit 0 (a measurement, no gate).
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import numpy as np

from geosurge.export.precision import ort_static
from geosurge.export.precision.config import QuantConfig
from geosurge.images import load_image
from geosurge.inputs import list_image_source
from geosurge.parity import compare
from geosurge.preprocess import preprocess
from geosurge.report import format_table, write_json
from geosurge.runtime import open_bundle
from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner
from geosurge.runtime.cells import CellScorer
from geosurge.timing import interleaved

#: variant -> (QuantConfig keywords, which compute nodes: "all" / "conv" / "matmul" / "no-depthwise")
VARIANTS = {
    "ptq": ({}, "all"),
    "percentile": ({"calibrate_method": "percentile"}, "all"),
    "entropy": ({"calibrate_method": "entropy"}, "all"),
    "reduce-range": ({"reduce_range": True}, "all"),
    "u8u8": ({"weight_type": "uint8"}, "all"),
    "conv-only": ({}, "conv"),
    "matmul-only": ({}, "matmul"),
    "no-depthwise": ({}, "no-depthwise"),
}


def read_images(src: Path, source: str | None):
    """(paths, lat, lon or None) of a manifest (rows of ``source`` only, when given) or a folder."""
    paths, lat, lon = list_image_source(src, "images")
    if source is not None:
        if lat is None:
            raise SystemExit(f"{src}: --source needs a manifest with a source column")
        with open(src, newline="") as f:
            keep = np.array([r.get("source") == source for r in csv.DictReader(f)])
        if keep.size != len(paths) or not keep.any():
            raise SystemExit(f"{src}: no rows of source {source!r}")
        paths = [p for p, k in zip(paths, keep) if k]
        lat, lon = lat[keep], lon[keep]
    return paths, lat, lon


def node_selection(prepared: Path, which: str) -> tuple[list[str] | None, list[str]]:
    """(nodes to quantize or None for all, nodes to exclude) of the prepared graph for a variant's ``which``."""
    import onnx

    nodes = onnx.load(str(prepared), load_external_data=False).graph.node
    if which == "conv":
        return [n.name for n in nodes if n.op_type == "Conv"], []
    if which == "matmul":
        return [n.name for n in nodes if n.op_type in ("MatMul", "Gemm")], []
    if which == "no-depthwise":
        grouped = [n.name for n in nodes if n.op_type == "Conv"
                   and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        return None, grouped
    return None, []


def session(path: Path, threads: int, optimize: bool) -> OnnxRuntimeRunner:
    """The deployed graph (``optimize``) or the grid alone (the runtime's simulated INT8)."""
    return OnnxRuntimeRunner(path, threads, simulate_int8=not optimize)


def embed(runner: OnnxRuntimeRunner, x: np.ndarray, name: str) -> np.ndarray:
    return np.concatenate([runner.infer({name: x[i:i + 1]})[runner.output_names[0]] for i in range(len(x))])


def summary(res: dict) -> dict:
    m = res["metrics"]
    return {"cos": m["cosine_mean"], "drift_median_km": m["median_drift_km"], "drift_p95_km": m["p95_drift_km"],
            "agree_confident": m["top1_agreement_confident"], "acc_delta_min_pts": m.get("accuracy_delta_min_pts"),
            "gates": "PASS" if res["passed"] else "FAIL"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="an FP32 ONNX bundle (its model, cell table and preprocessing)")
    ap.add_argument("--images", required=True, type=Path, help="manifest path,lat,lon[,source] or a folder")
    ap.add_argument("--source", help="only manifest rows of this source (e.g. bmng)")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--calib-n", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--tuned", type=Path, help="an FP32 ONNX of the same model with tuned weights (QAT's, "
                    "exported from --qat-save): its variants are measured too, against the bundle's FP32")
    ap.add_argument("--out", type=Path, default=Path("runs/int8-anatomy"), help="quantized graphs are kept here")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/int8_anatomy.json"))
    a = ap.parse_args()

    import onnxruntime as ort

    b = open_bundle(a.bundle)
    if b.manifest.model.precision != "fp32" or not b.has("model") or b.manifest.model.format != "onnx":
        raise SystemExit(f"{a.bundle}: need an FP32 ONNX bundle (found {b.manifest.model.precision} "
                         f"{b.manifest.model.format})")
    spec, name = b.manifest.preprocess, b.manifest.io.input.name
    paths, lat, lon = read_images(a.images, a.source)
    if len(paths) < a.eval_n + a.calib_n:
        raise SystemExit(f"{a.images}: {len(paths)} image(s), need --eval-n + --calib-n = {a.eval_n + a.calib_n}")
    t0 = time.time()
    pixels = np.stack([preprocess(load_image(p, spec), spec) for p in paths[:a.eval_n + a.calib_n]])
    ev, cal = pixels[:a.eval_n], pixels[a.eval_n:]
    truth = (lat[:a.eval_n], lon[:a.eval_n]) if lat is not None else None
    print(f"{len(ev)} evaluation + {len(cal)} calibration images read in {time.time() - t0:.0f} s", flush=True)
    scorer = CellScorer.load(b.path("cells"), b.path("cell_table"))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tuned is not None and not a.tuned.is_file():
        raise SystemExit(f"{a.tuned}: no such ONNX file")
    sources = {"": ort_static.prepare(b.path("model"), a.out / "prepared.onnx")}
    if a.tuned is not None:
        sources["tuned:"] = ort_static.prepare(a.tuned, a.out / "tuned-prepared.onnx")
    fp32 = session(b.path("model"), a.threads, True)
    ref = embed(fp32, ev, name)

    rows, report = [], {"bundle": str(a.bundle), "images": str(a.images), "source": a.source,
                        "eval_n": len(ev), "calib_n": len(cal), "threads": a.threads, "iters": a.iters,
                        "pause_ms": a.pause_ms, "machine": {"platform": platform.platform(),
                                                           "processor": platform.processor(),
                                                           "python": sys.version.split()[0],
                                                           "onnxruntime": ort.__version__},
                        "tuned": None if a.tuned is None else str(a.tuned), "variants": {}}
    runs = [(tag, prep, v) for tag, prep in sources.items() for v in a.variants]
    for i, (tag, prepared, base) in enumerate(runs, 1):
        kw, which = VARIANTS[base]
        v = tag + base
        cfg = QuantConfig(precision="int8", **kw)
        only, exclude = node_selection(prepared, which)
        dst = a.out / f"{v.replace(':', '-')}.onnx"
        t = time.time()
        info = ort_static.quantize_int8_static(prepared, dst, cal, cfg, exclude=exclude, only=only)
        tq = time.time() - t
        grid = summary(compare(ref, embed(session(dst, a.threads, False), ev, name), scorer, truth=truth))
        deployed = session(dst, a.threads, True)
        kern = summary(compare(ref, embed(deployed, ev, name), scorer, truth=truth))
        x = ev[:1]
        ms = interleaved({"fp32": lambda: fp32.infer({name: x}), "int8": lambda: deployed.infer({name: x})},
                         a.iters, a.warmup, a.pause_ms)
        p50 = {k: float(np.percentile(t_, 50)) for k, t_ in ms.items()}
        rows.append({"variant": v, "grid_cos": grid["cos"], "grid_drift_p50_km": grid["drift_median_km"],
                     "grid_drift_p95_km": grid["drift_p95_km"], "grid_agree": grid["agree_confident"],
                     "grid_gates": grid["gates"], "kernel_cos": kern["cos"],
                     "kernel_drift_p50_km": kern["drift_median_km"], "kernel_drift_p95_km": kern["drift_p95_km"],
                     "kernel_agree": kern["agree_confident"], "kernel_acc_delta_pts": kern["acc_delta_min_pts"],
                     "kernel_gates": kern["gates"], "int8_p50_ms": p50["int8"], "fp32_p50_ms": p50["fp32"],
                     "x_fp32": p50["fp32"] / p50["int8"]})
        report["variants"][v] = {"config": cfg.to_dict(), "which": which,
                                 "weights": "tuned" if tag else "bundle", "quantized_nodes": only,
                                 "excluded_nodes": info["nodes_excluded"], "grid": grid, "kernels": kern,
                                 "latency_ms": ms, "quantize_s": round(tq, 1)}
        print(f"[{i}/{len(runs)}] {v}: grid cos {grid['cos']:.4f} ({grid['gates']}), kernels cos "
              f"{kern['cos']:.4f} ({kern['gates']}), x{rows[-1]['x_fp32']:.2f} FP32", flush=True)
    report["rows"] = rows
    print(format_table(rows, title=f"all-INT8 anatomy: {a.bundle} ({len(ev)} views, {a.threads} threads; grid = "
                                   f"QDQ as float arithmetic, kernels = this CPU's integer kernels)"))
    write_json(a.json, report)
    print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
