"""geosurge.calibration: calibration sets for quantizers (selection, caching, feeders)."""
from .dataset import CalibrationSet, build_calibration_set, sample_views_set, selection_order

__all__ = ["CalibrationSet", "build_calibration_set", "sample_views_set", "selection_order"]
