"""Our vectorised S2 ids against two independent implementations (s2sphere, s2cell)."""
import numpy as np
import pytest
import s2cell
import s2sphere

from geosurge.geo import s2

from .conftest import random_sphere_points


def _edge_points():
    lat = np.array([90.0, -90.0, 0.0, 0.0, 0.0, 45.0, -45.0, 89.9999, 12.3456789, -33.8688, 35.0])
    lon = np.array([0.0, 0.0, 180.0, -180.0, 0.0, 45.0, 135.0, -179.9999, -0.0000001, 151.2093, -90.0])
    return lat, lon


def test_leaf_ids_match_s2sphere_and_s2cell():
    lat, lon = random_sphere_points(3000, seed=1)
    lat = np.concatenate([lat, _edge_points()[0]])
    lon = np.concatenate([lon, _edge_points()[1]])
    ours = s2.latlng_to_leaf(lat, lon)
    ref = [s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id() for a, b in zip(lat, lon)]
    assert ours.dtype == np.uint64
    assert ours.tolist() == ref
    ref2 = [s2cell.lat_lon_to_cell_id(a, b, 30) for a, b in zip(lat[:500], lon[:500])]
    assert ours[:500].tolist() == ref2


@pytest.mark.parametrize("level", [0, 1, 5, 12, 20, 29])
def test_parent_children_level_token(level):
    lat, lon = random_sphere_points(300, seed=level)
    leaf = s2.latlng_to_leaf(lat, lon)
    cells = s2.parent(leaf, level)
    ref = [s2sphere.CellId(int(x)).parent(level) for x in leaf]
    assert cells.tolist() == [c.id() for c in ref]
    assert (s2.level_of(cells) == level).all()
    assert s2.to_token(cells) == [c.to_token() for c in ref]
    assert (s2.from_token(s2.to_token(cells)) == cells).all()
    if level < 30:
        kids = s2.children(cells[:40])
        assert kids.tolist() == [[k.id() for k in c.children()] for c in ref[:40]]
        assert (s2.parent(kids.ravel(), level).reshape(-1, 4) == cells[:40, None]).all()
    assert (s2.range_min(cells) <= leaf).all() and (leaf <= s2.range_max(cells)).all()


@pytest.mark.parametrize("level", [0, 4, 10, 16, 20])
def test_cell_area_and_center(level):
    lat, lon = random_sphere_points(60, seed=100 + level)
    cells = s2.parent(s2.latlng_to_leaf(lat, lon), level)
    area = s2.cell_area_km2(cells)
    ref = np.array([s2sphere.Cell(s2sphere.CellId(int(c))).exact_area() for c in cells]) * s2.EARTH_RADIUS_KM ** 2
    np.testing.assert_allclose(area, ref, rtol=1e-4)
    clat, clon = s2.cell_center(cells)
    ll = [s2sphere.CellId(int(c)).to_lat_lng() for c in cells]
    np.testing.assert_allclose(clat, [p.lat().degrees for p in ll], atol=1e-9)
    # the centre lies in its own cell
    assert (s2.parent(s2.latlng_to_leaf(clat, clon), level) == cells).all()


def test_faces_cover_the_sphere():
    total = s2.cell_area_km2(s2.face_cells()).sum()
    np.testing.assert_allclose(total, 4 * np.pi * s2.EARTH_RADIUS_KM ** 2, rtol=1e-12)
