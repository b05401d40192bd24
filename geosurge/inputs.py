"""Where images come from: paths and folders given on a command line, an image folder or a CSV manifest
(``path,lat,lon``). Folders are listed by content through :func:`geosurge.images.list_images`, the one
folder lister. numpy-only: shared by the runtime (``locate``), calibration, training and distillation, so none of
them imports another's heavy dependencies only to list a folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError
from .images import ReadSummary, list_images


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
    if not source.exists():
        raise InputFileError(f"{source}: no such file or folder ({what})")
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


def truth_manifest(images) -> tuple[list, dict | None]:
    """``images`` as image paths, and the true (lat, lon) per path when they come from CSV manifests (``path, lat,
    lon``; any mix of files, folders and manifests: only a manifest's images have ground truth)."""
    out, coords = [], {}
    for item in images:
        p = Path(item)
        if p.is_file() and p.suffix.lower() == ".csv":
            man = read_manifest(p)
            for path, la, lo in zip(man.paths, man.lat, man.lon):
                out.append(path)
                coords[str(path)] = (float(la), float(lo))
        else:
            out.append(item)
    return out, coords or None


@dataclass
class PreprocessedImages:
    """Images read for a comparison (:func:`read_preprocessed`): every input accounted for."""

    inputs: np.ndarray  # (N, 3, S, S) float32, preprocessed per the spec
    names: list[str]  # the N images, in order
    errors: list[dict]  # {"input", "error"} per refused file
    not_images: list[dict]  # {"input", "reason"} per file of a folder that is not an image
    summary: ReadSummary  # read / refused / skipped counts
    truth: tuple[np.ndarray, np.ndarray] | None  # (lat, lon) degrees (N,) when every image came from a manifest


def read_preprocessed(images, spec, log=print, what: str = "images") -> PreprocessedImages:
    """Decode and preprocess ``images`` (files, folders listed by content, CSV manifests ``path, lat, lon``) per
    ``spec`` (a :class:`~geosurge.preprocess.PreprocessSpec`), as the runtime does. Each refused file and each
    folder file that is not an image gets a log line, and the counts a closing one. Raises GeosurgeError when no
    image is readable."""
    from .errors import GeosurgeError
    from .images import load_image
    from .preprocess import preprocess

    paths, coords = truth_manifest(images)
    listing = list_images(paths)
    summary = listing.summary()
    for line in listing.skip_lines():
        log(f"  {line}")
    xs, names, errors = [], [], []
    for p in listing.paths:
        try:
            xs.append(preprocess(load_image(p, spec), spec))
            names.append(str(p))
            summary.count(True)
        except GeosurgeError as e:
            errors.append({"input": str(p), "error": str(e)})
            summary.count(False)
            log(f"  refused {e}")
    log(f"{what}: {summary.line()}")
    if not xs:
        why = (f"; e.g. {errors[0]['error']}" if errors else
               f"; e.g. {listing.skipped[0].path}: {listing.skipped[0].reason}" if listing.skipped else "")
        raise GeosurgeError(f"{what}: no readable images among {', '.join(map(str, paths[:3]))}"
                            f"{' ...' if len(paths) > 3 else ''} ({summary.line()}{why})")
    truth = None
    if coords is not None:
        known = [coords.get(n) for n in names]
        if all(k is not None for k in known):
            truth = (np.array([k[0] for k in known]), np.array([k[1] for k in known]))
        else:
            log(f"{what}: {sum(k is None for k in known)} image(s) have no ground truth: accuracy deltas not "
                "measured (give only manifests for them)")
    return PreprocessedImages(np.stack(xs), names, errors,
                              [{"input": str(s.path), "reason": s.reason} for s in listing.skipped], summary, truth)
