"""The reference model: a toy run of the whole recipe (tiny config, a handful of views) and the cached reuse."""
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
    report = {"hierarchy": small_hierarchy.digest(), "rows": [{"model": "reference model", "views": "heldout"}]}
    rec = write_shipped_weights(model, recipe, report, tmp_path, dtype="float32")
    assert not any(k.startswith(("backbone.", "head.tables.")) for k in trained_state(model, recipe))
    assert rec["weights"]["tensors"] == len(trained_state(model, recipe))
    assert rec["recipe_hash"] == R.recipe_hash(recipe) and rec["hierarchy_digest"] == small_hierarchy.digest()

    w = ShippedWeights.find("tiny", tmp_path)
    assert w.mismatch(recipe, small_hierarchy) is None
    back = w.load(recipe, small_hierarchy)
    for k, v in model.state_dict().items():  # shipped tensors as written, the rest rebuilt from the seed
        assert torch.equal(back.state_dict()[k], v), k
    assert "recipe" in w.mismatch(R.ReferenceRecipe(**{**recipe.to_dict(), "epochs": 2}), small_hierarchy)
    import numpy as np

    from geosurge.geo import build_hierarchy

    other = build_hierarchy(np.array([10.0, 20.0]), np.array([10.0, 20.0]), tau_max=[5], tau_min=1, max_s2_level=8)
    assert "hierarchy" in w.mismatch(recipe, other)
    data = bytearray(w.weights.read_bytes())
    data[-1] ^= 0xFF
    w.weights.write_bytes(bytes(data))
    with pytest.raises(GeosurgeError, match="sha256"):
        w.load(recipe, small_hierarchy)
