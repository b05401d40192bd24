"""Evaluation inputs: (image, lat, lon[, source]) rows from a manifest or from a folder of GPS-tagged photos.

Formats, recognised by the CSV header (names case-insensitive, other columns ignored):

==========================  ==========================  =====================================================
format                      columns                     image file
==========================  ==========================  =====================================================
geosurge (ours)             ``path, lat, lon``          ``path``, relative to the CSV's folder
Im2GPS3k / YFCC4k           ``IMG_ID, LAT, LON``        ``IMG_ID`` in the images folder (``--images``)
OSV-5M                      ``id, latitude, longitude`` ``<id>.jpg`` in the images folder (``--images``)
==========================  ==========================  =====================================================

An optional ``source`` column names each row's source (a per-source row in the report). A folder is read as photos
whose EXIF GPS tags are the ground truth (Pillow's EXIF reader); a photo without GPS tags is reported, not dropped.
A malformed CSV row stops with one error naming the file and the row (:class:`InputFileError`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GeosurgeError, InputFileError

#: extensions tried, in order, for an image id given without one (OSV-5M ids; Im2GPS ids carry their own)
ID_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class EvalItem:
    path: Path
    lat: float | None  # None: no ground truth (a photo without GPS tags); such an item is a failure
    lon: float | None
    source: str = "all"
    row: int | None = None  # 1-based CSV row, None for a folder
    error: str | None = None  # a problem known before decoding (e.g. no GPS tags)


FORMATS = {
    # name: (id column, how the id becomes a path)
    "geosurge": "path",
    "im2gps": "img_id",
    "osv5m": "id",
}


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip().lower() for h in next(csv.reader(f), [])]
    except OSError as e:
        raise InputFileError(f"{path}: cannot open ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: row 1: not a readable CSV ({e})") from None


def detect_format(header: list[str]) -> str | None:
    if "path" in header:
        return "geosurge"
    if "img_id" in header:
        return "im2gps"
    if "id" in header and "latitude" in header:
        return "osv5m"
    return None


def _resolve(folder: Path, name: str) -> Path:
    p = Path(name)
    p = p if p.is_absolute() else folder / p
    if p.suffix:
        return p
    for ext in ID_EXTENSIONS:
        if p.with_name(p.name + ext).is_file():
            return p.with_name(p.name + ext)
    return p.with_name(p.name + ID_EXTENSIONS[0])


def read_manifest_items(path, images=None) -> tuple[list[EvalItem], str]:
    """A manifest CSV -> (items, format name). ``images``: the folder image ids are relative to (default: the
    CSV's folder). Raises InputFileError naming the file and row for a malformed file."""
    from ..geo.points import read_coordinate_csv

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: manifest not found")
    header = _header(path)
    fmt = detect_format(header)
    if fmt is None:
        raise InputFileError(f"{path}: row 1: unrecognised manifest header ({', '.join(header)}); expected "
                             "path,lat,lon (geosurge), IMG_ID,LAT,LON (Im2GPS3k / YFCC4k) or id,latitude,longitude "
                             "(OSV-5M)")
    key = FORMATS[fmt]
    text = (key, "source") if "source" in header else (key,)
    cols = read_coordinate_csv(path, text_columns=text)
    folder = Path(images) if images else path.parent
    if images and not folder.is_dir():
        raise InputFileError(f"{folder}: images folder not found")
    items = [EvalItem(_resolve(folder, str(name)), float(la), float(lo),
                      str(cols["source"][i]) if "source" in cols else "all", int(cols["row"][i]))
             for i, (name, la, lo) in enumerate(zip(cols[key], cols["lat"], cols["lon"]))]
    return items, fmt


def exif_gps(path) -> tuple[float, float] | None:
    """(lat, lon) in degrees from a photo's EXIF GPS tags (Pillow), or None when it has none. Raises
    InputFileError for a file Pillow cannot open."""
    from PIL import ExifTags

    from ..images import open_pillow

    try:
        with open_pillow(path) as im:  # by content, HEIF/HEIC included (pillow-heif)
            gps = im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    except (GeosurgeError, OSError, SyntaxError, ValueError) as e:
        raise InputFileError(f"{path}: cannot read EXIF ({e})") from None
    try:
        lat = _dms(gps[ExifTags.GPS.GPSLatitude], gps.get(ExifTags.GPS.GPSLatitudeRef, "N"))
        lon = _dms(gps[ExifTags.GPS.GPSLongitude], gps.get(ExifTags.GPS.GPSLongitudeRef, "E"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    return lat, lon


def _dms(value, ref) -> float:
    d, m, s = (float(v) for v in value)
    deg = d + m / 60.0 + s / 3600.0
    ref = ref.decode() if isinstance(ref, bytes) else str(ref)
    return -deg if ref.strip().upper() in ("S", "W") else deg


def read_exif_folder(folder) -> tuple[list[EvalItem], list]:
    """Every image under ``folder`` (:func:`geosurge.images.list_images`: recursive, sorted, found by content) with
    its EXIF GPS position as the truth -> (items, skipped files). A photo without GPS tags (or with unreadable EXIF)
    becomes an item with ``error`` set; a file that is not an image is a :class:`~geosurge.images.SkippedFile`
    (named with what it is, never silently dropped)."""
    from ..images import list_images

    listing = list_images([Path(folder)])
    items = []
    for p in listing.paths:
        try:
            ll = exif_gps(p)
        except InputFileError as e:
            items.append(EvalItem(p, None, None, "all", error=str(e).split(": ", 1)[-1]))
            continue
        items.append(EvalItem(p, *(ll if ll else (None, None)), "all",
                              error=None if ll else "no GPS position in its EXIF"))
    return items, listing.skipped


@dataclass
class EvalInputs:
    """What an evaluation source holds: ``items`` (one per manifest row or image file), the ``format`` (geosurge |
    im2gps | osv5m | exif) and, for a folder, the ``skipped`` files that are not images."""

    items: list[EvalItem]
    format: str
    skipped: list = field(default_factory=list)


def read_source(source, images=None) -> EvalInputs:
    """A manifest CSV or a folder of GPS-tagged photos -> :class:`EvalInputs`. Raises InputFileError for a missing
    source, a malformed manifest, or a folder without images."""
    source = Path(source)
    if source.is_dir():
        items, skipped = read_exif_folder(source)
        if not items:
            raise InputFileError(f"{source}: no image files in the folder ({len(skipped)} other file(s))")
        return EvalInputs(items, "exif", skipped)
    if source.is_file():
        return EvalInputs(*read_manifest_items(source, images))
    raise InputFileError(f"{source}: not found (give a manifest CSV or a folder of GPS-tagged photos)")


def read_items(source, images=None) -> tuple[list[EvalItem], str]:
    """A manifest CSV or a folder of GPS-tagged photos -> (items, format: geosurge | im2gps | osv5m | exif)
    (:func:`read_source` without the skipped files)."""
    src = read_source(source, images)
    return src.items, src.format
