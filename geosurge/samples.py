"""Real photos shipped inside installed packages (scikit-image, matplotlib): the demo's inputs, golden probes and
parity images when a user brings none. Found through package metadata; nothing downloads."""
from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from .errors import GeosurgeError

SAMPLE_PHOTOS = [  # (distribution, file inside it, short name)
    ("scikit-image", "skimage/data/astronaut.png", "astronaut"),
    ("scikit-image", "skimage/data/chelsea.png", "chelsea"),
    ("scikit-image", "skimage/data/coffee.png", "coffee"),
    ("scikit-image", "skimage/data/rocket.jpg", "rocket"),
    ("scikit-image", "skimage/data/motorcycle_left.png", "motorcycle"),
    ("scikit-image", "skimage/data/camera.png", "camera"),  # grayscale
    ("scikit-image", "skimage/data/coins.png", "coins"),  # grayscale
    ("scikit-image", "skimage/data/horse.png", "horse"),  # binary silhouette
    ("scikit-image", "skimage/data/retina.jpg", "retina"),
    ("scikit-image", "skimage/data/hubble_deep_field.jpg", "hubble"),
    ("scikit-image", "skimage/data/grass.png", "grass"),
    ("scikit-image", "skimage/data/gravel.png", "gravel"),
    ("scikit-image", "skimage/data/brick.png", "brick"),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
]


def sample_photo_paths() -> list[Path]:
    out = []
    for dist, rel, _ in SAMPLE_PHOTOS:
        try:
            p = Path(metadata.distribution(dist).locate_file(rel))
        except metadata.PackageNotFoundError:
            continue
        if p.is_file():
            out.append(p)
    if not out:
        raise GeosurgeError("no sample photos found: install scikit-image / matplotlib (geosurge[toolkit]) or pass "
                            "--images DIR")
    return out


def copy_samples(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(p, dest / p.name)) for p in sample_photo_paths()]
