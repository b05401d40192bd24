"""The GeoSURGE model (needs torch): configs, backbones, segmenters, fusion, cell head.

``CONFIGS`` / ``get_config`` import no torch (the CLI reads the config names for its choices); ``GeoSurge`` and
``build_model`` import torch when first asked for."""
from .config import CONFIGS, GeoSurgeConfig, get_config

__all__ = ["CONFIGS", "GeoSurgeConfig", "get_config", "GeoSurge", "build_model"]


def __getattr__(name):  # PEP 562: torch is imported with the model classes, not with the config names
    if name in ("GeoSurge", "build_model"):
        from . import geosurge

        return getattr(geosurge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
