"""Inference backends behind one small interface: ``Backend(model_path, **options).run(x) -> {name: array}``.

Backends are looked up by name and import their library only when chosen, so the runtime needs just one of them.
``open_backend(name, bundle, threads)`` builds one for a bundle (a backend may read more of the bundle than the model
path: the TensorRT plan beside it, the preprocessing Core ML's image input needs).
"""
from __future__ import annotations

from importlib import import_module

from geosurge.errors import GeosurgeError

BACKENDS = {
    "onnxruntime": "geosurge.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "geosurge.runtime.backends.tensorrt:TensorRTBackend",
    "coreml": "geosurge.runtime.backends.coreml:CoreMLBackend",
}


class BackendUnavailable(GeosurgeError):
    """The backend's library or hardware is not here (TensorRT without a GPU, Core ML off macOS)."""


def get_backend(name: str):
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None
    return getattr(import_module(module), cls)


def open_backend(name: str, bundle, threads: int | None = None):
    cls = get_backend(name)
    if hasattr(cls, "from_bundle"):
        return cls.from_bundle(bundle, threads=threads)
    return cls(bundle.path("model"), threads=threads)
