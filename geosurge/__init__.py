"""geosurge: distil, quantise, export and run GeoSURGE image geo-localisation on devices.

Importing ``geosurge`` imports nothing heavy: the bundle contract (``geosurge.manifest``, ``geosurge.formats``),
``geosurge.geo`` and ``geosurge.runtime`` are numpy-only and run on a device without torch; the model, training and
export parts import torch when used. The Python API is ``geosurge.api`` (docs/api.md).
"""
__version__ = "0.1.0"

from geosurge.privacy import opt_out as _opt_out

# before any onnxruntime / openvino import: their usage telemetry off unless GEOSURGE_ALLOW_TELEMETRY=1
# (geosurge/privacy.py, docs/runtime.md "Privacy: no telemetry")
_opt_out()
