"""Photo-coordinate sources: the default MP-16 sample shipped in the ``geoclip`` package, and user CSV files."""
from __future__ import annotations

import csv
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import InputFileError

GEOCLIP_COORDS = "geoclip/model/gps_gallery/coordinates_100K.csv"
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "lng", "long", "longitude")


def default_points_path() -> Path:
    """The 100K MP-16 photo locations inside the installed ``geoclip`` package (found without importing it)."""
    try:
        dist = metadata.distribution("geoclip")
    except metadata.PackageNotFoundError:
        raise InputFileError("the default photo coordinates come from the 'geoclip' package, which is not "
                             "installed: pip install 'geosurge[toolkit]' or pass --points CSV") from None
    path = Path(dist.locate_file(GEOCLIP_COORDS))
    if not path.is_file():
        raise InputFileError(f"{path}: geoclip is installed but its coordinates file is missing")
    return path


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    low = [h.strip().lower() for h in header]
    for n in names:
        if n in low:
            return low.index(n)
    return None


def read_points_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Read (lat, lon) from a CSV with a header naming lat/latitude and lon/lng/longitude columns.

    Raises :class:`InputFileError` naming the file and the 1-based row for any problem.
    """
    cols = read_coordinate_csv(path)
    return cols["lat"], cols["lon"]


def read_coordinate_csv(path, text_columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read lat/lon (validated) plus the named text columns (e.g. ``path``) from a CSV with a header.

    Returns ``{"lat": float64, "lon": float64, name: object array, ..., "row": 1-based row numbers}``.
    Raises :class:`InputFileError` naming the file and the row for any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: file not found")
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise InputFileError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise InputFileError(f"{path}: empty file (expected a header with lat and lon columns)") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputFileError(f"{path}: row 1: not a readable CSV ({e})") from None
        ilat, ilon = _column(header, LAT_NAMES), _column(header, LON_NAMES)
        itext = {name: _column(header, (name,)) for name in text_columns}
        missing = [n for n, i in (("lat", ilat), ("lon", ilon), *itext.items()) if i is None]
        if missing:
            raise InputFileError(f"{path}: row 1: missing column(s) {', '.join(missing)} "
                                 f"(header is {', '.join(h.strip() for h in header)})")
        lats, lons, rows = [], [], []
        texts = {name: [] for name in text_columns}
        try:
            for row in reader:
                rowno = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                try:
                    la, lo = float(row[ilat]), float(row[ilon])
                    vals = {name: row[i].strip() for name, i in itext.items()}
                except IndexError:
                    raise InputFileError(f"{path}: row {rowno}: too few fields") from None
                except ValueError:
                    raise InputFileError(f"{path}: row {rowno}: lat/lon not numeric "
                                         f"({row[ilat]!r}, {row[ilon]!r})") from None
                if not (np.isfinite(la) and -90.0 <= la <= 90.0):
                    raise InputFileError(f"{path}: row {rowno}: latitude {la} out of range [-90, 90]")
                if not (np.isfinite(lo) and -180.0 <= lo <= 180.0):
                    raise InputFileError(f"{path}: row {rowno}: longitude {lo} out of range [-180, 180]")
                for name, v in vals.items():
                    if not v:
                        raise InputFileError(f"{path}: row {rowno}: empty {name}")
                    texts[name].append(v)
                lats.append(la)
                lons.append(lo)
                rows.append(rowno)
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputFileError(f"{path}: row {reader.line_num}: not a readable CSV ({e})") from None
    if not lats:
        raise InputFileError(f"{path}: no data rows after the header")
    out = {"lat": np.asarray(lats), "lon": np.asarray(lons), "row": np.asarray(rows)}
    out.update({name: np.asarray(v, dtype=object) for name, v in texts.items()})
    return out


def default_points() -> tuple[np.ndarray, np.ndarray, str]:
    path = default_points_path()
    lat, lon = read_points_csv(path)
    return lat, lon, f"geoclip:{GEOCLIP_COORDS}"
