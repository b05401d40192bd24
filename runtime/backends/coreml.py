"""Core ML backend (coremltools ``MLModel.predict``; macOS only — Core ML has no Linux runtime).

The package's input is an image (the manifest's normalisation is inside the model), so preprocessed tensors are
turned back into 0..255 RGB pixels before ``predict``, as an app hands the model a ``CVPixelBuffer``.
"""
from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

import numpy as np

from . import BackendUnavailable


class CoreMLBackend:
    name = "coreml"

    def __init__(self, model_path: Path, threads: int | None = None, spec=None, compute_units: str = "ALL"):
        if sys.platform != "darwin":
            raise BackendUnavailable(f"{model_path}: Core ML predicts only on macOS (this is {platform.system()}); "
                                     "on this machine use the onnxruntime backend with an ONNX bundle, or inspect "
                                     "the package with coremltools")
        try:  # imported by name: the runtime never imports coremltools unless this backend is chosen
            ct = importlib.import_module("coremltools")
        except ImportError:
            raise BackendUnavailable("the coreml backend needs coremltools (pip install coremltools)") from None
        if spec is None:
            raise BackendUnavailable("the coreml backend needs the bundle's preprocessing spec")
        self.spec = spec
        self.model = ct.models.MLModel(str(model_path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.outputs = [o.name for o in self.model.get_spec().description.output]

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None):
        return cls(bundle.path("model"), threads=threads, spec=bundle.preprocess)

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """(3, S, S) normalised -> (S, S, 3) uint8 RGB."""
        rgb = x.transpose(1, 2, 0) * np.asarray(self.spec.std, np.float32) + np.asarray(self.spec.mean, np.float32)
        return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image

        outs = {n: [] for n in self.outputs}
        for xi in np.asarray(x, np.float32):
            res = self.model.predict({"image": Image.fromarray(self.to_pixels(xi))})
            for n in self.outputs:
                outs[n].append(np.asarray(res[n], np.float32).reshape(-1))
        return {n: np.stack(v) for n, v in outs.items()}
