"""geosurge.runtime: what runs on the device. numpy + OpenCV + one backend; never imports torch, timm or
transformers (a test runs it in a process where importing torch raises, and another checks every import).

``Localizer`` locates images; ``open_bundle`` reads a bundle (its typed manifest: ``geosurge.manifest``);
``verify_bundle`` / ``bench_bundle`` are ``geosurge-run verify`` / ``bench`` as functions; backends are runners
(``geosurge.runtime.backends.open_runner``)."""
from geosurge import __version__

from .bench import bench_bundle
from .bundle import Bundle, BundleError, open_bundle
from .cells import CellScorer
from .localizer import Localizer
from .verify import verify_bundle

__all__ = ["__version__", "Bundle", "BundleError", "open_bundle", "CellScorer", "Localizer", "verify_bundle",
           "bench_bundle"]

