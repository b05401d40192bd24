"""Calibration sets: deterministic, geographically stratified selection, cache, feeders, bad input."""
import numpy as np
import pytest

from geosurge.calibration import build_calibration_set, selection_order
from geosurge.errors import GeosurgeError
from geosurge.images import load_image
from geosurge.models import get_config
from geosurge.preprocess import preprocess

from .synthetic import make_manifest

SPEC = get_config("tiny").preprocess


def test_selection_is_deterministic_and_stratified():
    strata = np.array([0] * 90 + [1] * 5 + [2] * 5)  # one dense region, two sparse ones
    a = selection_order(100, seed=3, strata=strata)
    assert (a == selection_order(100, seed=3, strata=strata)).all()
    assert sorted(a.tolist()) == list(range(100))
    first6 = strata[a[:6]]
    assert sorted(first6.tolist()) == [0, 0, 1, 1, 2, 2]  # every region twice before any region three times
    plain = selection_order(100, seed=3)
    assert (np.bincount(strata[plain[:6]], minlength=3)[1:] <= 6).all() and sorted(plain.tolist()) == list(range(100))


def test_manifest_set_is_stratified_cached_and_feeds_quantizers(tmp_path):
    csv, h, locs = make_manifest(tmp_path / "data", n_locations=8, per_location=10, bad_files=3)
    logs = []
    with pytest.warns(UserWarning, match="at least 100"):
        cs = build_calibration_set(csv, SPEC, size=16, seed=0, hierarchy=h, cache_dir=tmp_path / "cache",
                                   log=logs.append)
    assert len(cs) == 16 and cs.inputs.shape == (16, 3, 64, 64) and cs.stratified
    # held as uint8 pixels (a quarter of float32), read as exactly what preprocess gives each file
    assert cs.pixels.dtype == np.uint8 and cs.pixels.nbytes * 4 == cs.inputs.nbytes
    for i in (0, 7, 15):
        np.testing.assert_array_equal(cs.inputs[i], preprocess(load_image(cs.names[i], SPEC), SPEC))
    np.testing.assert_array_equal(cs.batch(np.array([15, 0])), cs.inputs[[15, 0]])
    assert not cs.from_cache
    # level-0 cells are spread evenly: no cell holds more than ceil(16 / cells) + 1 of the picks
    cells = h.locate(*_latlon(csv, cs.names), strict=False)[:, 0]
    counts = np.bincount(cells)
    assert counts.max() - counts[counts > 0].min() <= 1
    with pytest.warns(UserWarning):
        again = build_calibration_set(csv, SPEC, size=16, seed=0, hierarchy=h, cache_dir=tmp_path / "cache",
                                      log=logs.append)
    assert again.from_cache and again.digest == cs.digest
    np.testing.assert_array_equal(again.inputs, cs.inputs)
    # a changed image changes the content hash: no stale cache hit
    victim = next(p for p in (tmp_path / "data").glob("img_*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.warns(UserWarning):
        third = build_calibration_set(csv, SPEC, size=16, seed=0, hierarchy=h, cache_dir=tmp_path / "cache",
                                      log=logs.append)
    assert third.digest != cs.digest and not third.from_cache
    # feeders
    r = cs.ort_reader(batch_size=4)
    batches = []
    while (b := r.get_next()) is not None:
        batches.append(b["image"])
    assert [x.shape[0] for x in batches] == [4, 4, 4, 4]
    np.testing.assert_array_equal(np.concatenate(batches), cs.inputs)
    r.rewind()
    assert r.get_next()["image"].shape == (4, 3, 64, 64)
    assert cs.modelopt_input().shape == (16, 3, 64, 64)
    cal, held = cs.split(0.25)
    assert len(cal) == 12 and len(held) == 4 and not set(cal.names) & set(held.names)
    assert cs.summary()["size"] == 16


def _latlon(csv, names):
    from geosurge.training.data import read_manifest

    m = read_manifest(csv)
    idx = [next(i for i, p in enumerate(m.paths) if str(p) == n) for n in names]
    return m.lat[idx], m.lon[idx]


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    csv, h, _ = make_manifest(tmp_path / "data", n_locations=2, per_location=3, bad_files=4)
    with pytest.warns(UserWarning):
        cs = build_calibration_set(tmp_path / "data", SPEC, size=100, seed=0, log=lambda m: None)
    assert len(cs) == 6 and len(cs.skipped) == 4 and not cs.stratified
    assert all("broken" in s["input"] for s in cs.skipped)


def test_refuses_fewer_images_than_the_batch(tmp_path):
    make_manifest(tmp_path / "data", n_locations=1, per_location=2)
    with pytest.raises(GeosurgeError, match="fewer than the batch size 8"):
        build_calibration_set(tmp_path / "data", SPEC, size=50, batch_size=8, log=lambda m: None)
    with pytest.raises(GeosurgeError, match="nope: no such file or folder \\(calibration source\\)"):
        build_calibration_set(tmp_path / "nope", SPEC, log=lambda m: None)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(GeosurgeError, match="image folder or a CSV manifest"):
        build_calibration_set(tmp_path / "notes.txt", SPEC, log=lambda m: None)
