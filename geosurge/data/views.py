"""Downward views of the Earth, rendered from georeferenced rasters.

A view is what a downward camera sees centred at (lat, lon): a square ``size`` x ``size`` image covering
``footprint_km`` of ground edge to edge, its "up" axis pointing at compass ``heading_deg`` (clockwise from north).
Each output pixel is placed on the ground by the **azimuthal equidistant projection** centred on the view centre
(distances and bearings from the centre are true), so a view at 70 degrees latitude is as undistorted as one at the
equator: a circle on the ground stays a circle in the view, whatever the raster's own projection. The raster is
then resampled at those points with ``cv2.remap`` (:meth:`GeoRaster.sample`).

Projection: by default the sphere of mean Earth radius (Snyder, *Map Projections: A Working Manual*, USGS 1987,
eqs. 5-5 and 5-6 for the inverse azimuthal equidistant: the "destination point" formula), vectorised numpy, ~3 ms per
256x256 view; ``geodesic="wgs84"`` uses pyproj's Karney geodesics on the WGS84 ellipsoid instead (~60 ms per view;
the two differ by < 0.5% in distance: for a user's metre-resolution GeoTIFF where that matters).

Centres are drawn from the photo density the default hierarchy is built from (the 100K MP-16 photo locations in the
``geoclip`` package: :func:`geosurge.geo.points.default_points`), so the default hierarchy and its GeoCLIP-initialised
cell table apply; everything is deterministic by seed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import GeosurgeError
from ..fsutil import check_replaceable, replace_dir
from ..geo.metrics import EARTH_RADIUS_KM
from .rasters import GeoRaster

#: the view set's manifest file (what marks a folder as one)
MANIFEST_NAME = "manifest.csv"

#: the columns of a view manifest (``geosurge eval`` reads path, lat, lon and source)
MANIFEST_COLUMNS = ("path", "lat", "lon", "source", "heading_deg", "footprint_km")


@dataclass(frozen=True)
class ViewSpec:
    lat: float  # degrees
    lon: float  # degrees
    heading_deg: float = 0.0  # compass bearing of the image's up axis, clockwise from north
    footprint_km: float = 1000.0  # ground width of the whole image, edge to edge
    size: int = 256  # output pixels (square)

    @property
    def px_km(self) -> float:
        return self.footprint_km / self.size


def destination(lat, lon, azimuth_deg, distance_km) -> tuple[np.ndarray, np.ndarray]:
    """Points ``distance_km`` from (lat, lon) along initial bearing ``azimuth_deg`` on the sphere of mean Earth
    radius (the inverse azimuthal equidistant projection; numpy-broadcast). Longitudes come back in [-180, 180)."""
    phi0, lam0 = np.radians(lat), np.radians(lon)
    az, c = np.radians(azimuth_deg), np.asarray(distance_km, np.float64) / EARTH_RADIUS_KM
    sin_phi = np.clip(np.sin(phi0) * np.cos(c) + np.cos(phi0) * np.sin(c) * np.cos(az), -1.0, 1.0)
    phi = np.arcsin(sin_phi)
    lam = lam0 + np.arctan2(np.sin(az) * np.sin(c) * np.cos(phi0), np.cos(c) - np.sin(phi0) * sin_phi)
    return np.degrees(phi), np.mod(np.degrees(lam) + 180.0, 360.0) - 180.0


def view_offsets_km(spec: ViewSpec, grid: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(east, north) ground offsets in km of each output pixel centre from the view centre, (size, size) each.
    With ``grid``: a ``grid`` x ``grid`` lattice from edge to edge of the view instead (corners included)."""
    if grid is None:
        r = (np.arange(spec.size) + 0.5 - spec.size / 2.0) * spec.px_km
    else:
        r = np.linspace(-spec.footprint_km / 2.0, spec.footprint_km / 2.0, grid)
    u, v = np.meshgrid(r, -r)  # u: image right, v: image up (row 0 at the top)
    h = math.radians(spec.heading_deg)
    return u * math.cos(h) + v * math.sin(h), -u * math.sin(h) + v * math.cos(h)


def offsets_to_lonlat(lat0: float, lon0: float, east, north) -> tuple[np.ndarray, np.ndarray]:
    """Inverse azimuthal equidistant projection centred at (lat0, lon0) on the sphere of mean Earth radius:
    ground offsets (east, north) in km -> (lon, lat) degrees, lon in [-180, 180). Same formula as
    :func:`destination`, with the bearing's sine and cosine taken straight from the offsets (no arctan2)."""
    east, north = np.asarray(east, np.float64), np.asarray(north, np.float64)
    rho = np.hypot(east, north)
    c = rho / EARTH_RADIUS_KM
    safe = np.where(rho > 0, rho, 1.0)
    sin_az, cos_az = np.where(rho > 0, east / safe, 0.0), np.where(rho > 0, north / safe, 1.0)
    phi0, sin_c, cos_c = math.radians(lat0), np.sin(c), np.cos(c)
    sin_phi = np.clip(math.sin(phi0) * cos_c + math.cos(phi0) * sin_c * cos_az, -1.0, 1.0)
    lam = np.arctan2(sin_az * sin_c * math.cos(phi0), cos_c - math.sin(phi0) * sin_phi)
    return np.mod(np.degrees(lam) + (lon0 + 180.0), 360.0) - 180.0, np.degrees(np.arcsin(sin_phi))


#: the projection is evaluated exactly every COARSE_STEP output pixels and bilinearly interpolated in between (the
#: map is smooth away from the poles: < 0.02 px error on 300 random 256-px views 300-3,000 km wide, tested below
#: 0.05 px); a view near a pole is computed exactly at every pixel
COARSE_STEP = 4


def _near_pole(spec: ViewSpec) -> bool:
    """Whether a pole lies within 1.5x the view's half-diagonal of its centre: near it longitude is not smooth."""
    half_diag = spec.footprint_km / math.sqrt(2.0) * 1.5
    return (90.0 - abs(spec.lat)) * math.pi / 180.0 * EARTH_RADIUS_KM <= half_diag


def _lonlat_coarse(spec: ViewSpec) -> tuple[np.ndarray, np.ndarray]:
    n, step = spec.size, COARSE_STEP
    m = int(math.ceil((n - 1) / step)) + 1  # lattice points at pixel centres 0, step, ..., covering n - 1
    pix = np.arange(m) * step  # output pixel index of each lattice point (the last may lie past the image)
    r_u = (pix + 0.5 - n / 2.0) * spec.px_km
    u, v = np.meshgrid(r_u, -r_u)
    h = math.radians(spec.heading_deg)
    lon, lat = offsets_to_lonlat(spec.lat, spec.lon, u * math.cos(h) + v * math.sin(h),
                                 -u * math.sin(h) + v * math.cos(h))
    dlon = np.mod(lon - spec.lon + 180.0, 360.0) - 180.0  # continuous across the antimeridian (no pole in view)
    # bilinear upsampling of the lattice: output pixel i sits at lattice coordinate i / step
    lon_out = np.mod(_upsampled(dlon, m, step, n) + spec.lon + 180.0, 360.0) - 180.0
    return lon_out, _upsampled(lat, m, step, n)


def _upsampled(a: np.ndarray, m: int, step: int, n: int) -> np.ndarray:
    """Bilinear interpolation of lattice values ``a`` (m, m) at every integer pixel 0..n-1 (lattice spacing
    ``step`` pixels)."""
    t = np.arange(n) / step
    i0 = np.minimum(t.astype(np.int64), m - 2)
    f = t - i0
    rows = a[i0] * (1 - f)[:, None] + a[i0 + 1] * f[:, None]  # (n, m)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def view_lonlat(spec: ViewSpec, geodesic: str = "sphere", grid: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees of each output pixel centre, (size, size) each (see the module docstring); ``grid``
    as in :func:`view_offsets_km`."""
    if geodesic == "sphere" and grid is None and spec.size > 4 * COARSE_STEP and not _near_pole(spec):
        return _lonlat_coarse(spec)
    east, north = view_offsets_km(spec, grid)
    if geodesic == "sphere":
        return offsets_to_lonlat(spec.lat, spec.lon, east, north)
    if geodesic == "wgs84":
        from pyproj import Geod

        az, dist = np.degrees(np.arctan2(east, north)), np.hypot(east, north)
        lon, lat, _ = Geod(ellps="WGS84").fwd(np.full(az.shape, spec.lon), np.full(az.shape, spec.lat), az,
                                              dist * 1000.0)
        return np.asarray(lon), np.asarray(lat)
    raise ValueError(f"geodesic must be 'sphere' or 'wgs84', not {geodesic!r}")


def render_view(raster: GeoRaster, spec: ViewSpec, geodesic: str = "sphere") -> tuple[np.ndarray, float]:
    """-> (size x size x 3 uint8 RGB, fraction of pixels the raster covers validly)."""
    lon, lat = view_lonlat(spec, geodesic)
    rgb, valid = raster.sample(lon, lat, spec.px_km)
    return rgb, float(valid.mean())


def view_is_valid(raster: GeoRaster, spec: ViewSpec, grid: int = 17) -> bool:
    """Cheap check on a ``grid`` x ``grid`` lattice spanning the view edge to edge: every point inside the raster
    and off its known artefacts."""
    lon, lat = view_lonlat(spec, grid=grid)
    return bool(raster.contains(lat, lon).all())


def render_views(raster: GeoRaster, specs, progress: bool = False, desc: str = "render views",
                 geodesic: str = "sphere") -> np.ndarray:
    """(N, size, size, 3) uint8 for specs of one size."""
    specs = list(specs)
    if not specs:
        return np.zeros((0, 0, 0, 3), np.uint8)
    size = specs[0].size
    if any(s.size != size for s in specs):
        raise ValueError("render_views: all specs must have the same size")
    out = np.empty((len(specs), size, size, 3), np.uint8)
    it = range(len(specs))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
    for i in it:
        out[i], _ = render_view(raster, specs[i], geodesic)
    return out


# ---- centres and the held-out split -----------------------------------------------------------------------------
_POINTS: tuple[np.ndarray, np.ndarray] | None = None


def density_points() -> tuple[np.ndarray, np.ndarray]:
    """The default photo coordinates (lat, lon): geoclip's 100K MP-16 sample (read once per process)."""
    global _POINTS
    if _POINTS is None:
        from ..geo.points import default_points

        lat, lon, _ = default_points()
        _POINTS = (lat, lon)
    return _POINTS


_POOLS: dict = {}


def _pool(plat, plon, hierarchy, raster) -> np.ndarray:
    """Indices of the density points the raster and the hierarchy accept (memoised: locating 100K points takes
    seconds)."""
    key = (hashlib.sha256(plat.tobytes() + plon.tobytes()).hexdigest(),
           None if hierarchy is None else hierarchy.digest(),
           None if raster is None else (raster.bounds, raster.is_global, raster.exclude))
    if key not in _POOLS:
        keep = np.ones(plat.size, bool)
        if raster is not None:
            keep &= raster.contains(plat, plon)
        if hierarchy is not None:
            keep &= hierarchy.locate(plat, plon)[:, 0] >= 0
        if len(_POOLS) > 16:
            _POOLS.clear()
        _POOLS[key] = np.flatnonzero(keep)
    return _POOLS[key]


def draw_centres(n: int, rng: np.random.Generator, hierarchy=None, raster: GeoRaster | None = None,
                 jitter_km: float = 25.0, points=None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` centres (lat, lon) drawn from the photo density (``points``, default :func:`density_points`), each
    moved up to ``jitter_km`` in a random direction (uniform over the disc), kept only where the ``hierarchy``
    covers it (so every level has a label) and the ``raster`` has it inside its bounds. Deterministic for a given
    ``rng`` state. Raises GeosurgeError when the density has no point the raster and hierarchy accept."""
    plat, plon = density_points() if points is None else points
    pool = _pool(plat, plon, hierarchy, raster)
    if pool.size == 0:
        raise GeosurgeError("no photo-density point lies inside the raster and the hierarchy")
    out_lat, out_lon, tries = [], [], 0
    need = n
    while need > 0:
        tries += 1
        if tries > 200:
            raise GeosurgeError(f"could not draw {n} view centres inside the raster and the hierarchy")
        m = max(2 * need, 64)
        idx = rng.choice(pool, size=m)
        az = rng.uniform(0.0, 360.0, m)
        dist = jitter_km * np.sqrt(rng.uniform(0.0, 1.0, m))
        lat, lon = destination(plat[idx], plon[idx], az, dist)
        ok = np.ones(m, bool)
        if raster is not None:
            ok &= raster.contains(lat, lon)
        if hierarchy is not None:
            ok &= hierarchy.locate(lat, lon)[:, 0] >= 0
        lat, lon = lat[ok][:need], lon[ok][:need]
        out_lat.append(lat)
        out_lon.append(lon)
        need -= lat.size
    return np.concatenate(out_lat), np.concatenate(out_lon)


def draw_view_specs(lat, lon, rng: np.random.Generator, footprint_km=(600.0, 1600.0), size: int = 256,
                    raster: GeoRaster | None = None) -> list[ViewSpec | None]:
    """A spec per centre: heading uniform in [0, 360), footprint log-uniform in ``footprint_km`` (lo, hi). Where
    ``raster`` is given, a spec whose view would leave the raster or touch a known artefact is ``None`` (tried
    with 8 headings/footprints first)."""
    lo, hi = footprint_km
    out = []
    for la, lo_ in zip(np.asarray(lat, float), np.asarray(lon, float)):
        spec = None
        for _ in range(8):
            cand = ViewSpec(float(la), float(lo_), float(rng.uniform(0.0, 360.0)),
                            float(math.exp(rng.uniform(math.log(lo), math.log(hi)))), size)
            if raster is None or view_is_valid(raster, cand):
                spec = cand
                break
        out.append(spec)
    return out


def draw_valid_specs(count: int, rng: np.random.Generator, rasters, footprint_km=(600.0, 1600.0), size: int = 256,
                     jitter_km: float = 25.0, hierarchy=None) -> list[ViewSpec]:
    """``count`` view specs centred on the photo density (:func:`draw_centres` in the first raster) whose views are
    valid in every one of ``rasters`` (inside, off known artefacts). Raises GeosurgeError when 50 rounds of draws
    do not find enough."""
    rasters = list(rasters)
    specs: list[ViewSpec] = []
    for _ in range(50):
        lat, lon = draw_centres(count - len(specs), rng, hierarchy, rasters[0], jitter_km)
        specs += [s for s in draw_view_specs(lat, lon, rng, footprint_km, size, rasters[0])
                  if s is not None and all(view_is_valid(r, s) for r in rasters[1:])]
        if len(specs) >= count:
            return specs[:count]
    raise GeosurgeError(f"only {len(specs)} valid views could be drawn in {', '.join(r.name for r in rasters)}")


def nearest_km(ref_lat, ref_lon, lat, lon) -> np.ndarray:
    """Great-circle km from each (lat, lon) to the nearest of the reference points (a KD-tree on unit vectors:
    the nearest by chord is the nearest by arc)."""
    from scipy.spatial import cKDTree

    from ..geo.metrics import unit_vectors

    if np.asarray(ref_lat).size == 0:
        return np.full(np.asarray(lat).shape, np.inf)
    chord, _ = cKDTree(unit_vectors(ref_lat, ref_lon)).query(unit_vectors(lat, lon), k=1)
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord) / 2.0, 0.0, 1.0))


def heldout_split(train_lat, train_lon, lat, lon, min_km: float) -> tuple[np.ndarray, np.ndarray]:
    """The geographic held-out rule: which candidates lie at least ``min_km`` from **every** training centre.
    Returns (bool mask, km to the nearest training centre)."""
    d = nearest_km(train_lat, train_lon, lat, lon)
    return d >= min_km, d


# ---- manifests --------------------------------------------------------------------------------------------------
def view_set_entries(folder) -> set[str] | None:
    """The names of the entries of ``folder`` a view-set writer wrote — ``manifest.csv`` and the folders / files of
    its images — or None when its ``manifest.csv`` is not a view set's (header :data:`MANIFEST_COLUMNS`: a folder of
    the user's labelled photos with a ``path, lat, lon`` manifest is not one)."""
    try:
        with open(Path(folder) / MANIFEST_NAME, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not rows or tuple(rows[0]) != MANIFEST_COLUMNS:
        return None
    return {MANIFEST_NAME} | {Path(r[0]).parts[0] for r in rows[1:] if r and r[0] and not Path(r[0]).is_absolute()}


def write_view_manifest(out_dir, groups, fmt: str = "jpg", quality: int = 95) -> Path:
    """Write views as images plus ``manifest.csv`` (columns :data:`MANIFEST_COLUMNS`; paths relative to it), the
    format ``geosurge eval`` and ``geosurge train`` read. ``groups``: iterable of (source name, specs, images
    (N, S, S, 3) uint8 RGB). The folder is built aside and renamed into place (an existing view set is replaced
    whole; a file, a folder of anything else or a view set with other files is refused:
    ``geosurge.fsutil.check_replaceable``). Returns the manifest path."""
    import cv2

    if fmt not in ("jpg", "png"):
        raise ValueError("fmt must be 'jpg' or 'png'")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "view set", view_set_entries)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        rows = []
        for source, specs, images in groups:
            (tmp / source).mkdir(parents=True, exist_ok=True)
            for i, (spec, rgb) in enumerate(zip(specs, images)):
                rel = f"{source}/{i:05d}.{fmt}"
                params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpg" else []
                if not cv2.imwrite(str(tmp / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
                    raise GeosurgeError(f"{out_dir / rel}: cannot write image")
                rows.append((rel, f"{spec.lat:.6f}", f"{spec.lon:.6f}", source, f"{spec.heading_deg:.2f}",
                             f"{spec.footprint_km:.1f}"))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(rows)
        (tmp / MANIFEST_NAME).write_text(buf.getvalue())
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST_NAME


def spec_dicts(specs) -> list[dict]:
    return [asdict(s) for s in specs]
