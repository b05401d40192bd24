"""Precision for ONNX model parts, one idea per module:

===============  ===================================================================================================
module           what
===============  ===================================================================================================
config           ``QuantConfig`` and the op-type policy (what is quantized, what stays float)
graph            reading / editing the ONNX graph: quantizable nodes, clamps, toposort, weight-only INT8, float inputs
ort_static       onnxruntime static INT8 (QDQ) with ``quant_pre_process`` and a shared calibration-range cache
ort_dynamic      onnxruntime dynamic INT8 (MatMul)
bias_correction  the mean output error of INT8 weights moved into the biases (FP32 input means per kernel tap)
fp16             FP16 weights and compute, float32 I/O, LayerNorm kept float32
search           the measured precision search (per-node sensitivity, exclude the worst until the gates pass)
===============  ===================================================================================================

Which precision a target takes is ``geosurge.formats``; the onnxruntime target strings these together
(``geosurge.export.onnxruntime``), the TensorRT target uses ``fp16`` and nvidia-modelopt (``geosurge.export.tensorrt``).
"""
from .config import CALIBRATION_METHODS, QuantConfig
from .fp16 import convert_fp16
from .search import PrecisionSearchFailed, Quantizer, run_embeddings, search_precision

__all__ = ["CALIBRATION_METHODS", "QuantConfig", "convert_fp16", "PrecisionSearchFailed", "Quantizer",
           "run_embeddings", "search_precision"]
