"""torch -> FP32 ONNX, the first step of both ONNX targets (onnxruntime and TensorRT).

The graph takes the preprocessed image and returns the L2-normalised fused embedding (optionally the per-level
logits too): :class:`geosurge.export.wrapper.ExportWrapper`. One self-contained file at opset >= 17, every
``nn.LayerNorm`` one ``LayerNormalization`` op, ``onnx.checker`` with ``full_check``, and declared output shapes
(``[1, D]`` for a static batch, ``["batch", D]`` for a dynamic one) whatever the exporter inferred.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from geosurge.errors import GeosurgeError
from geosurge.formats import Format
from geosurge.manifest import IOSection, ModelSection, TensorInfo

from .target import DEFAULT_OPSET
from .wrapper import INPUT_NAME, ExportWrapper, output_dims, output_names

BATCH_AXIS = "batch"


def export_onnx(model, path: Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                with_logits: bool = False, log=print) -> dict:
    """Export and check; returns facts for the manifest (opset, op histogram, LayerNorm counts, output names and
    shapes, seconds, bytes). Raises GeosurgeError for opset < 17, external data or a split LayerNorm."""
    import onnx

    if opset < 17:
        raise GeosurgeError("opset must be >= 17 (LayerNormalization as one op)")
    path = Path(path)
    model = model.eval()
    size = model.config.preprocess.size
    x = torch.zeros(1, 3, size, size)
    names = output_names(model, with_logits)
    dyn = {n: {0: BATCH_AXIS} for n in [INPUT_NAME, *names]} if dynamic_batch else None
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter writes one self-contained file at opset 17 (dynamo=True forces opset 18
        # and writes the weights to a separate .onnx.data file by default)
        # the wrapper in eval mode: the exporter puts the module it is given back into the mode it had, recursively
        # (a new nn.Module is in training mode, which left the caller's model training after an export)
        torch.onnx.export(ExportWrapper(model, with_logits).eval(), (x,), str(path), input_names=[INPUT_NAME],
                          output_names=names, opset_version=opset, dynamic_axes=dyn, do_constant_folding=True,
                          dynamo=False)
    dt = time.perf_counter() - t0
    proto = onnx.load(str(path))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise GeosurgeError(f"{path}: export wrote external data; expected one self-contained file")
    shapes = [[BATCH_AXIS if dynamic_batch else 1, d] for d in output_dims(model, with_logits)]
    declare_output_shapes(proto, shapes)
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)  # strict shape inference: the declared shapes must agree
    ops = Counter(n.op_type for n in proto.graph.node)
    n_ln_modules = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    facts = {"opset": opset, "ops": dict(ops.most_common()), "layernorm_modules": n_ln_modules,
             "layernorm_ops": ops.get("LayerNormalization", 0), "export_seconds": round(dt, 2),
             "bytes": path.stat().st_size, "dynamic_batch": dynamic_batch, "outputs": names,
             "output_shapes": shapes, "input_hw": [size, size]}
    if facts["layernorm_ops"] < n_ln_modules:
        raise GeosurgeError(f"{path}: {n_ln_modules} LayerNorm modules but only {facts['layernorm_ops']} "
                            "LayerNormalization ops (split LayerNorm overflows in FP16 on TensorRT)")
    check_loads(path)
    log(f"FP32 ONNX: opset {opset}, {sum(ops.values())} nodes, {facts['layernorm_ops']} LayerNormalization "
        f"(= {n_ln_modules} LayerNorm modules), checker full_check ok, {facts['bytes'] / 1e6:.1f} MB in {dt:.1f}s")
    return facts


def check_loads(path: Path) -> None:
    """The exported graph must open in onnxruntime: the device runtime's base backend and the reference ``verify``
    and the parity checks run on. Raises GeosurgeError naming the file and what onnxruntime refused (e.g. an op it
    has no kernel for), so a bundle that cannot run is never written."""
    from geosurge.runtime.backends import BackendUnavailable
    from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    try:
        OnnxRuntimeRunner(path, threads=1).close()
    except BackendUnavailable as e:
        raise GeosurgeError(f"{e}; the model does not export to a graph the runtime can run (a OneFormer segmenter's "
                            "deformable attention is one such case: distil it into the edge student)") from None


def declare_output_shapes(proto, shapes: list[list]) -> None:
    """Set each graph output's declared shape (ints, or a name for a dynamic axis). The TorchScript exporter leaves
    names such as ``Divembedding_dim_0`` where its shape inference lost track (timm's "same" padding computes
    shapes at run time), and a static-batch model must say ``[1, D]``."""
    for out, shape in zip(proto.graph.output, shapes):
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dim = dims.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def onnx_sections(model, facts: dict, spec, precision) -> tuple[ModelSection, IOSection]:
    """The manifest's model and io sections for an ONNX model part (both ONNX targets)."""
    size = model.config.preprocess.size
    batch = BATCH_AXIS if facts["dynamic_batch"] else 1
    io = IOSection(inputs=[TensorInfo(INPUT_NAME, "float32", [batch, 3, size, size], "NCHW")],
                   outputs=[TensorInfo(n, "float32", list(s)) for n, s in zip(facts["outputs"], facts["output_shapes"])])
    section = ModelSection(format=Format.ONNX, precision=precision, target=spec.target, config=model.config.to_dict(),
                           opset=facts["opset"], layernorm_ops=facts["layernorm_ops"])
    return section, io


def onnx_versions() -> dict:
    import onnx
    from geosurge.privacy import import_onnxruntime

    onnxruntime = import_onnxruntime()

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "exporter": "torch.onnx (TorchScript-based)"}
