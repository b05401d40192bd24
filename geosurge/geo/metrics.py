"""Geodesic metrics used across training, parity and evaluation (numpy only)."""
from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0088
ACCURACY_THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
GEOSCORE_SCALE_KM = 1492.7


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km on the sphere of mean Earth radius (numpy-broadcast)."""
    p1, p2 = np.radians(np.asarray(lat1, dtype=np.float64)), np.radians(np.asarray(lat2, dtype=np.float64))
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def unit_vectors(lat, lon) -> np.ndarray:
    """(N, 3) points on the unit sphere: the nearest of many points to a query is the largest dot product."""
    la, lo = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def accuracy_within(distances_km, thresholds_km=ACCURACY_THRESHOLDS_KM) -> dict[float, float]:
    """Fraction of predictions within each threshold (km)."""
    d = np.asarray(distances_km, dtype=np.float64)
    if d.size == 0:
        raise ValueError("accuracy_within needs at least one distance")
    return {float(t): float(np.mean(d <= t)) for t in thresholds_km}


def median_error_km(distances_km) -> float:
    return float(np.median(np.asarray(distances_km, dtype=np.float64)))


def geoscore(distances_km) -> np.ndarray:
    """GeoGuessr-style score per prediction: 5000 * exp(-d / 1492.7)."""
    return 5000.0 * np.exp(-np.asarray(distances_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


def summarize(distances_km, thresholds_km=ACCURACY_THRESHOLDS_KM) -> dict:
    d = np.asarray(distances_km, dtype=np.float64)
    return {
        "n": int(d.size),
        "accuracy": {f"{t:g}km": v for t, v in accuracy_within(d, thresholds_km).items()},
        "median_km": median_error_km(d),
        "mean_geoscore": float(np.mean(geoscore(d))),
    }


def summarize_errors(distances_km, thresholds_km=ACCURACY_THRESHOLDS_KM) -> dict:
    """One table row of errors in km: ``n``, ``acc@<t>km`` (% within each threshold: 1 / 25 / 200 / 750 / 2500 km,
    those of Im2GPS3k, YFCC4k and the GeoSURGE paper), ``median_km``, ``mean_km`` and mean ``geoscore``. NaN
    figures for an empty array (a source where every image failed)."""
    d = np.asarray(distances_km, np.float64).ravel()
    nan = float("nan")
    out = {"n": int(d.size)}
    out.update({f"acc@{t:g}km": 100.0 * float(np.mean(d <= t)) if d.size else nan for t in thresholds_km})
    out.update({"median_km": float(np.median(d)) if d.size else nan, "mean_km": float(d.mean()) if d.size else nan,
                "geoscore": float(geoscore(d).mean()) if d.size else nan})
    return out
