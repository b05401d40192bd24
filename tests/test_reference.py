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
