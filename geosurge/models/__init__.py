"""The GeoSURGE model (needs torch): configs, backbones, segmenters, fusion, cell head."""
from .config import CONFIGS, GeoSurgeConfig, get_config
from .geosurge import GeoSurge, build_model

__all__ = ["CONFIGS", "GeoSurgeConfig", "get_config", "GeoSurge", "build_model"]
