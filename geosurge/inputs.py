"""Where images come from: paths and folders given on a command line, an image folder or a CSV manifest
(``path,lat,lon``). Folders are listed by content through :func:`geosurge.images.list_images`, the one
folder lister. numpy-only: shared by the runtime (``locate``), calibration, training and distillation, so none of
them imports another's heavy dependencies only to list a folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError
from .images import list_images


@dataclass
class ImageManifest:
    """A CSV manifest: image paths (absolute, or resolved against the CSV's folder) with their coordinates."""

    paths: list[Path]
    lat: np.ndarray
    lon: np.ndarray
    source: Path

    def __len__(self) -> int:
        return len(self.paths)


def expand_inputs(paths) -> list[Path]:
    """Files as given; folders expand (recursively, sorted) to the images they hold, found by content. A thin
    delegate to :func:`geosurge.images.list_images`, which also says which files were skipped and why (commands
    that take folders use that, to account for every file)."""
    return list_images(paths).paths


def read_manifest(path) -> ImageManifest:
    """A CSV with ``path``, ``lat``, ``lon`` columns; relative paths are relative to the CSV's folder."""
    from .geo.points import read_coordinate_csv

    path = Path(path)
    cols = read_coordinate_csv(path, text_columns=("path",))
    base = path.parent
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in cols["path"]]
    return ImageManifest(paths, cols["lat"], cols["lon"], path)


def list_image_source(source, what: str = "image source",
                      log=None) -> tuple[list[Path], np.ndarray | None, np.ndarray | None]:
    """An image folder (recursive, sorted; images found by content, :func:`geosurge.images.list_images`) or a CSV
    manifest -> (paths, lat, lon); lat/lon None for a folder. With ``log``, each file of the folder that is not an
    image is named with what it is, then a count. Raises InputFileError for anything else."""
    source = Path(source)
    if source.is_dir():
        listing = list_images([source])
        if log is not None:
            for line in listing.skip_lines():
                log(f"{what}: {line}")
            log(f"{what}: {len(listing)} image file(s) in {source}, {len(listing.skipped)} other file(s) skipped "
                "(not an image)")
        return listing.paths, None, None
    if source.is_file() and source.suffix.lower() == ".csv":
        m = read_manifest(source)
        return m.paths, m.lat, m.lon
    raise InputFileError(f"{source}: {what} must be an image folder or a CSV manifest (path, lat, lon)")
