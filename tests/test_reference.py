"""The reference model: a toy run of the whole recipe (tiny config, a handful of views) and the cached reuse."""
import copy
import json

import pytest

from geosurge.training import reference as R


@pytest.mark.slow  # ~30 s idle, 100 s on a busy 2-core machine: decodes both mosaics, draws 20K test candidates
def test_ensure_reference_model_trains_once_and_reuses(tmp_path, monkeypatch):
    from geosurge.models import GeoSurge

    recipe = R.ReferenceRecipe(config="tiny", train_views=48, test_views=6, min_km=300.0, epochs=1, batch_size=16)
    cache = tmp_path / "cache"
    ck = R.ensure_reference_model(cache, recipe, log=lambda m: None, progress=False, engine="torch")
    assert ck.name == "checkpoint" and ck.parent.parent == cache
    assert sorted(p.name for p in cache.iterdir()) == [ck.parent.name]  # no temp folder left behind
    model = GeoSurge.from_pretrained(ck)
    assert model.config.name == "tiny"
    rep = json.loads((ck.parent / R.REPORT_FILE).read_text())
    assert rep["key"] == R.recipe_key(recipe) and ck.parent.name.endswith(rep["key"][:16])
    names = {(r["model"], r["views"]) for r in rep["rows"]}
    assert {("prior's most likely cell", "heldout"), ("untrained model", "heldout"), ("reference model", "heldout"),
            ("reference model", "second"), ("reference model", "train (sample)")} <= names
    assert rep["views"] == {"train": 48, "heldout": 6, "second": 6}
    # the held-out views were written with their true places, for `geosurge eval`
    from geosurge.evaluation import read_items

    items, fmt = read_items(ck.parent / R.HELDOUT_DIR / "manifest.csv")
    assert fmt == "geosurge" and len(items) == 12 and {i.source for i in items} == {"bmng", "shadedrelief"}
    assert all(i.path.is_file() for i in items)

    def no_training(*a, **k):
        raise AssertionError("the cached reference model should have been reused")

    monkeypatch.setattr(R, "train_reference", no_training)
    assert R.ensure_reference_model(cache, recipe, log=lambda m: None) == ck
    # a different recipe is a different model
    assert R.recipe_key(R.ReferenceRecipe(**{**recipe.to_dict(), "epochs": 2})) != rep["key"]
    with pytest.raises(AssertionError):
        R.ensure_reference_model(cache, R.ReferenceRecipe(**{**recipe.to_dict(), "epochs": 2}),
                                 log=lambda m: None)
    assert sorted(p.name for p in cache.iterdir()) == [ck.parent.name]  # the failed run left nothing


def test_recipe_validation():
    from geosurge.errors import GeosurgeError

    with pytest.raises(GeosurgeError):
        R.ReferenceRecipe(footprint_km=(800.0, 400.0))
    with pytest.raises(GeosurgeError):
        R.ReferenceRecipe.from_dict({"epochs": 1, "bogus": 2})
    r = R.ReferenceRecipe.from_dict(R.ReferenceRecipe(train_views=10).to_dict())
    assert r.train_views == 10 and r.footprint_km == (600.0, 1600.0)


@pytest.fixture(scope="module")
def small_hierarchy():
    import numpy as np

    from geosurge.geo import build_hierarchy

    rng = np.random.default_rng(0)
    return build_hierarchy(rng.uniform(-60, 60, 3000), rng.uniform(-180, 180, 3000), tau_max=[200, 60],
                           tau_min=2, max_s2_level=12)


def test_shipped_weights_round_trip_and_refusals(tmp_path, small_hierarchy):
    """Only the trained tensors ship (not the backbone, not the GeoCLIP-initialised tables); loading rebuilds the
    rest, refuses a damaged file, and says why another recipe or hierarchy does not match."""
    import torch

    from geosurge.errors import GeosurgeError
    from geosurge.models import build_model
    from geosurge.training.shipped import ShippedWeights, trained_state, write_shipped_weights

    recipe = R.ReferenceRecipe(config="tiny", train_views=48, test_views=6, epochs=1)
    torch.manual_seed(recipe.seed)
    model = build_model("tiny", small_hierarchy)
    with torch.no_grad():  # "training": change every shipped tensor away from its seeded init
        for k, v in trained_state(model, recipe).items():
            if v.is_floating_point():
                v.add_(0.01 * torch.randn_like(v))
    manifest = tmp_path / "heldout.csv"  # the held-out views as training wrote them: the train source's are kept
    manifest.write_text("path,lat,lon,source,heading_deg,footprint_km\nbmng/0.jpg,10.5,20.25,bmng,30.00,700.0\n"
                        "shadedrelief/0.jpg,10.5,20.25,shadedrelief,30.00,700.0\n")
    report = {"hierarchy": small_hierarchy.digest(), "hierarchy_structure": small_hierarchy.structure_digest(),
              "rows": [{"model": "reference model", "views": "heldout"}],
              "heldout_manifest": str(manifest), "sources": {"train": "bmng", "second": "shadedrelief"}}
    rec = write_shipped_weights(model, recipe, report, tmp_path, dtype="float32")
    assert not any(k.startswith(("backbone.", "head.tables.")) for k in trained_state(model, recipe))
    assert rec["weights"]["tensors"] == len(trained_state(model, recipe))
    assert rec["recipe_hash"] == R.recipe_hash(recipe) and rec["hierarchy_digest"] == small_hierarchy.digest()

    w = ShippedWeights.find("tiny", tmp_path)
    assert w.mismatch(recipe, small_hierarchy) is None
    (spec,) = w.heldout_specs(64)
    assert (spec.lat, spec.lon, spec.heading_deg, spec.footprint_km, spec.size) == (10.5, 20.25, 30.0, 700.0, 64)
    back = w.load(recipe, small_hierarchy)
    for k, v in model.state_dict().items():  # shipped tensors as written, the rest rebuilt from the seed
        assert torch.equal(back.state_dict()[k], v), k
    assert "recipe" in w.mismatch(R.ReferenceRecipe(**{**recipe.to_dict(), "epochs": 2}), small_hierarchy)
    import numpy as np

    from geosurge.geo import build_hierarchy

    other = build_hierarchy(np.array([10.0, 20.0]), np.array([10.0, 20.0]), tau_max=[5], tau_min=1, max_s2_level=8)
    assert "hierarchy" in w.mismatch(recipe, other)
    # the same cells built on another CPU: representative points off in the last bits (numpy's AVX-512 vs AVX2
    # trigonometry) still match; a record without the structure digest (written before it) compares bit for bit
    moved = copy.deepcopy(small_hierarchy)
    moved.rep_lat = np.nextafter(moved.rep_lat, 90.0)
    assert moved.digest() != small_hierarchy.digest() and w.mismatch(recipe, moved) is None
    w.record.pop("hierarchy_structure_digest")
    assert w.mismatch(recipe, small_hierarchy) is None and "hierarchy" in w.mismatch(recipe, moved)
    data = bytearray(w.weights.read_bytes())
    data[-1] ^= 0xFF
    w.weights.write_bytes(bytes(data))
    with pytest.raises(GeosurgeError, match="sha256"):
        w.load(recipe, small_hierarchy)



def test_fp16_parity_of_the_trained_tensors(small_hierarchy):
    """What storing the trained tensors as float16 changes, measured on cached features: a report with the same keys
    the shipping step reads (a KeyError here once ended a 25-minute shipping run after training)."""
    import numpy as np
    import torch

    from geosurge.data.views import ViewSpec
    from geosurge.models import build_model

    recipe = R.ReferenceRecipe(config="tiny")
    torch.manual_seed(0)
    model = build_model("tiny", small_hierarchy).eval()
    size = model.config.preprocess.size
    with torch.no_grad():
        out = model.backbone(torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(0)))
    lat, lon = np.linspace(-40, 40, 6), np.linspace(-150, 150, 6)
    vs = R.ViewSet("heldout", [ViewSpec(a, b) for a, b in zip(lat, lon)], small_hierarchy.locate(lat, lon),
                   out.tokens.numpy().astype(np.float16), out.global_token.numpy().astype(np.float16))
    rep = R.fp16_parity(model, recipe, [vs])
    assert rep["views"] == 6 and 0.0 <= rep["cell_agreement"] <= 1.0 and rep["max_drift_km"] >= 0.0
    assert {"fp32_acc@750km", "fp16_acc@750km", "fp32_acc@2500km", "fp16_acc@2500km"} <= set(rep)
    assert rep["passed"] == (rep["median_drift_km"] == 0.0
                             and abs(rep["fp32_acc@750km"] - rep["fp16_acc@750km"]) <= 0.5
                             and abs(rep["fp32_acc@2500km"] - rep["fp16_acc@2500km"]) <= 0.5)


# ---- the shipped reference model (geosurge/data/reference) ------------------------------------------------------
REGENERATE = ("regenerate the shipped weights with the current recipe: `geosurge reference -o runs/reference-ship "
              "--ship geosurge/data/reference` (~25 min on 2 cores), then commit geosurge/data/reference/")


@pytest.fixture(scope="module")
def shipped_edge():
    from geosurge.geo import build_default_hierarchy
    from geosurge.training.shipped import ShippedWeights

    w = ShippedWeights.find("edge")
    assert w is not None, f"no shipped reference weights for edge: {REGENERATE}"
    return w, build_default_hierarchy()


def test_shipped_record_matches_the_current_recipe(shipped_edge, tmp_path):
    """The shipped weights were trained with today's default recipe over today's default hierarchy (a recipe or
    hierarchy change without retraining fails here, saying how to regenerate); they stay small; a damaged copy is
    refused by its sha256 before anything loads."""
    import shutil

    from geosurge.errors import GeosurgeError
    from geosurge.training.shipped import ShippedWeights

    w, hierarchy = shipped_edge
    why = w.mismatch(R.ReferenceRecipe(), hierarchy)
    assert why is None, f"shipped reference weights do not match: {why}; {REGENERATE}"
    assert w.weights.stat().st_size == w.record["weights"]["bytes"] < 8e6  # package data stays a few MB
    assert len(w.heldout_specs(256)) == R.ReferenceRecipe().test_views

    shutil.copy(w.weights, tmp_path / w.weights.name)
    shutil.copy(w.weights.with_suffix(".json"), tmp_path / w.weights.with_suffix(".json").name)
    data = bytearray((tmp_path / w.weights.name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (tmp_path / w.weights.name).write_bytes(bytes(data))
    with pytest.raises(GeosurgeError, match=r"sha256 .* differs from its record .* refusing"):
        ShippedWeights.find("edge", tmp_path).load(R.ReferenceRecipe(), hierarchy)


def test_shipped_model_beats_both_baselines_on_heldout_views(shipped_edge):
    """The shipped model, rebuilt from its packages + shipped tensors, locates the first 48 held-out views (>= 300 km
    from every training centre) far better than the prior's most likely cell and the untrained model. Deterministic
    views; the margins (trained ~25% within 750 km and ~55% within 2,500 km when shipped, baselines 0% and <= 5%)
    are far wider than CPU numerics could move on 48 views."""
    import numpy as np
    import torch

    from geosurge.data import load_raster
    from geosurge.data.views import render_views
    from geosurge.evaluation import TorchPredictor
    from geosurge.geo import haversine_km, summarize_errors
    from geosurge.models import build_model

    w, hierarchy = shipped_edge
    recipe = R.ReferenceRecipe()
    torch.set_num_threads(2)
    trained = w.load(recipe, hierarchy)
    spec = trained.config.preprocess
    views = w.heldout_specs(spec.resize_size)[:48]
    rgbs = render_views(load_raster(recipe.source), views)
    lat, lon = np.array([v.lat for v in views]), np.array([v.lon for v in views])

    def summary(pred):
        return summarize_errors(haversine_km(lat, lon, pred[:, 0], pred[:, 1]))

    torch.manual_seed(recipe.seed)
    untrained = build_model(recipe.config, hierarchy).eval()
    mine = summary(TorchPredictor(None, model=trained).predict(rgbs))
    baselines = {"untrained": summary(TorchPredictor(None, model=untrained).predict(rgbs)),
                 "prior": summary(np.tile(hierarchy.prior_mode(), (len(views), 1)))}
    for name, b in baselines.items():
        assert mine["acc@750km"] >= b["acc@750km"] + 10, (name, mine, b)
        assert mine["acc@2500km"] >= b["acc@2500km"] + 20, (name, mine, b)
        assert mine["median_km"] < 0.5 * b["median_km"], (name, mine, b)


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_accuracy(shipped_edge, tmp_path):
    """Retrain with the default recipe (~25 min on 2 cores) and compare with the accuracy the shipped record
    measured: held-out acc@750 / acc@2500 within 6 points (same seed; BLAS and thread counts change the float
    summation order, hence the tolerance), and the retrained weights' recipe hash and hierarchy digest equal the
    record's."""
    w, hierarchy = shipped_edge
    report = R.train_reference(R.ReferenceRecipe(), tmp_path / "ref", progress=False, write_views=False,
                               threads=2, ship_to=tmp_path / "ship", hierarchy=hierarchy, log=lambda m: None)
    rows = {(r["model"], r["views"]): r for r in report["rows"]}
    shipped = {(r["model"], r["views"]): r for r in w.record["accuracy"]["rows"]}
    key = ("reference model", "heldout")
    for k in ("acc@750km", "acc@2500km"):
        assert abs(rows[key][k] - shipped[key][k]) <= 6.0, (k, rows[key], shipped[key])
    from geosurge.training.shipped import ShippedWeights

    new = ShippedWeights.find("edge", tmp_path / "ship")
    assert new.record["recipe_hash"] == w.record["recipe_hash"]
    assert new.record["hierarchy_digest"] == w.record["hierarchy_digest"]
