"""Pruning the cell hierarchy: region cuts keep exactly the intersecting cells + ancestors (checked with an
independent point-in-region test), keep-mass keeps the right mass, level cuts, PCA / int8 tables within tolerance,
pruned bundles verify and locate, the outside-region flag, and bad regions."""
import json

import numpy as np
import pytest

from geosurge.data.views import write_view_manifest
from geosurge.errors import GeosurgeError
from geosurge.export.bundle import write_bundle
from geosurge.export.prune import Cut, evaluate_cut, plan, probe_embeddings, prune_bundle
from geosurge.export.source import load_model
from geosurge.geo import regions
from geosurge.runtime import Localizer
from geosurge.runtime.cells import CellScorer
from geosurge.runtime.places import Places
from geosurge.runtime.verify import verify_bundle
from geosurge.samples import sample_photo_paths

from .conftest import random_sphere_points, run_cli

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def src_bundle(tmp_path_factory, default_hierarchy):
    model, source = load_model("tiny", seed=0, hierarchy=default_hierarchy)
    out = tmp_path_factory.mktemp("prune") / "full"
    write_bundle(out, model, source, sample_photo_paths(), **QUIET)
    return out


def _points_in(region, n=20000, seed=0):
    lat, lon = random_sphere_points(n, seed)
    inside = regions.contains_points(region, lat, lon)
    return lat[inside], lon[inside]


@pytest.mark.parametrize("cut", [Cut(bbox="-5,41,10,51.5"), Cut(countries="JP"), Cut(bbox="170,-50,-170,-30")])
def test_region_keeps_every_cell_holding_a_point_of_the_region_and_ancestors(default_hierarchy, cut):
    h = default_hierarchy
    p = plan(h, cut)
    masks, region = p["masks"], p["region"]
    lat, lon = _points_in(region, 200000)
    assert lat.size > 20
    loc = h.locate(lat, lon, strict=False)  # independent: which cells hold points that lie inside the region
    for k in range(h.num_levels):
        held = np.unique(loc[:, k][loc[:, k] >= 0])
        assert masks[k][held].all(), f"level {k}: a cell holding a point of the region was dropped"
    for k in range(1, h.num_levels):  # ancestors of kept cells are kept
        assert masks[k - 1][h.level(k).parent[masks[k]]].all()
    # and nothing far away: no finest cell holding a point 25 degrees or more from the region is kept
    import shapely

    far_lat, far_lon = _points_in(shapely.difference(shapely.box(-180, -90, 180, 90), region.buffer(25)), 20000, 1)
    far = h.locate(far_lat, far_lon, strict=False)[:, -1]
    assert not masks[-1][far[far >= 0]].any()


def test_antimeridian_bbox_keeps_both_sides(default_hierarchy):
    p = plan(default_hierarchy, Cut(bbox="175,-45,-175,-35"))  # New Zealand's east / Chatham side
    lvl = default_hierarchy.level(0)
    lon = lvl.rep_lon[p["masks"][0]]
    assert (lon > 0).any() or (lon < 0).any()
    region = p["region"]
    assert regions.contains_points(region, [-40, -40], [178, -178]).all()
    assert not regions.contains_points(region, [-40], [0]).any()


def test_keep_mass_keeps_the_right_mass(default_hierarchy):
    h = default_hierarchy
    for share in (0.5, 0.9):
        m = plan(h, Cut(keep_mass=share))["masks"]
        counts = h.level(-1).count
        kept = counts[m[-1]].sum() / counts.sum()
        assert kept >= share - 1e-9
        # the fewest cells: dropping the smallest kept cell falls below the share
        smallest = counts[m[-1]].min()
        assert (counts[m[-1]].sum() - smallest) / counts.sum() < share
        # and they are the largest cells
        assert counts[m[-1]].min() >= counts[~m[-1]].max()


def test_pruned_bundles_verify_locate_and_flag_outside(tmp_path, src_bundle):
    out = prune_bundle(src_bundle, tmp_path / "fr", Cut(countries="FR,BE"), **QUIET)
    m = json.loads((out / "manifest.json").read_text())
    assert m["pruning"]["cut"]["countries"] == "FR,BE"
    assert m["hierarchy"]["sizes"] == CellScorer.load(out / "cells.npz", out / "cell_table.npz").hierarchy.sizes
    assert sum(m["hierarchy"]["sizes"]) < 0.2 * sum(m["pruning"]["source_sizes"])
    assert verify_bundle(out)["passed"]
    loc = Localizer(out)
    pred = loc.locate(sample_photo_paths()[0])
    assert "outside_region" in pred and 0 <= pred["region_mass"] <= 1
    countries = set(Places.load(out / "places.npz", layout=m["places"]["layout"]).country)
    assert countries and countries <= {"France", "Belgium", "Luxembourg", "Germany", "The Netherlands", "Switzerland",
                                       "Spain", "Italy", "Monaco", "Andorra", "United Kingdom",
                                       "French Guiana"}  # Natural Earth's France includes French Guiana
    assert {"France", "Belgium"} <= countries
    # probes drawn from far away are flagged outside; probes from the kept cells mostly are not
    full = CellScorer.load(src_bundle / "cells.npz", src_bundle / "cell_table.npz")
    rep = evaluate_cut(full, out, probe_embeddings(full, 400)[0])
    assert rep["outside_share"] > 0.8 and rep["outside_flagged"] > 0.9
    assert rep["cells"] == sum(m["hierarchy"]["sizes"])


def test_level_cut_relinks_parents(tmp_path, src_bundle, default_hierarchy):
    out = prune_bundle(src_bundle, tmp_path / "l", Cut(drop_levels=[1, 3], table="int8"), **QUIET)
    sc = CellScorer.load(out / "cells.npz", out / "cell_table.npz")
    h = default_hierarchy
    assert sc.hierarchy.sizes == [h.sizes[k] for k in (0, 2, 4, 5, 6)]
    # a kept level-2 cell's new parent is its level-0 ancestor
    anc = h.ancestors()
    new_anc = sc.hierarchy.ancestors()
    np.testing.assert_array_equal(new_anc[:, 0], anc[:, 0])
    np.testing.assert_array_equal(new_anc[:, 1], anc[:, 2])
    assert verify_bundle(out)["passed"]
    out5 = prune_bundle(src_bundle, tmp_path / "l5", Cut(levels=5), **QUIET)
    assert CellScorer.load(out5 / "cells.npz", out5 / "cell_table.npz").hierarchy.sizes == h.sizes[:5]


def test_pca_table_stays_close_to_the_full_scores(tmp_path, src_bundle):
    full = CellScorer.load(src_bundle / "cells.npz", src_bundle / "cell_table.npz")
    d = full.tables[0].shape[1]
    z, _ = probe_embeddings(full, 200)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    for dim in (d // 2, d - 4):
        out = prune_bundle(src_bundle, tmp_path / f"pca{dim}", Cut(dim=dim, table="float32"), **QUIET)
        red = CellScorer.load(out / "cells.npz", out / "cell_table.npz")
        assert red.tables[0].shape[1] == dim and red.projection.shape == (d, dim)
        P = red.projection
        np.testing.assert_allclose(P.T @ P, np.eye(dim), atol=1e-5)
        z_perp = zn - zn @ P @ P.T
        for k, (a, b) in enumerate(zip(full.level_logits(z), red.level_logits(z))):
            t_perp = full.tables[k] - full.tables[k] @ P @ P.T
            # the stated tolerance: a cosine moves by exactly z_perp . t_perp, so at most |z_perp| |t_perp|
            bound = np.linalg.norm(z_perp, axis=1)[:, None] * np.linalg.norm(t_perp, axis=1)[None, :]
            assert (np.abs(a - b) * full.temperatures[k] <= bound + 1e-4).all()
        m = json.loads((out / "manifest.json").read_text())
        assert 0 < m["cell_table"]["pca_energy"] <= 1
        assert verify_bundle(out)["passed"]
    rep = evaluate_cut(full, out, z)  # d - 4 of d dimensions
    assert m["cell_table"]["pca_energy"] > 0.8
    assert rep["outside_share"] == 0 and np.isfinite(rep["median_drift_km"])


@pytest.mark.parametrize("args,match", [
    (["--bbox", "1,2,3"], "four numbers"),
    (["--bbox", "10,50,10,60"], "empty"),
    (["--bbox", "0,10,5,5"], "MINLAT < MAXLAT"),
    (["--countries", "XX,FR"], "unknown ISO"),
    (["--bbox=-140,-50,-139.5,-49.5"], "keeps no cell"),
    (["--keep-mass", "1.5"], "keep-mass"),
    (["--drop-levels", "0,1,2,3,4,5,6"], "no level"),
])
def test_bad_cuts_are_clear_errors(tmp_path, src_bundle, args, match):
    r = run_cli("geosurge", "prune", src_bundle, "-o", tmp_path / "x", *args)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_bad_geojson_is_a_clear_error(tmp_path):
    bow = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    (tmp_path / "bow.geojson").write_text(json.dumps(bow))
    with pytest.raises(GeosurgeError, match="Self-intersection"):
        regions.geojson_region(tmp_path / "bow.geojson")
    (tmp_path / "pt.geojson").write_text(json.dumps({"type": "Point", "coordinates": [0, 0]}))
    with pytest.raises(GeosurgeError, match="expected Polygon"):
        regions.geojson_region(tmp_path / "pt.geojson")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(GeosurgeError, match="not valid JSON"):
        regions.geojson_region(tmp_path / "bad.geojson")
    fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[-5, 41], [10, 41], [10, 51.5], [-5, 51.5], [-5, 41]]]}}]}
    (tmp_path / "ok.geojson").write_text(json.dumps(fc))
    g = regions.geojson_region(tmp_path / "ok.geojson")
    assert regions.contains_points(g, [48.85], [2.35]).all()


def test_prune_cli_report(tmp_path, src_bundle):
    r = run_cli("geosurge", "prune", src_bundle, "-o", tmp_path / "m", "--keep-mass", "0.9", "--table", "int8",
                "--report", "--probes", "128", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    cut = [row for row in rep["rows"] if row["bundle"] == "cut"]
    assert cut and all(row["table_mb"] < 0.5 * rep["rows"][0]["table_mb"] for row in cut)
    assert "cost of the cut" in r.stdout


def test_writers_never_replace_a_folder_or_file_that_is_not_theirs(tmp_path, src_bundle, default_hierarchy):
    """export, prune, views and checkpoints replace only what they wrote (a bundle, a view set, a checkpoint) or an
    empty folder; a user's folder or a file is refused with one line naming it, before any work, and left as it was."""
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out in (mine, afile):
        r = run_cli("geosurge", "prune", src_bundle, "-o", out, "--countries", "FR")
        assert r.returncode == 2 and str(out) in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert ("is not a geosurge bundle" if out.is_dir() else "is not a folder") in r.stderr
        r = run_cli("geosurge", "export", "--model", "tiny", "--seed", "0", "-o", out)
        assert r.returncode == 2 and str(out) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (mine / "thesis.txt").read_text() == "precious" and afile.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "thesis"]  # nothing left beside them
    with pytest.raises(GeosurgeError, match="is not a view set"):
        write_view_manifest(mine, [])
    model, _ = load_model("tiny", seed=0, hierarchy=default_hierarchy)
    with pytest.raises(GeosurgeError, match="is not a geosurge checkpoint"):
        model.save_pretrained(mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    # an existing bundle, and an empty folder, are replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, empty):  # the second time: a bundle
        r = run_cli("geosurge", "prune", src_bundle, "-o", out, "--countries", "FR")
        assert r.returncode == 0, r.stderr
        assert (out / "manifest.json").is_file()
    # ... but not a bundle with a file of the user's beside its own, a folder whose manifest.json is someone else's,
    # or a symbolic link (the writer would replace the link)
    (empty / "notes.txt").write_text("mine")
    other = tmp_path / "webapp"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my web app"}')
    link = tmp_path / "current"
    link.symlink_to(empty)
    for out, why in ((empty, "other files beside its own (notes.txt)"), (other, "is not a geosurge bundle"),
                     (link, "a symbolic link")):
        r = run_cli("geosurge", "prune", src_bundle, "-o", out, "--countries", "FR")
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (empty / "notes.txt").read_text() == "mine" and (other / "manifest.json").is_file() and link.is_symlink()
    # a folder of labelled photos with its path,lat,lon manifest is not a view set
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "manifest.csv").write_text("path,lat,lon\nphoto.jpg,1,2\n")
    with pytest.raises(GeosurgeError, match="is not a view set"):
        write_view_manifest(photos, [])
    # a checkpoint the trainers resumed from (optimizer and state beside the weights) is still one to replace
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    (ck / "optimizer.safetensors").write_bytes(b"x")
    (ck / "trainer_state.json").write_text("{}")
    model.save_pretrained(ck)
