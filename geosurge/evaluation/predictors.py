"""What ``geosurge eval`` evaluates: a checkpoint through torch, or a bundle through the torch-free runtime (any
backend). Both answer the same question: decoded RGB images -> predicted (lat, lon) of the top finest cell by the
hierarchical product, single centre crop or TenCrop (the paper's protocol: per-level probabilities averaged over the
10 crops of ``geosurge.preprocess.ten_crop``, then the hierarchical product)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GeosurgeError


class Predictor:
    """``predict(rgbs, tencrop) -> (N, 2) float64 (lat, lon)`` for decoded HxWx3 uint8 RGB images; ``spec`` (the
    :class:`~geosurge.preprocess.PreprocessSpec` images are decoded and preprocessed by), ``label``, ``kind``,
    ``path``, ``describe()``, ``close()``."""

    kind = ""
    spec = None

    def predict(self, rgbs: list[np.ndarray], tencrop: bool = False) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind, "path": str(self.path)}

    def close(self) -> None:
        """Release what the predictor holds (a runtime backend); idempotent."""


class ConstantPredictor(Predictor):
    """One place for every image: a baseline (e.g. the prior's most likely cell, ``geosurge.geo`` hierarchy's
    finest cell holding most photos). Reads no pixels beyond the decode that accounts for the row."""

    kind = "baseline"

    def __init__(self, lat: float, lon: float, label: str):
        self.lat, self.lon, self.label, self.path = float(lat), float(lon), label, None

    def describe(self) -> dict:
        return {**super().describe(), "lat": self.lat, "lon": self.lon}

    def predict(self, rgbs, tencrop=False):
        return np.tile([self.lat, self.lon], (len(rgbs), 1)).astype(np.float64)


class TorchPredictor(Predictor):
    """A checkpoint (``GeoSurge.save_pretrained`` folder) or an in-memory GeoSurge (``checkpoint`` None), FP32
    torch on CPU."""

    kind = "checkpoint"

    def __init__(self, checkpoint, label: str | None = None, model=None):
        from ..models import GeoSurge

        self.path = Path(checkpoint) if checkpoint is not None else None
        self.model = (model if model is not None else GeoSurge.from_pretrained(self.path)).eval()
        self.spec = self.model.config.preprocess
        self.label = label or (self.path.name if self.path else self.model.config.name)

    def predict(self, rgbs, tencrop=False):
        import torch

        from ..preprocess import preprocess, ten_crop

        if tencrop:
            x = np.concatenate([ten_crop(im, self.spec) for im in rgbs])
        else:
            x = np.stack([preprocess(im, self.spec) for im in rgbs])
        with torch.no_grad():
            out = self.model.predict(torch.from_numpy(x), top_k=1, crops_per_image=10 if tencrop else 1)
        return out["latlon"][:, 0].double().numpy()


class BundlePredictor(Predictor):
    """A bundle through ``geosurge.runtime.Localizer`` (checksums verified on load) and one backend. Single crop:
    the runtime's own prediction (``Localizer.predict_embedding``); TenCrop: the bundle's cell scorer with
    per-level probabilities averaged over the crops."""

    kind = "bundle"

    def __init__(self, bundle, backend: str | None = None, threads: int | None = None, label: str | None = None):
        from ..runtime import Localizer

        self.loc = Localizer(bundle, backend=backend, threads=threads)
        self.path = self.loc.bundle.root
        self.backend = str(self.loc.runner.name)
        self.spec = self.loc.spec
        self.label = label or f"{self.path.name} ({self.backend})"

    def describe(self) -> dict:
        m = self.loc.bundle.manifest
        return {**super().describe(), "backend": self.backend, "precision": m.model.precision.value,
                "config": m.source.config if m.source else m.model.config.get("name")}

    def close(self) -> None:
        self.loc.close()

    def predict(self, rgbs, tencrop=False):
        from ..preprocess import preprocess, ten_crop

        out = np.empty((len(rgbs), 2))
        if not tencrop:
            emb = self.loc.embed(np.stack([preprocess(im, self.spec) for im in rgbs]))
            for i, e in enumerate(emb):
                p = self.loc.predict_embedding(e, top_k=1)
                out[i] = p["lat"], p["lon"]
            return out
        sc = self.loc.scorer
        for i, im in enumerate(rgbs):
            emb = self.loc.embed(ten_crop(im, self.spec))
            lps = [np.log(np.exp(lp).mean(axis=0, keepdims=True)) for lp in sc.level_log_probs(emb)]
            best = int(np.argmax(sc.hierarchical_scores(lps)[0]))
            out[i] = sc.rep_lat[best], sc.rep_lon[best]
        return out


def load_predictor(path, backend: str | None = None, threads: int | None = None,
                   label: str | None = None) -> Predictor:
    """A bundle folder (has ``manifest.json``; ``backend`` None: the one its format implies) ->
    :class:`BundlePredictor`; a checkpoint folder (``config.json`` +
    ``model.safetensors``) -> :class:`TorchPredictor`. Raises GeosurgeError for anything else."""
    import os

    if not isinstance(path, (str, os.PathLike)):  # an in-memory GeoSurge
        return TorchPredictor(None, label or f"{path.config.name} (in memory)", model=path)
    p = Path(path)
    if (p / "manifest.json").is_file():
        return BundlePredictor(p, backend, threads, label)
    if (p / "config.json").is_file():
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchPredictor(p, label)
    raise GeosurgeError(f"{p}: neither a bundle (manifest.json) nor a checkpoint (config.json) folder")
