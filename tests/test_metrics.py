import numpy as np
import pytest
from geographiclib.geodesic import Geodesic

from geosurge.geo import accuracy_within, geoscore, haversine_km, median_error_km, summarize
from geosurge.geo.metrics import EARTH_RADIUS_KM

CITY_PAIRS = [  # (lat1, lon1, lat2, lon2)
    (48.8566, 2.3522, 51.5074, -0.1278),  # Paris - London
    (40.7128, -74.0060, 34.0522, -118.2437),  # New York - Los Angeles
    (-33.8688, 151.2093, 35.6762, 139.6503),  # Sydney - Tokyo
    (64.1466, -21.9426, -54.8019, -68.3030),  # Reykjavik - Ushuaia
    (35.0, 179.5, 35.0, -179.5),  # across the antimeridian
]


def test_haversine_exact_geometry():
    assert haversine_km(0, 0, 0, 0) == 0
    np.testing.assert_allclose(haversine_km(0, 0, 90, 0), np.pi / 2 * EARTH_RADIUS_KM)
    np.testing.assert_allclose(haversine_km(0, 0, 0, 180), np.pi * EARTH_RADIUS_KM)
    np.testing.assert_allclose(haversine_km(10, 20, -10, -160), np.pi * EARTH_RADIUS_KM)  # antipodes


def test_haversine_city_pairs_against_wgs84_geodesics():
    a = np.array(CITY_PAIRS)
    d = haversine_km(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    ref = np.array([Geodesic.WGS84.Inverse(*row)["s12"] / 1000 for row in CITY_PAIRS])
    np.testing.assert_allclose(d, ref, rtol=0.006)  # sphere vs ellipsoid: within 0.6%
    assert 340 < d[0] < 346 and 3930 < d[1] < 3945
    assert d[4] < 92  # ~91 km, not ~32,000


def test_haversine_broadcasts():
    d = haversine_km(np.zeros((3, 1)), 0, 0, np.array([0, 1, 2]))
    assert d.shape == (3, 3)


def test_accuracy_median_geoscore():
    d = np.array([0.5, 10, 100, 500, 1000, 3000])
    acc = accuracy_within(d)
    assert acc == {1.0: 1 / 6, 25.0: 2 / 6, 200.0: 3 / 6, 750.0: 4 / 6, 2500.0: 5 / 6}
    assert median_error_km(d) == 300
    np.testing.assert_allclose(geoscore([0, 1492.7]), [5000, 5000 / np.e])
    s = summarize(d)
    assert s["n"] == 6 and s["accuracy"]["25km"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        accuracy_within([])
