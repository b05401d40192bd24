"""Offline place names (GeoNames, from a package at export time) and nearest-place lookup (numpy)."""
from __future__ import annotations

import json

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.geo import haversine_km, unit_vectors


def save_places(path, lat, lon, name, admin1, country, meta: dict | None = None) -> None:
    np.savez_compressed(path, lat=np.asarray(lat, np.float32), lon=np.asarray(lon, np.float32),
                        name=np.asarray(name, dtype=str), admin1=np.asarray(admin1, dtype=str),
                        country=np.asarray(country, dtype=str),
                        meta=np.frombuffer(json.dumps(meta or {}).encode(), np.uint8))


class Places:
    def __init__(self, lat, lon, name, admin1, country, meta=None):
        self.lat, self.lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        self.name, self.admin1, self.country = name, admin1, country
        self.meta = meta or {}
        self._xyz = unit_vectors(self.lat, self.lon)

    @classmethod
    def load(cls, path) -> "Places":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["lat"], z["lon"], z["name"], z["admin1"], z["country"],
                           json.loads(bytes(z["meta"]).decode()))
        except (OSError, KeyError, ValueError) as e:
            raise GeosurgeError(f"{path}: not a geosurge places file ({e})") from None

    def __len__(self) -> int:
        return int(self.lat.size)

    def nearest(self, lat: float, lon: float) -> dict | None:
        if not len(self):
            return None
        i = int(np.argmax(self._xyz @ unit_vectors(lat, lon)))
        d = float(haversine_km(lat, lon, self.lat[i], self.lon[i]))
        return {"name": str(self.name[i]), "admin1": str(self.admin1[i]), "country": str(self.country[i]),
                "distance_km": round(d, 1)}
