"""What a QAT student still pays for, node by node (docs/quantization.md): leave one node's quantizers out at a time.

The tuned weights of a QAT run (``geosurge export --qat --qat-save CKPT``) are trained for *every* node quantized,
so keeping a node float in them afterwards does not say what that node costs (the other nodes' weights compensate
for it: all nodes float in the tuned weights is far from FP32). This asks the trained student itself: with its
fake quantizers in onnxruntime's scheme (:func:`geosurge.export.precision.qat.insert_fake_quant`, the grid QAT
trained on and the export deploys; ranges observed on ``--calib-n`` images as onnxruntime's MinMax), each Conv /
Linear's quantizers (input, weight, the BatchNorm outputs it produces: what ``--exclude-nodes`` takes away) are
switched off one node at a time, and the embedding error against the FP32 teacher (1 - cosine, mean over
``--eval-n`` images) is measured. A node whose switch-off removes much of the error is one to keep float in the
next QAT (``--exclude-nodes NODE --qat``): its ONNX node name is printed for that.

    .venv/bin/python benchmarks/qat_residual.py BUNDLE --checkpoint CKPT --tuned QAT-CKPT --images IMAGES \\
        [--eval-n 128] [--calib-n 256] [--bits 7] [--threads 2] [--top 15] [--no-nodes] [--json FILE]

``BUNDLE``: the FP32 bundle of ``CKPT`` (its preprocessing and ONNX node names). ``IMAGES``: a manifest or folder
the QAT run did not train on; the first ``--eval-n`` are evaluated, the next ``--calib-n`` observe the ranges.
``--bits``: the weight grid QAT trained for (7: ``--reduce-range``); the nodes the QAT run kept float (recorded in
``QAT-CKPT``'s config) stay float. First a summary — the error with every quantizer on, with weights only (every
activation float), activations only (every weight float), none — then, unless ``--no-nodes``, the nodes. Prints a
table (largest share first), writes JSON (default ``benchmarks/results/qat_residual.json``); exit 0 (a measurement,
no gate). Cost: one pass over the evaluation images per Conv / Linear (~75 for the edge model: ~10 min for 128
images on 2 cores).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from geosurge.export.precision.qat import (compute_modules, insert_fake_quant, modules_of_onnx_nodes,
                                           observe_ranges, quantizer_groups)
from geosurge.export.source import load_model
from geosurge.images import load_image
from geosurge.models.geosurge import read_checkpoint_config
from geosurge.inputs import list_image_source
from geosurge.preprocess import preprocess
from geosurge.report import format_table, write_json
from geosurge.runtime import open_bundle


def onnx_names(model_path: Path, model) -> dict[str, str]:
    """torch module path -> ONNX node name, for the Conv / Gemm / MatMul nodes of the bundle's graph."""
    import onnx

    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    found = modules_of_onnx_nodes([n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")],
                                  compute_modules(model))
    return {mod: node for node, mod in found.items() if mod}


def error(student, teacher_emb, x, chunk: int = 32) -> float:
    """Mean 1 - cosine of the student's embeddings of ``x`` to the teacher's (both L2-normalised)."""
    import torch

    with torch.no_grad():
        emb = torch.cat([student.embed(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    return float((1 - (emb * teacher_emb).sum(-1)).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="the FP32 bundle of --checkpoint (preprocessing, ONNX node names)")
    ap.add_argument("--checkpoint", required=True, help="the FP32 model (the teacher)")
    ap.add_argument("--tuned", required=True, help="the QAT student's checkpoint (--qat-save)")
    ap.add_argument("--images", required=True, type=Path, help="a manifest or folder QAT did not train on")
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--calib-n", type=int, default=256)
    ap.add_argument("--bits", type=int, choices=(7, 8), default=7, help="weight grid QAT trained for (7: "
                    "--reduce-range)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=15, help="rows printed (the JSON has every node)")
    ap.add_argument("--no-nodes", action="store_true", help="only the summary: all quantized, weights only, "
                    "activations only, none (skips the one-pass-per-node loop)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/qat_residual.json"))
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    b = open_bundle(a.bundle)
    spec = b.manifest.preprocess
    paths, _, _ = list_image_source(a.images, "images")
    if len(paths) < a.eval_n + a.calib_n:
        raise SystemExit(f"{a.images}: {len(paths)} image(s), need --eval-n + --calib-n = {a.eval_n + a.calib_n}")
    t0 = time.time()
    x = torch.from_numpy(np.stack([preprocess(load_image(p, spec), spec) for p in paths[:a.eval_n + a.calib_n]]))
    ev, cal = x[:a.eval_n], x[a.eval_n:]
    teacher, _ = load_model(checkpoint=a.checkpoint)
    student, _ = load_model(checkpoint=a.tuned)
    with torch.no_grad():
        ref = torch.cat([teacher.embed(ev[i:i + 32]) for i in range(0, len(ev), 32)])
    # the nodes its QAT kept float (``--qat-save`` records them) stay float here too, as in the student it trained
    kept = (read_checkpoint_config(a.tuned)[0].get("qat") or {}).get("kept_float_nodes") or []
    exclude = sorted({m for m in modules_of_onnx_nodes(kept, compute_modules(student)).values() if m})
    acts = insert_fake_quant(student, a.bits, exclude)
    observe_ranges(student, acts, cal)  # also the first forward: each BatchNorm output learns its producer
    groups = quantizer_groups(student)
    names = onnx_names(b.path("model"), teacher)
    print(f"{len(ev)} evaluation + {len(cal)} calibration images, {len(groups)} quantized nodes "
          f"({time.time() - t0:.0f} s)", flush=True)

    base = error(student, ref, ev)

    def switched(qs, on: bool):
        for q in qs:
            q.enabled = on

    every = [q for qs in groups.values() for q in qs]
    switched(every, False)
    float_err = error(student, ref, ev)  # the tuned weights in float: what the quantizers are trained around
    switched(every, True)
    # which grid holds the error: weights rounded with every activation float, and the other way round
    weight_qs = [q for q in every if type(q).__name__ == "WeightQuant"]
    act_qs = [q for q in every if type(q).__name__ != "WeightQuant"]
    split = {}
    for label, off in (("weights_only", act_qs), ("activations_only", weight_qs)):
        switched(off, False)
        split[label] = error(student, ref, ev)
        switched(off, True)
    print(f"1 - cos: all quantized {base:.3e}; weights only (activations float) {split['weights_only']:.3e} "
          f"({len(weight_qs)} quantizers); activations only (weights float) {split['activations_only']:.3e} "
          f"({len(act_qs)}); none {float_err:.3e}", flush=True)
    rows = []
    for i, (mod, qs) in enumerate(() if a.no_nodes else groups.items(), 1):
        switched(qs, False)
        e = error(student, ref, ev)
        switched(qs, True)
        rows.append({"node": names.get(mod, ""), "module": mod, "quantizers": len(qs), "error_without": e,
                     "removed": base - e, "share": (base - e) / base if base > 0 else 0.0})
        if i % 10 == 0 or i == len(groups):
            print(f"  {i}/{len(groups)} nodes ({time.time() - t0:.0f} s)", flush=True)
    rows.sort(key=lambda r: -r["removed"])
    if rows:
        print(f"\nall quantized: 1 - cos {base:.3e}; every quantizer off (the tuned weights in float): "
              f"{float_err:.3e}")
        print(format_table([{"node": r["node"] or r["module"], "1 - cos without": f"{r['error_without']:.3e}",
                             "removed": f"{r['removed']:+.2e}", "share": f"{r['share']:+.1%}"}
                            for r in rows[:a.top]]))
        pos = sum(r["removed"] for r in rows if r["removed"] > 0)
        print(f"sum of the positive removals: {pos:.3e} ({pos / base:.0%} of the error, if they added up)")
    write_json(a.json, {"bundle": str(a.bundle), "checkpoint": a.checkpoint, "tuned": a.tuned,
                        "images": str(a.images), "eval_n": len(ev), "calib_n": len(cal), "bits": a.bits,
                        "threads": a.threads, "error_all_quantized": base, "error_tuned_float": float_err,
                        "error_weights_only": split["weights_only"],
                        "error_activations_only": split["activations_only"],
                        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                                    "torch": torch.__version__},
                        "seconds": round(time.time() - t0, 1), "nodes": rows})
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
