"""Calibrated uncertainty (geosurge.export.uncertainty): the prediction's temperature is found where it is known,
makes an overconfident radius cover the truth, is recorded by export and applied by the runtime without changing
the answer or the top-k."""
import csv
import json

import numpy as np
import pytest

from geosurge import api
from geosurge.errors import GeosurgeError
from geosurge.export.uncertainty import MIN_IMAGES, coverage, fit_temperature
from geosurge.runtime import Localizer
from geosurge.runtime.cells import CellScorer
from geosurge.samples import sample_photo_paths

from .conftest import run_cli

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def scorer(default_hierarchy):
    rng = np.random.default_rng(0)
    tables = [rng.normal(size=(n, 8)).astype(np.float32) for n in default_hierarchy.sizes]
    return CellScorer.from_arrays(default_hierarchy, tables, np.ones(len(tables), np.float32), "float32")


def _draw(scorer, n, t_true, sharpen, seed):
    """n images whose true cell is drawn from softmax(u / t_true) of random logits u; the model reports A = sharpen
    * u (sharpen > 1: overconfident by that factor). Returns (A, lat, lon) of the truths (their cells' points)."""
    rng = np.random.default_rng(seed)
    m = scorer.ancestors.shape[0]
    u = rng.normal(scale=3.0, size=(n, m))
    p = np.exp((u - u.max(1, keepdims=True)) / t_true)
    p /= p.sum(1, keepdims=True)
    cells = np.array([rng.choice(m, p=row) for row in p])
    return (sharpen * u).astype(np.float32), scorer.rep_lat[cells], scorer.rep_lon[cells]


def test_the_fitted_temperature_is_the_true_one_and_calibrates_the_radius(scorer):
    a, lat, lon = _draw(scorer, 400, t_true=1.0, sharpen=4.0, seed=1)
    rec = fit_temperature(a, lat, lon, scorer, **QUIET)
    assert rec["temperature"] == pytest.approx(4.0, rel=0.15)  # undoes the sharpening
    assert rec["nll"] < rec["nll_before"] and rec["images"] == 400
    # the overconfident radius missed the truth far more often than 68%; calibrated, it covers about that share, on
    # images the fit never saw too
    a2, lat2, lon2 = _draw(scorer, 400, t_true=1.0, sharpen=4.0, seed=2)
    before = coverage(a2, lat2, lon2, scorer, 1.0)[0]
    after = coverage(a2, lat2, lon2, scorer, rec["temperature"])[0]
    assert before < 0.5 and abs(after - 0.68) < 0.1
    # an underconfident model gets a temperature below 1
    a3, lat3, lon3 = _draw(scorer, 400, t_true=1.0, sharpen=0.5, seed=3)
    assert fit_temperature(a3, lat3, lon3, scorer, **QUIET)["temperature"] == pytest.approx(0.5, rel=0.15)
    with pytest.raises(GeosurgeError, match=f"at least {MIN_IMAGES}"):
        fit_temperature(a[:10], lat[:10], lon[:10], scorer, **QUIET)


def _views(tmp_path, n):
    out = tmp_path / "views"
    r = run_cli("geosurge", "views", "-o", out, "-n", n, "--source", "bmng", "--size", "64", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out / "manifest.csv"


def test_export_records_the_temperature_and_the_runtime_applies_it(tmp_path):
    views = _views(tmp_path, 120)
    photo = sample_photo_paths()[0]
    plain = api.export("tiny", tmp_path / "plain", **QUIET)
    cal = api.export("tiny", tmp_path / "cal", uncertainty_images=views, **QUIET)
    u = cal.manifest.uncertainty
    assert plain.manifest.uncertainty is None
    assert MIN_IMAGES <= u.images <= 120  # those whose truth lies in a cell of the table
    assert u.temperature > 0 and u.nll <= u.nll_before and u.source == str(views)
    assert json.loads((cal.root / "manifest.json").read_text())["uncertainty"]["temperature"] == u.temperature
    with Localizer(plain) as lp, Localizer(cal) as lc:
        assert lp.temperature == 1.0 and lc.temperature == u.temperature
        p, c = lp.locate(photo), lc.locate(photo)
        # the same answer and top-k cells; the probabilities are softmax(A / T) of the search's scores
        assert (p["lat"], p["lon"]) == (c["lat"], c["lon"])
        assert [x["cell"] for x in p["top_k"]] == [x["cell"] for x in c["top_k"]]
        r = lc.scorer.search(lc.embed(lc.preprocess(photo)[None])[0], 5, with_scores=True)
        z = r.scores[0].astype(np.float64) / u.temperature
        want = np.exp(r.logit_sums[0] / u.temperature - (z.max() + np.log(np.exp(z - z.max()).sum())))
        np.testing.assert_allclose([x["prob"] for x in c["top_k"]], want, atol=2e-6)
        assert c["confidence"] == pytest.approx(want[0], abs=2e-6)
        # the radius is never below the best cell's own extent (its corners from its point)
        for pred, loc in ((p, lp), (c, lc)):
            best = pred["top_k"][0]["index"]
            assert pred["uncertainty_km"] >= round(loc.scorer.cell_extent_km(best), 1) > 0


def test_uncertainty_images_need_ground_truth_and_enough_of_them(tmp_path):
    views = _views(tmp_path, 12)
    r = run_cli("geosurge", "export", "--model", "tiny", "-o", tmp_path / "b", "--uncertainty-images", views)
    assert r.returncode == 2 and f"at least {MIN_IMAGES} are needed" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()
    folder = views.parent  # images without coordinates
    r = run_cli("geosurge", "export", "--model", "tiny", "-o", tmp_path / "b", "--uncertainty-images", folder)
    assert r.returncode == 2 and "needs ground truth" in r.stderr and "Traceback" not in r.stderr
    no_truth = tmp_path / "paths.csv"  # a CSV without the columns: named by the reader
    with open(no_truth, "w", newline="") as f:
        csv.writer(f).writerows([["path"], *[[str(p)] for p in sample_photo_paths()]])
    r = run_cli("geosurge", "export", "--model", "tiny", "-o", tmp_path / "b", "--uncertainty-images", no_truth)
    assert r.returncode == 2 and "missing column(s) lat, lon" in r.stderr and "Traceback" not in r.stderr
