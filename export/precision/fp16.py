"""FP16 ONNX: FP16 weights and compute with float32 I/O; LayerNormalization kept in float32."""
from __future__ import annotations

from pathlib import Path

from .graph import toposort


def convert_fp16(src: Path, dst: Path) -> dict:
    """FP16 weights and compute with float32 I/O (onnxruntime.transformers' converter); LayerNormalization is kept
    in float32 (it overflows in FP16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                     op_block_list=["LayerNormalization"])
    toposort(proto.graph)  # the converter appends its input casts at the end of the node list
    onnx.save(proto, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return {"converter": "onnxruntime.transformers.float16", "kept_float32": ["LayerNormalization"]}
