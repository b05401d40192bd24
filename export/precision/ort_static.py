"""onnxruntime static INT8 (QDQ): ``quant_pre_process``, calibration through a shared range cache, the op-type policy
of :mod:`.config`, then float inputs rewired for the ops that must read float."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import FLOAT_INPUT_OP_TYPES, FLOAT_OUTPUT_OP_TYPES, STATIC_OP_TYPES, QuantConfig
from .graph import always_float_nodes, float_inputs, with_followers

if TYPE_CHECKING:
    import numpy as np

    from geosurge.calibration.dataset import CalibrationSet


def _ort_types(cfg: QuantConfig):
    from onnxruntime.quantization import CalibrationMethod, QuantType

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}
    return qt[cfg.activation_type], qt[cfg.weight_type], cm[cfg.calibrate_method]


@contextlib.contextmanager
def _in_dir(path: Path):
    """quant_pre_process leaves temp files in the working directory when it fails: run it inside ``path``."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def prepare(src: Path, dst: Path) -> Path:
    """onnxruntime's ``quant_pre_process`` (graph optimisation + ONNX shape inference; its symbolic shape inference
    fails on these graphs, so it is skipped). Node names of the prepared graph are the ones quantization uses."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).absolute(), Path(dst).absolute()
    with _in_dir(dst.parent):
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantize_int8_static(prepared: Path, dst: Path, calib: CalibrationSet | np.ndarray | None, cfg: QuantConfig,
                         exclude: list[str] = (), cache: Path | None = None, only: list[str] | None = None) -> dict:
    """Static QDQ INT8 (per-channel weights). ``cache``: onnxruntime's JSON calibration cache, so repeated
    quantizations of the same graph (the precision search) calibrate once. ``only``: quantize just these nodes.
    ``calib``: the calibration images (a set, preprocessed a batch at a time, or float32 model inputs); None with a
    filled ``cache``."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from geosurge.calibration.dataset import make_ort_reader

    act, wt, method = _ort_types(cfg)
    prepared, dst = Path(prepared).absolute(), Path(dst).absolute()
    cache = Path(cache).absolute() if cache else None
    always = sorted(always_float_nodes(prepared))
    excluded = sorted(set(with_followers(prepared, list(exclude))) | set(always))
    with tempfile.TemporaryDirectory(prefix="geosurge-quant-") as td, _in_dir(Path(td)):
        quantize_static(str(prepared), str(dst), make_ort_reader(calib) if calib is not None else None,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OP_TYPES),
                        per_channel=cfg.per_channel, activation_type=act, weight_type=wt,
                        calibrate_method=method, nodes_to_exclude=excluded,
                        nodes_to_quantize=with_followers(prepared, only) if only else None,
                        calibration_cache_path=str(cache) if cache else None, reduce_range=cfg.reduce_range,
                        extra_options={"OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT_OP_TYPES)})
    rewired = float_inputs(dst, FLOAT_INPUT_OP_TYPES)
    # (the settings it ran with — per_channel, types, reduce_range, calibrate_method — are the record's config)
    return {"quantizer": "onnxruntime.quantization.quantize_static (QDQ)", "op_types": list(STATIC_OP_TYPES),
            # every node onnxruntime was told to leave float: the ones asked (--exclude-nodes, the search's), the
            # nodes that follow them, and those always float here
            "nodes_excluded": excluded, "nodes_excluded_asked": sorted(set(exclude)), "nodes_always_float": always,
            "float_output_op_types": list(FLOAT_OUTPUT_OP_TYPES), "float_input_op_types": list(FLOAT_INPUT_OP_TYPES),
            "float_inputs_rewired": rewired}
