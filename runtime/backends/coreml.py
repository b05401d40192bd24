"""Core ML runner (coremltools ``MLModel.predict``; macOS only — Core ML has no Linux runtime).

The package's input is an image (the manifest's normalisation is inside the model), so preprocessed tensors are
turned back into 0..255 RGB pixels before ``predict``, as an app hands the model a ``CVPixelBuffer``.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np

from geosurge.formats import Backend

from . import BackendUnavailable, Runner


class CoreMLRunner(Runner):
    """coremltools MLModel on the Core ML framework (CPU / GPU / Neural Engine by ``compute_units``)."""

    name = Backend.COREML
    no_threads_reason = ("Core ML schedules its own CPU / GPU / Neural Engine work; choose compute units instead "
                         "(CoreMLRunner(..., compute_units='CPU_ONLY'))")

    def __init__(self, model_path: Path, spec, threads: int | None = None, compute_units: str = "ALL"):
        self.check_threads(threads)
        if sys.platform != "darwin":
            raise BackendUnavailable(f"{model_path}: Core ML predicts only on macOS (this is {platform.system()}); "
                                     "on this machine use the onnxruntime backend with an ONNX bundle, or inspect "
                                     "the package with coremltools")
        try:  # imported here: the runtime imports coremltools only when this backend is chosen
            import coremltools as ct
        except ImportError:
            raise BackendUnavailable("the coreml backend needs coremltools (pip install coremltools)") from None
        self.spec = spec
        self.model = ct.models.MLModel(str(model_path), compute_units=getattr(ct.ComputeUnit, compute_units))
        description = self.model.get_spec().description
        self.input_names = [i.name for i in description.input]
        self.output_names = [o.name for o in description.output]

    @classmethod
    def open(cls, bundle, threads: int | None = None, **options) -> "CoreMLRunner":
        cls.check_options(options)
        return cls(bundle.path("model"), bundle.preprocess, threads=threads)

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """(3, S, S) normalised -> (S, S, 3) uint8 RGB."""
        rgb = x.transpose(1, 2, 0) * np.asarray(self.spec.std, np.float32) + np.asarray(self.spec.mean, np.float32)
        return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        self._check_open()
        (name, x), = feed.items()
        outs = {n: [] for n in self.output_names}
        for xi in np.asarray(x, np.float32):
            res = self.model.predict({name: Image.fromarray(self.to_pixels(xi))})
            for n in self.output_names:
                outs[n].append(np.asarray(res[n], np.float32).reshape(-1))
        return {n: np.stack(v) for n, v in outs.items()}

    def _release(self) -> None:
        self.model = None
