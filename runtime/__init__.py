"""geosurge.runtime: what runs on the device. numpy + OpenCV + one backend; never imports torch, timm or
transformers (a test runs it in a process where importing torch raises)."""
from geosurge import __version__

from .bundle import Bundle, BundleError, open_bundle
from .cells import CellScorer
from .localizer import Localizer

__all__ = ["__version__", "Bundle", "BundleError", "open_bundle", "CellScorer", "Localizer"]
