"""Offline place names (GeoNames, from a package at export time) and nearest-place lookup (numpy).

``places.npz`` layouts (the file's ``meta["layout"]``, also recorded as the manifest's ``places.layout``):

``utf8`` (written since 2026-11-30)
    ``lat``, ``lon`` (n,) float32; per text column ``name``, ``admin1``, ``country``: the column's distinct values as
    one UTF-8 blob ``{col}_utf8`` (uint8) with ``{col}_offsets`` (m + 1,) int32 (value j is
    ``blob[offsets[j]:offsets[j + 1]]``) and ``{col}_index`` (n,) uint16 / int32, the value of each place.
    33,986 GeoNames places take ~0.9 MB in memory.
``unicode`` (no ``layout`` key: bundles written before)
    the text columns as numpy fixed-width UTF-32 arrays (``<U57`` etc., ~15 MB in memory for the same places);
    still read, and held in memory as the ``utf8`` columns are.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.geo import haversine_km, unit_vectors

#: the layout :func:`save_places` writes
LAYOUT = "utf8"
#: the layout of places files that carry no ``layout`` (numpy ``<U`` arrays)
LEGACY_LAYOUT = "unicode"
LAYOUTS = (LAYOUT, LEGACY_LAYOUT)
COLUMNS = ("name", "admin1", "country")


class Strings(Sequence):
    """A read-only column of strings held as UTF-8: the distinct values in one ``blob`` (uint8) with ``offsets``
    (m + 1,) int, and ``index`` (n,) int naming each row's value (None: row i is value i). ``col[i]`` -> str;
    ``col[idx]`` (an int array, a boolean mask or a slice) -> list of str."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, index: np.ndarray | None = None):
        self.blob, self.offsets, self.index = blob, offsets, index

    @classmethod
    def encode(cls, values) -> "Strings":
        """Any sequence of str (or a numpy ``<U`` array) -> a dictionary-encoded column (values in first-seen
        order). Raises GeosurgeError when the distinct values exceed 2 GB of UTF-8."""
        seen: dict[str, int] = {}
        index = np.fromiter((seen.setdefault(str(v), len(seen)) for v in values), np.int64)
        blob, offsets = _utf8(seen)
        return cls(blob, offsets, index.astype(np.uint16 if len(seen) <= 2 ** 16 else np.int32))

    @classmethod
    def from_unicode(cls, a: np.ndarray) -> "Strings":
        """A numpy ``<U`` array -> a column with one value per row (no dictionary: the legacy layout's read
        path, where building one would cost more than it saves)."""
        return cls(*_utf8(a.tolist()))

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes + (0 if self.index is None else self.index.nbytes)

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    def _value(self, j: int) -> str:
        return bytes(self.blob[self.offsets[j]:self.offsets[j + 1]]).decode("utf-8")

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"place {i} out of range ({n})")
            i = int(i) % n
            return self._value(i if self.index is None else int(self.index[i]))
        rows = np.arange(len(self))[i]
        js = rows if self.index is None else self.index[rows]
        return [self._value(int(j)) for j in js]

    def __repr__(self) -> str:
        return f"Strings({len(self)} rows, {self.nbytes} bytes)"


def _utf8(values) -> tuple[np.ndarray, np.ndarray]:
    """str values -> (UTF-8 blob uint8, offsets (m + 1,) int32)."""
    parts = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    if offsets[-1] >= 2 ** 31:
        raise GeosurgeError(f"places: a text column of {int(offsets[-1])} bytes does not fit int32 offsets")
    return np.frombuffer(b"".join(parts), np.uint8), offsets.astype(np.int32)


def save_places(path, lat, lon, name, admin1, country, meta: dict | None = None) -> None:
    """Write ``places.npz`` in the :data:`LAYOUT` layout (see the module docstring): ``lat``, ``lon`` (n,) degrees;
    ``name``, ``admin1``, ``country`` sequences of n str; ``meta`` (JSON) gets ``layout``."""
    arrays = {}
    for col, values in zip(COLUMNS, (name, admin1, country)):
        s = Strings.encode(values)
        arrays[f"{col}_utf8"], arrays[f"{col}_offsets"], arrays[f"{col}_index"] = s.blob, s.offsets, s.index
    np.savez_compressed(path, lat=np.asarray(lat, np.float32), lon=np.asarray(lon, np.float32), **arrays,
                        meta=np.frombuffer(json.dumps({**(meta or {}), "layout": LAYOUT}).encode(), np.uint8))


class Places:
    """Place names with their coordinates: ``lat``, ``lon`` (n,) float64 degrees; ``name``, ``admin1``,
    ``country`` (n,) columns of str (:class:`Strings`, or any sequence given); ``meta`` the file's JSON."""

    def __init__(self, lat, lon, name, admin1, country, meta=None):
        self.lat, self.lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        self.name, self.admin1, self.country = name, admin1, country
        self.meta = meta or {}
        self._xyz = unit_vectors(self.lat, self.lon)

    @property
    def layout(self) -> str:
        return self.meta.get("layout", LEGACY_LAYOUT)

    @classmethod
    def load(cls, path, layout: str | None = None) -> "Places":
        """Read ``places.npz`` in either layout (module docstring). ``layout``: the one the bundle's manifest
        records (None: not recorded, any). Raises GeosurgeError naming the file when it is not a places file,
        its layout is unknown, differs from ``layout``, or its columns are inconsistent."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if not isinstance(meta, dict):
                    raise ValueError("meta is not a JSON object")
                found = meta.get("layout", LEGACY_LAYOUT)
                if found not in LAYOUTS:
                    raise GeosurgeError(f"{path}: places layout {found!r} is not one this runtime reads "
                                        f"({', '.join(LAYOUTS)}); update geosurge")
                if layout is not None and found != layout:
                    raise GeosurgeError(f"{path}: places layout {found!r}, but the manifest says {layout!r}")
                lat, lon = z["lat"], z["lon"]
                if found == LEGACY_LAYOUT:
                    cols = [Strings.from_unicode(_unicode(z[c], c)) for c in COLUMNS]
                else:
                    cols = [_column(z, c) for c in COLUMNS]
        except GeosurgeError:
            raise
        except (OSError, KeyError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
            raise GeosurgeError(f"{path}: not a geosurge places file ({e})") from None
        if not (lat.ndim == lon.ndim == 1 and lat.shape == lon.shape and all(len(c) == lat.size for c in cols)):
            raise GeosurgeError(f"{path}: not a geosurge places file (columns of different lengths: lat "
                                f"{lat.shape}, lon {lon.shape}, " + ", ".join(f"{n} {len(c)}" for n, c
                                                                               in zip(COLUMNS, cols)) + ")")
        return cls(lat, lon, *cols, meta=meta)

    def __len__(self) -> int:
        return int(self.lat.size)

    def nearest(self, lat: float, lon: float) -> dict | None:
        """The place nearest (lat, lon) in degrees: {name, admin1, country, distance_km (great circle, 0.1 km)};
        None when there are no places."""
        if not len(self):
            return None
        i = int(np.argmax(self._xyz @ unit_vectors(lat, lon)))
        d = float(haversine_km(lat, lon, self.lat[i], self.lon[i]))
        return {"name": str(self.name[i]), "admin1": str(self.admin1[i]), "country": str(self.country[i]),
                "distance_km": round(d, 1)}


def _unicode(a: np.ndarray, col: str) -> np.ndarray:
    if a.dtype.kind != "U" or a.ndim != 1:
        raise ValueError(f"column {col} is {a.dtype} {a.shape}, not a 1-d unicode array")
    return a


def _column(z, col: str) -> Strings:
    blob, offsets, index = z[f"{col}_utf8"], z[f"{col}_offsets"], z[f"{col}_index"]
    if blob.dtype != np.uint8 or offsets.dtype.kind not in "iu" or index.dtype.kind not in "iu":
        raise ValueError(f"column {col}: dtypes {blob.dtype} / {offsets.dtype} / {index.dtype}")
    m = offsets.size - 1
    if (blob.ndim != 1 or offsets.ndim != 1 or index.ndim != 1 or m < 0 or offsets[0] != 0
            or offsets[-1] != blob.size or np.any(np.diff(offsets) < 0)
            or (index.size and (int(index.min()) < 0 or int(index.max()) >= m))):
        raise ValueError(f"column {col}: offsets or index out of range")
    bytes(blob).decode("utf-8")  # valid UTF-8 throughout (UnicodeDecodeError otherwise) ...
    starts = offsets[:-1][offsets[:-1] < blob.size]
    if np.any((blob[starts] & 0xC0) == 0x80):  # ... and every value starts on a character: each one decodes
        raise ValueError(f"column {col}: an offset splits a UTF-8 character")
    return Strings(blob, offsets, index)
