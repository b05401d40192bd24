"""geosurge.calibration: calibration sets for quantizers (selection, caching, feeders)."""
from .dataset import CalibrationSet, build_calibration_set, selection_order

__all__ = ["CalibrationSet", "build_calibration_set", "selection_order"]
