"""Training data: a CSV manifest (path, lat, lon) -> preprocessed images + per-level cell labels."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputFileError
from ..geo import CellHierarchy
from ..images import load_image
from ..inputs import ImageManifest as Manifest, list_image_source, read_manifest  # noqa: F401 (re-exported)
from ..preprocess import PreprocessSpec, preprocess


class ManifestDataset(Dataset):
    """Items are ``(image (3,S,S) float32, labels (L,) int64)``, or ``None`` for an image that fails to decode
    (the collate function drops and counts it). Rows whose location no finest cell covers are left out up front
    (``self.uncovered``)."""

    def __init__(self, manifest: Manifest, hierarchy: CellHierarchy, spec: PreprocessSpec, augment: bool = False,
                 indices=None):
        labels = hierarchy.locate(manifest.lat, manifest.lon)
        covered = (labels >= 0).all(axis=1)
        idx = np.arange(len(manifest)) if indices is None else np.asarray(indices)
        self.uncovered = int((~covered[idx]).sum())
        self.indices = idx[covered[idx]]
        self.manifest = manifest
        self.labels = labels
        self.spec = spec
        self.augment = augment

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        try:
            rgb = load_image(self.manifest.paths[j], self.spec)  # decoded as the runtime decodes
        except InputFileError:
            return None
        if self.augment and np.random.random() < 0.5:
            rgb = np.ascontiguousarray(rgb[:, ::-1])
        x = torch.from_numpy(preprocess(rgb, self.spec))
        return x, torch.from_numpy(self.labels[j].copy())


def collate_skip_bad(items):
    """Stack the good items; report how many failed to decode."""
    good = [it for it in items if it is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, bad
    xs, ys = zip(*good)
    return torch.stack(xs), torch.stack(ys), bad


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and n >= 2:
        n_val = max(1, min(n - 1, n_val))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
