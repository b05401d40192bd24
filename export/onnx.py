"""ONNX export: the graph takes the preprocessed image and returns the L2-normalised fused embedding (the runtime
scores the cells, so the hierarchy can be pruned without re-export); optionally the per-level logits too."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from geosurge.errors import GeosurgeError

DEFAULT_OPSET = 17


class EmbeddingExport(nn.Module):
    """Export wrapper: image -> embedding (+ per-level logits)."""

    def __init__(self, model, with_logits: bool = False):
        super().__init__()
        self.model = model
        self.with_logits = with_logits

    def forward(self, image: torch.Tensor):
        emb = self.model.embed(image)
        if not self.with_logits:
            return emb
        return (emb, *self.model.head.level_logits(emb))


def output_names(model, with_logits: bool) -> list[str]:
    return ["embedding"] + ([f"logits_{k}" for k in range(model.head.num_levels)] if with_logits else [])


def export_onnx(model, path: Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                with_logits: bool = False, log=print) -> dict:
    """Export and check; returns facts for the manifest. Writes one self-contained file (no external data)."""
    import onnx

    if opset < 17:
        raise GeosurgeError("opset must be >= 17 (LayerNormalization as one op)")
    model = model.eval()
    size = model.config.preprocess.size
    x = torch.zeros(1, 3, size, size)
    names = output_names(model, with_logits)
    dyn = {n: {0: "batch"} for n in ["image", *names]} if dynamic_batch else None
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter writes one self-contained file at opset 17 (dynamo=True forces opset 18
        # and external data by default; see TOOLCHAIN.md)
        torch.onnx.export(EmbeddingExport(model, with_logits), (x,), str(path), input_names=["image"],
                          output_names=names, opset_version=opset, dynamic_axes=dyn, do_constant_folding=True,
                          dynamo=False)
    dt = time.perf_counter() - t0
    proto = onnx.load(str(path))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise GeosurgeError(f"{path}: export wrote external data; expected one self-contained file")
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    n_ln_modules = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    facts = {"opset": opset, "ops": dict(ops.most_common()), "layernorm_modules": n_ln_modules,
             "layernorm_ops": ops.get("LayerNormalization", 0), "export_seconds": round(dt, 2),
             "bytes": path.stat().st_size, "dynamic_batch": dynamic_batch, "outputs": names,
             "input_hw": [size, size]}
    if facts["layernorm_ops"] < n_ln_modules:
        raise GeosurgeError(f"{path}: {n_ln_modules} LayerNorm modules but only {facts['layernorm_ops']} "
                            "LayerNormalization ops (split LayerNorm overflows in FP16 on TensorRT)")
    log(f"ONNX: opset {opset}, {sum(ops.values())} nodes, {facts['layernorm_ops']} LayerNormalization "
        f"(= {n_ln_modules} LayerNorm modules), checker full_check ok, {facts['bytes'] / 1e6:.1f} MB in {dt:.1f}s")
    return facts
