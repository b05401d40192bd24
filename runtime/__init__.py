"""geosurge.runtime: what runs on the device. numpy + OpenCV + one backend; never imports torch, timm or
transformers (a test runs it in a process where importing torch raises)."""
from geosurge import __version__

__all__ = ["__version__"]
