"""Where images come from: paths and folders given on a command line, an image folder or a CSV manifest
(``path,lat,lon``). numpy-only: shared by the runtime (``locate``), calibration, training and distillation, so none of
them imports another's heavy dependencies only to list a folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError
from .images import IMAGE_EXTENSIONS


@dataclass
class ImageManifest:
    """A CSV manifest: image paths (absolute, or resolved against the CSV's folder) with their coordinates."""

    paths: list[Path]
    lat: np.ndarray
    lon: np.ndarray
    source: Path

    def __len__(self) -> int:
        return len(self.paths)


def folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def expand_inputs(paths) -> list[Path]:
    """Files as given; folders expand (recursively, sorted) to the image files they hold."""
    out = []
    for p in map(Path, paths):
        out += folder_images(p) if p.is_dir() else [p]
    return out


def read_manifest(path) -> ImageManifest:
    """A CSV with ``path``, ``lat``, ``lon`` columns; relative paths are relative to the CSV's folder."""
    from .geo.points import read_coordinate_csv

    path = Path(path)
    cols = read_coordinate_csv(path, text_columns=("path",))
    base = path.parent
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in cols["path"]]
    return ImageManifest(paths, cols["lat"], cols["lon"], path)


def list_image_source(source, what: str = "image source") -> tuple[list[Path], np.ndarray | None, np.ndarray | None]:
    """An image folder (recursive, sorted) or a CSV manifest -> (paths, lat, lon); lat/lon None for a folder."""
    source = Path(source)
    if source.is_dir():
        return folder_images(source), None, None
    if source.is_file() and source.suffix.lower() == ".csv":
        m = read_manifest(source)
        return m.paths, m.lat, m.lon
    raise InputFileError(f"{source}: {what} must be an image folder or a CSV manifest (path, lat, lon)")
