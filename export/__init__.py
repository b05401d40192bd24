"""geosurge.export: a model -> a bundle (needs torch). ``geosurge.api.export`` is the entry point.

``target`` the export-target interface and its table; ``onnxruntime`` / ``tensorrt`` / ``coreml`` one module per
target; ``wrapper`` the one trace-only export wrapper; ``onnx`` torch -> FP32 ONNX; ``precision`` quantization, one
idea per module; ``bundle`` ``write_bundle`` (assembles); ``writer`` ``BundleWriter`` (stage, checksums, swap);
``prune`` cutting a bundle's hierarchy; ``compare`` parity against the FP32 model; ``source`` the source model;
``places`` offline place names. See docs/architecture.md.
"""
