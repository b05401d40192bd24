"""onnxruntime dynamic INT8: weights quantized offline, activations at run time (MatMul; no calibration set)."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import DYNAMIC_OP_TYPES, QuantConfig
from .graph import always_float_nodes


def quantize_int8_dynamic(prepared: Path, dst: Path, cfg: QuantConfig, exclude: list[str] = (),
                          only: list[str] | None = None) -> dict:
    """Dynamic INT8: weights quantized offline, activations at run time (MatMul only, see DYNAMIC_OP_TYPES). No
    calibration set needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    always = sorted(always_float_nodes(prepared))
    excluded = sorted(set(exclude) | set(always))

    def renamed(names):  # a Gemm becomes "<name>_MatMul" inside quantize_dynamic
        return [m for n in names for m in (n, f"{n}_MatMul")]

    root = logging.getLogger()
    root.addFilter(_no_preprocess_advice)  # dynamic INT8 runs on the unfused export on purpose
    try:
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul"], per_channel=cfg.per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=renamed(excluded),
                         nodes_to_quantize=renamed(only) if only else None)
    finally:
        root.removeFilter(_no_preprocess_advice)
    # every node left float: the ones asked (--exclude-nodes, the search's) and those always float here (attention
    # MatMuls of two activations, the cell head); per_channel is the record's config
    return {"quantizer": "onnxruntime.quantization.quantize_dynamic", "op_types": list(DYNAMIC_OP_TYPES),
            "weight_type": "int8", "nodes_excluded": excluded, "nodes_excluded_asked": sorted(set(exclude)),
            "nodes_always_float": always}


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """Drops onnxruntime's "Please consider to run pre-processing before quantization" warning (logged on the root
    logger): the dynamic path quantizes the unfused export by design."""
    return "consider to run pre-processing" not in record.getMessage()
