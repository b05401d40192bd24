"""Export target ``tensorrt``: the TensorRT-bound ONNX (the engine itself is built on the device:
``geosurge-run build-engine``).

fp32 / fp16 ONNX, or INT8 / FP8 QDQ ONNX from nvidia-modelopt's ONNX PTQ (its MHA QDQ is
disabled: it gave the attention softmax a fixed 1/127 scale, which wrecked the output, embedding cosine 0.31;
float parts in fp16). Every
TensorRT-bound model gets a readiness report: opset in TensorRT 10's range, every op parseable, LayerNormalization
fused, QDQ placement, static shapes, no external data.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Precision, Target
from geosurge.manifest import MODEL_FILES, QuantizationSection

from .onnx import export_onnx, onnx_sections, onnx_versions
from .target import ExportJob, ExportTarget, TargetOutput
from .wrapper import INPUT_NAME

#: TensorRT 10.x parses ONNX opsets 9..20 (onnx-tensorrt docs/operators.md for TensorRT 10.0)
TRT_OPSET_RANGE = (9, 20)
#: ONNX ops the TensorRT 10 ONNX parser handles (from onnx-tensorrt's operator support matrix; the subset a vision
#: transformer / convnet export can contain)
TRT10_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal
Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GroupNormalization GRU HardSigmoid HardSwish Identity If InstanceNormalization
IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul
Max MaxPool Mean Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round Scan ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Where Xor
""".split())
#: ops no TensorRT parser takes: onnxruntime's integer / QOperator forms (TensorRT wants QDQ)
TRT_UNSUPPORTED_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearConv",
                                 "QLinearMatMul", "QLinearAdd", "QGemm"})
QUANTIZED_COMPUTE = ("Conv", "MatMul", "Gemm", "ConvTranspose")
MODELOPT_METHODS = {"minmax": "max", "entropy": "entropy"}


class TensorRTTarget(ExportTarget):
    target = Target.TENSORRT

    def export(self, model, job: ExportJob) -> TargetOutput:
        o = job.options
        fp32 = job.workdir / "model-fp32.onnx"
        facts = export_onnx(model, fp32, opset=o.opset, dynamic_batch=o.dynamic_batch, with_logits=o.with_logits,
                            log=job.log)
        name = MODEL_FILES[o.spec.format]
        record = apply_tensorrt_precision(fp32, job.stage / name, o.quant, job.workdir, job.calibration, log=job.log)
        section, io = onnx_sections(model, facts, o.spec, o.precision)
        versions = onnx_versions()
        if o.precision.needs_calibration:
            from importlib.metadata import version

            versions["nvidia-modelopt"] = version("nvidia-modelopt")
        return TargetOutput(name, section, io, QuantizationSection.from_dict(record, "quantization"), versions)


def apply_tensorrt_precision(fp32: Path, dst: Path, cfg, workdir: Path, calibration=None, log=print) -> dict:
    """FP32 ONNX -> the TensorRT-bound ONNX at ``cfg.precision`` plus its readiness report. ``calibration``: the
    CalibrationSet modelopt calibrates on (int8 / fp8). Raises GeosurgeError when the ONNX is not TensorRT-ready."""
    import shutil

    from .precision import convert_fp16

    t0 = time.perf_counter()
    record: dict = {"precision": cfg.precision, "target": Target.TENSORRT.value,
                    "config": cfg.record(Target.TENSORRT.value)}
    if cfg.precision == Precision.FP32:
        shutil.copyfile(fp32, dst)
        record["builder"] = {"flags": []}
    elif cfg.precision == Precision.FP16:
        record.update(convert_fp16(fp32, dst))
        record["builder"] = {"flags": ["FP16"], "note": "typed FP16 ONNX: TensorRT 11 builds it strongly typed; "
                                                        "TensorRT 10 with the FP16 flag"}
    else:  # int8 / fp8 (the precisions geosurge.formats gives this target)
        if calibration is None:
            raise GeosurgeError(f"--target tensorrt --precision {cfg.precision} needs a calibration set")
        from .precision.graph import check_node_names

        check_node_names(fp32, cfg.nodes_to_exclude)
        record.update(modelopt_quantize(fp32, dst, cfg, calibration, workdir, log))
        record["bias_correction"] = {"applied": False,
                                     "why": "onnxruntime target only (modelopt writes its own QDQ graph)"}
        record["builder"] = {"flags": ["FP16", cfg.precision.upper()], "note": "QDQ network: TensorRT 10 builds "
                             "it with INT8/FP8 + FP16 flags, TensorRT 11 strongly typed"}
    record["readiness"] = readiness_report(dst, expect_layernorm=_count(fp32, "LayerNormalization"))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [c for c in record["readiness"]["checks"] if c["status"] == "FAIL"]
    for c in record["readiness"]["checks"]:
        log(f"TensorRT readiness: {c['check']:<22s} {c['status']:<4s} {c['detail']}")
    if failed:
        raise GeosurgeError(f"{dst.name}: not TensorRT-ready: " + "; ".join(f"{c['check']}: {c['detail']}"
                                                                           for c in failed))
    return record


def modelopt_quantize(fp32: Path, dst: Path, cfg, calibration, workdir: Path, log=print) -> dict:
    """modelopt ONNX PTQ (in a child process, see ``modelopt_worker``)."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("modelopt") is None:
        raise GeosurgeError("--target tensorrt int8/fp8 needs nvidia-modelopt (pip install 'geosurge[toolkit]')")
    method = MODELOPT_METHODS.get(cfg.calibrate_method)
    if method is None:
        raise GeosurgeError(f"modelopt calibrates with {', '.join(MODELOPT_METHODS)}, not {cfg.calibrate_method}")
    log(f"modelopt ONNX PTQ {cfg.precision} ({method} calibration on {len(calibration)} images, MHA QDQ "
        "disabled, float parts fp16) ...")
    np.save(workdir / "calibration.npy", calibration.modelopt_input())
    job = {"onnx_path": str(fp32), "mode": cfg.precision, "calibration_npy": str(workdir / "calibration.npy"),
           "input_name": INPUT_NAME,
           "method": method, "output_path": str(dst), "nodes_to_exclude": list(cfg.nodes_to_exclude)}
    (workdir / "modelopt-job.json").write_text(json.dumps(job))
    r = subprocess.run([sys.executable, "-m", "geosurge.export.modelopt_worker", str(workdir / "modelopt-job.json")],
                       capture_output=True, text=True)
    if r.returncode != 0 or not dst.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise GeosurgeError(f"modelopt quantization failed (exit {r.returncode}):\n{tail}")
    return {"quantizer": "nvidia-modelopt onnx PTQ", "calibrate_method": method, "disable_mha_qdq": True,
            "high_precision_dtype": "fp16", "nodes_excluded": list(cfg.nodes_to_exclude)}


def _count(path: Path, op: str) -> int:
    import onnx

    return sum(n.op_type == op for n in onnx.load(str(path), load_external_data=False).graph.node)


def readiness_report(path: Path, expect_layernorm: int | None = None) -> dict:
    """What a TensorRT 10/11 parser and builder need from the ONNX, checked without TensorRT."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    ops = Counter(n.op_type for n in g.node)
    checks = []

    def add(name, ok, detail, warn=False):
        checks.append({"check": name, "status": "PASS" if ok else ("WARN" if warn else "FAIL"), "detail": detail})

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = TRT_OPSET_RANGE
    add("opset", opset is not None and lo <= opset <= hi, f"opset {opset} (TensorRT 10 parses {lo}..{hi})")
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx")})
    bad = sorted(set(ops) & TRT_UNSUPPORTED_OPS)
    unknown = sorted(set(ops) - TRT10_SUPPORTED_OPS - TRT_UNSUPPORTED_OPS)
    add("op coverage", not foreign and not bad,
        f"{len(ops)} op types; " + (f"unsupported: {', '.join(foreign + bad)}" if foreign or bad
                                    else "all in TensorRT 10's ONNX support matrix"))
    if unknown:
        add("op coverage (unlisted)", False, f"not in our TensorRT 10 list, check: {', '.join(unknown)}", warn=True)
    n_ln = ops.get("LayerNormalization", 0)
    split_ln = ops.get("ReduceMean", 0) >= 2 and ops.get("Pow", 0) >= 1 and n_ln == 0
    ok_ln = not split_ln and (expect_layernorm is None or n_ln >= expect_layernorm)
    add("fused LayerNorm", ok_ln, f"{n_ln} LayerNormalization op(s)"
        + (f" (expected {expect_layernorm})" if expect_layernorm is not None else "")
        + ("; split LayerNorm (ReduceMean/Pow) overflows in FP16" if split_ln else ""))
    add("QDQ placement", *_qdq_check(g))
    dyn = []
    for i in list(g.input):
        dims = i.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            dyn.append(i.name)
    add("static shapes", not dyn, "all inputs static" if not dyn else
        f"dynamic input(s) {', '.join(dyn)}: build with an optimization profile (--min/--opt/--max shapes)",
        warn=True)
    ext = [t.name for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    add("single file", not ext, "weights inside the .onnx" if not ext else f"{len(ext)} external tensors")
    i64 = sum(t.data_type == onnx.TensorProto.INT64 for t in g.initializer)
    return {"opset": opset, "ops": dict(ops.most_common()), "int64_initializers": int(i64), "checks": checks,
            "ready": all(c["status"] != "FAIL" for c in checks)}


def _qdq_check(g) -> tuple[bool, str]:
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    if not q and not dq:
        return True, "no QDQ (float network)"
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    orphan_q = [n.name for n in q if not all(c.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], []))]
    quantized = Counter()
    softmax_q = 0
    for n in dq:
        for c in consumers.get(n.output[0], []):
            if c.op_type in QUANTIZED_COMPUTE:
                quantized[c.name] += 1
            if c.op_type == "Softmax":
                softmax_q += 1
    nonzero_zp = 0
    inits = {t.name: t for t in g.initializer}
    from onnx import numpy_helper

    for n in q:
        if len(n.input) > 2 and n.input[2] in inits and np.any(numpy_helper.to_array(inits[n.input[2]]) != 0):
            nonzero_zp += 1
    problems = []
    if orphan_q:
        problems.append(f"{len(orphan_q)} QuantizeLinear not followed by DequantizeLinear")
    if nonzero_zp:
        problems.append(f"{nonzero_zp} non-zero zero points (TensorRT needs symmetric)")
    if softmax_q:
        problems.append(f"{softmax_q} quantized Softmax input(s)")
    detail = (f"{len(q)} Q / {len(dq)} DQ; {len(quantized)} compute op(s) with quantized inputs"
              + ("; " + "; ".join(problems) if problems else "; pairs well formed, symmetric, softmax in float"))
    return not problems, detail
