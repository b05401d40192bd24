"""Invariants of the cell hierarchy, on the real default (MP-16 sample) and on synthetic clusters."""
import copy

import numpy as np
import pytest

from geosurge.errors import InputFileError
from geosurge.geo import build_hierarchy, load_hierarchy, s2, scaled_taus


def check_invariants(h, lat, lon):
    tau_max, tau_min, max_s2 = h.meta["tau_max"], h.meta["tau_min"], h.meta["max_s2_level"]
    for k in range(h.num_levels):
        lv = h.level(k)
        assert len(lv) > 0
        assert (np.diff(lv.cell_id.astype(np.float64)) >= 0).all() and np.unique(lv.cell_id).size == len(lv)
        assert (s2.level_of(lv.cell_id) == lv.s2_level).all()
        assert (lv.count >= tau_min).all(), "every kept cell meets tau_min"
        assert ((lv.count <= tau_max[k]) | (lv.s2_level == max_s2)).all(), "only max-S2-level cells exceed tau_max"
        # cells of a level are disjoint: each range ends before the next begins
        assert (s2.range_max(lv.cell_id[:-1]) < s2.range_min(lv.cell_id[1:])).all()
        if k == 0:
            assert (lv.parent == -1).all()
            continue
        up = h.level(k - 1)
        assert lv.parent.min() >= 0 and lv.parent.max() < len(up)
        # the recorded parent is the S2 ancestor (or the same cell, carried down)
        assert (lv.s2_level >= up.s2_level[lv.parent]).all()
        assert (s2.parent(lv.cell_id, up.s2_level[lv.parent]) == up.cell_id[lv.parent]).all()
        # counts add up: each parent's count is the sum of its children's
        summed = np.bincount(lv.parent, weights=lv.count, minlength=len(up))
        assert (summed == up.count).all()
    assert int(h.level(0).count.sum()) == h.meta["n_covered"]
    # every input point is located at all levels, consistently with the parents, or at none
    loc = h.locate(lat, lon)
    located = (loc >= 0).all(axis=1)
    assert ((loc >= 0).any(axis=1) == located).all()
    assert located.sum() == h.meta["n_covered"]
    for k in range(1, h.num_levels):
        assert (h.level(k).parent[loc[located, k]] == loc[located, k - 1]).all()
    # per-cell photo counts equal what locate assigns
    for k in range(h.num_levels):
        assert (np.bincount(loc[located, k], minlength=len(h.level(k))) == h.level(k).count).all()
    return loc


def test_default_hierarchy_invariants(default_hierarchy, default_points):
    h = default_hierarchy
    assert h.num_levels == 7
    assert h.meta["tau_max"] == [530, 276, 144, 75, 39, 20, 11]
    assert h.meta["tau_min"] == 2
    sizes = h.sizes
    assert all(a < b for a, b in zip(sizes, sizes[1:])), "levels get finer"
    assert h.meta["n_covered"] > 0.9 * h.meta["n_points"]
    check_invariants(h, *default_points)


def test_representative_points_lie_in_their_cells(default_hierarchy):
    h = default_hierarchy
    for k in (0, 3, 6):
        lv = h.level(k)
        loc = h.locate(lv.rep_lat, lv.rep_lon, strict=False)[:, k]
        assert (loc == np.arange(len(lv))).mean() > 0.999


def test_ancestors_table(default_hierarchy):
    anc = default_hierarchy.ancestors()
    fin = default_hierarchy.level(-1)
    assert anc.shape == (len(fin), 7)
    lv5 = default_hierarchy.level(5)
    assert (anc[:, 5] == fin.parent).all()
    assert (anc[:, 4] == lv5.parent[anc[:, 5]]).all()


def clustered_points(seed=0):
    rng = np.random.default_rng(seed)
    centres = [(48.85, 2.35, 3000), (40.7, -74.0, 2000), (35.0, 179.99, 500), (-33.9, 151.2, 800),
               (89.5, 10.0, 50)]
    lat, lon = [], []
    for la, lo, n in centres:
        lat.append(np.clip(la + rng.normal(0, 0.5, n), -90, 90))
        lon.append((lo + rng.normal(0, 0.5, n) + 180) % 360 - 180)
    lat.append(np.array([-80.0, -80.0]))  # the only 2 photos on S2 face 5: below tau_min from level 0 on
    lon.append(np.array([0.0, 120.0]))
    lat.append(np.full(40, 10.0))  # 40 photos at one spot: cannot be split below max_s2_level
    lon.append(np.full(40, 20.0))
    return np.concatenate(lat), np.concatenate(lon)


def test_synthetic_invariants_and_determinism():
    lat, lon = clustered_points()
    h = build_hierarchy(lat, lon, tau_max=[800, 200, 50, 12], tau_min=3, max_s2_level=16)
    loc = check_invariants(h, lat, lon)
    # the 40 identical photos sit in one max-level cell that exceeds tau_max at the finest level
    spot = loc[-1, -1]
    assert h.level(-1).count[spot] == 40 and h.level(-1).s2_level[spot] == 16
    # the 2 lone photos are dropped: below tau_min
    assert (loc[-42:-40] == -1).all() and (loc[:-42] >= 0).mean() > 0.95
    # deterministic, whatever the input order
    perm = np.random.default_rng(1).permutation(lat.size)
    h2 = build_hierarchy(lat[perm], lon[perm], tau_max=[800, 200, 50, 12], tau_min=3, max_s2_level=16)
    assert h2.digest() == h.digest()


def test_structure_digest_is_which_cells_not_the_last_bits_of_their_points(default_hierarchy):
    h = default_hierarchy
    moved = copy.deepcopy(h)
    moved.rep_lon = np.nextafter(moved.rep_lon, 0.0)  # what another CPU's sin / cos leave
    assert moved.digest() != h.digest() and moved.structure_digest() == h.structure_digest()
    fewer = copy.deepcopy(h)
    fewer.count[5] += 1
    assert fewer.structure_digest() != h.structure_digest()
    fewer.count[5] -= 1
    fewer.parent[-1] = fewer.parent[-1] + 1
    assert fewer.structure_digest() != h.structure_digest()


def test_antimeridian_cluster_is_one_region():
    lat, lon = clustered_points()
    h = build_hierarchy(lat, lon, tau_max=[800, 200, 50, 12], tau_min=3, max_s2_level=16)
    sel = slice(5000, 5500)  # the cluster at lon 179.99
    loc = h.locate(lat[sel], lon[sel])
    assert (loc >= 0).mean() > 0.9
    d = 180 - np.abs(h.level(0).rep_lon[loc[loc[:, 0] >= 0, 0]])  # degrees from the antimeridian
    assert (d < 2).all()  # representative points stay near the antimeridian, not at lon 0


def test_save_load_roundtrip(tmp_path, default_hierarchy):
    p = default_hierarchy.save(tmp_path / "cells.npz")
    h = load_hierarchy(p)
    assert h.digest() == default_hierarchy.digest()
    assert h.sizes == default_hierarchy.sizes
    assert h.meta["tau_max"] == default_hierarchy.meta["tau_max"]
    assert not list(tmp_path.glob(".*.tmp"))
    np.testing.assert_array_equal(h.level(3).rep_lat, default_hierarchy.level(3).rep_lat)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        load_hierarchy(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="bad.npz: not a geosurge hierarchy"):
        load_hierarchy(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(InputFileError, match="other.npz"):
        load_hierarchy(other)


def test_subset_keeps_structure(default_hierarchy):
    h = default_hierarchy
    keep = [np.zeros(n, bool) for n in h.sizes]
    keep[-1][:100] = True
    anc = h.ancestors()[:100]
    for k in range(h.num_levels - 1):
        keep[k][anc[:, k]] = True
    sub = h.subset(keep)
    assert sub.sizes[-1] == 100
    fin = sub.level(-1)
    assert (fin.cell_id == h.level(-1).cell_id[:100]).all()
    for k in range(1, sub.num_levels):
        lv, up = sub.level(k), sub.level(k - 1)
        assert (s2.parent(lv.cell_id, up.s2_level[lv.parent]) == up.cell_id[lv.parent]).all()


def test_scaled_taus():
    tmax, tmin = scaled_taus(4_720_000)
    assert tmax == [25000, 13026, 6787, 3536, 1842, 960, 500] and tmin == 100
    tmax5, _ = scaled_taus(4_720_000, levels=5)
    assert tmax5[0] == 25000 and tmax5[-1] == 500 and len(tmax5) == 5


def test_build_rejects_bad_parameters():
    with pytest.raises(ValueError):
        build_hierarchy([0.0], [0.0], tau_max=[1], tau_min=5)
    with pytest.raises(ValueError, match="tau_min"):
        build_hierarchy([0.0, 1.0], [0.0, 1.0], tau_max=[10], tau_min=5)


def test_prior_mode_is_the_finest_cell_holding_most_photos():
    """The prior baseline's point: the representative point of the finest cell with the largest count."""
    import numpy as np

    from geosurge.geo import build_hierarchy, haversine_km

    rng = np.random.default_rng(0)
    lat = np.concatenate([48.85 + rng.normal(0, 0.01, 300), rng.uniform(-60, 60, 300)])  # a crowd in Paris
    lon = np.concatenate([2.35 + rng.normal(0, 0.01, 300), rng.uniform(-180, 180, 300)])
    h = build_hierarchy(lat, lon, tau_max=[400, 100], tau_min=2, max_s2_level=14)
    plat, plon = h.prior_mode()
    fin = h.level(-1)
    i = int(np.argmax(fin.count))
    assert (plat, plon) == (float(fin.rep_lat[i]), float(fin.rep_lon[i]))
    assert haversine_km(plat, plon, 48.85, 2.35) < 50
