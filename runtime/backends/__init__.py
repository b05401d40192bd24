"""Inference backends behind one small interface: ``Backend(model_path, **options).run(x) -> {name: array}``.

Backends are looked up by name and import their library only when chosen, so the runtime needs just one of them.
"""
from __future__ import annotations

from importlib import import_module

BACKENDS = {
    "onnxruntime": "geosurge.runtime.backends.onnxruntime:OnnxRuntimeBackend",
}


def get_backend(name: str):
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None
    return getattr(import_module(module), cls)
