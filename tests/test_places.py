"""places.npz: the compact UTF-8 layout, the legacy numpy ``<U`` layout still read, and refused files."""
import json
import zipfile

import numpy as np
import pytest

from geosurge.errors import GeosurgeError
from geosurge.runtime.places import LAYOUT, LEGACY_LAYOUT, Places, Strings, save_places

NAMES = ["les Escaldes", "Andorra la Vella", "Warīsān", "Umm Suqaym", "São Paulo", "東京", "", "Zürich", "Springfield",
         "Springfield"]
ADMIN1 = ["08", "07", "03", "03", "27", "40", "", "ZH", "IL", "MO"]
COUNTRY = ["Andorra", "Andorra", "United Arab Emirates", "United Arab Emirates", "Brazil", "Japan", "Antarctica",
           "Switzerland", "United States", "United States"]


def _points(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)


def _save_legacy(path, lat, lon, name, admin1, country, meta=None):
    """The layout bundles were written in before ``utf8``: numpy fixed-width unicode columns, no ``layout``."""
    np.savez_compressed(path, lat=np.asarray(lat, np.float32), lon=np.asarray(lon, np.float32),
                        name=np.asarray(name, dtype=str), admin1=np.asarray(admin1, dtype=str),
                        country=np.asarray(country, dtype=str),
                        meta=np.frombuffer(json.dumps(meta or {}).encode(), np.uint8))


@pytest.fixture
def both(tmp_path):
    """The same 600 places (the sample names repeated) in the legacy and the new layout."""
    lat, lon = _points(600)
    cols = [[c[i % len(c)] for i in range(600)] for c in (NAMES, ADMIN1, COUNTRY)]
    _save_legacy(tmp_path / "old.npz", lat, lon, *cols, meta={"source": "test"})
    save_places(tmp_path / "new.npz", lat, lon, *cols, meta={"source": "test"})
    return Places.load(tmp_path / "old.npz"), Places.load(tmp_path / "new.npz"), cols


def test_old_and_new_layouts_give_identical_nearest(both):
    old, new, cols = both
    assert (old.layout, new.layout) == (LEGACY_LAYOUT, LAYOUT)
    assert old.meta["source"] == new.meta["source"] == "test"
    for col, want in zip(("name", "admin1", "country"), cols):
        assert list(getattr(old, col)) == list(getattr(new, col)) == want
    qlat, qlon = _points(300, seed=1)
    for a, b in zip(qlat, qlon):
        assert old.nearest(float(a), float(b)) == new.nearest(float(a), float(b))
    # the nearest of a place's own coordinates is that place (the first of duplicates), names intact
    i = 5
    got = new.nearest(float(new.lat[i]), float(new.lon[i]))
    assert got == {"name": "東京", "admin1": "40", "country": "Japan", "distance_km": 0.0}


def test_new_layout_is_compact_in_memory(both):
    old, new, _ = both
    n = len(new)
    # UTF-32 '<U20' alone would be 80 bytes a name; the new columns hold a dictionary of distinct values
    assert new.country.nbytes < 200 + 2 * n and new.name.nbytes < 200 + 2 * n
    assert new.country.index.dtype == np.uint16 and new.country.offsets.dtype == np.int32
    # the legacy layout is held in memory as UTF-8 too (one value per row)
    assert old.name.nbytes < sum(len(s.encode()) for s in old.name) + 8 * (n + 1)


def test_strings_index_like_numpy(both):
    _, new, cols = both
    mask = np.zeros(len(new), bool)
    mask[[2, 7, 599]] = True
    assert new.name[mask] == [cols[0][2], cols[0][7], cols[0][599]]
    assert new.name[np.array([9, 0])] == [cols[0][9], cols[0][0]]
    assert new.name[-1] == cols[0][-1] and new.name[2:4] == cols[0][2:4]
    with pytest.raises(IndexError):
        new.name[600]
    s = Strings.encode(["a", "b", "a"])
    assert list(s) == ["a", "b", "a"] and s.offsets.tolist() == [0, 1, 2]


def test_empty_places(tmp_path):
    save_places(tmp_path / "p.npz", [], [], [], [], [])
    p = Places.load(tmp_path / "p.npz")
    assert len(p) == 0 and p.nearest(10.0, 20.0) is None


def _rewrite(src, dst, **changes):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez_compressed(dst, **arrays)


@pytest.mark.parametrize("case", ["garbage", "truncated", "offsets", "index", "split_char", "missing", "lengths",
                                  "layout", "legacy_dtype"])
def test_corrupt_places_file_is_refused_naming_it(tmp_path, both, case):
    new = tmp_path / "new.npz"
    bad = tmp_path / "bad.npz"
    with np.load(new) as z:
        offsets, index, blob = z["name_offsets"].copy(), z["name_index"].copy(), z["name_utf8"]
    if case == "garbage":
        bad.write_bytes(b"not a zip file at all")
    elif case == "truncated":
        bad.write_bytes(new.read_bytes()[:200])
    elif case == "offsets":
        offsets[-1] += 5  # runs past the blob
        _rewrite(new, bad, name_offsets=offsets)
    elif case == "index":
        index[3] = len(offsets)  # names a value that does not exist
        _rewrite(new, bad, name_index=index)
    elif case == "split_char":
        j = next(j for j in range(len(offsets) - 1) if "ī" in bytes(blob[offsets[j]:offsets[j + 1]]).decode())
        v = bytes(blob[offsets[j]:offsets[j + 1]])
        offsets[j + 1] = offsets[j] + v.index("ī".encode()) + 1  # ends inside the two-byte ī
        _rewrite(new, bad, name_offsets=offsets)
    elif case == "missing":
        _rewrite(new, bad, country_index=None)
    elif case == "lengths":
        with np.load(new) as z:
            _rewrite(new, bad, lat=z["lat"][:-1])
    elif case == "layout":
        _rewrite(new, bad, meta=np.frombuffer(json.dumps({"layout": "utf9"}).encode(), np.uint8))
    elif case == "legacy_dtype":
        _save_legacy(bad, [1.0], [2.0], ["x"], ["y"], ["z"])
        _rewrite(bad, bad, name=np.array([1.5]))
    with pytest.raises(GeosurgeError, match="bad.npz"):
        Places.load(bad)
    assert zipfile.is_zipfile(new)  # the source file is untouched


def test_layout_must_match_the_manifest(tmp_path, both):
    with pytest.raises(GeosurgeError, match=r"old.npz: places layout 'unicode', but the manifest says 'utf8'"):
        Places.load(tmp_path / "old.npz", layout=LAYOUT)
    assert len(Places.load(tmp_path / "new.npz", layout=LAYOUT)) == 600


def test_the_human_line_names_the_place_without_numeric_admin_codes():
    from geosurge.runtime.cli import prediction_text

    pred = {"lat": 12.13, "lon": 105.49, "confidence": 0.5, "uncertainty_km": 88.4,
            "place": {"name": "Phumĭ Âmpĭl Leu", "admin1": "02", "country": "Cambodia"}}
    assert prediction_text(pred) == "12.1300, 105.4900  confidence 0.500  ±88 km  near Phumĭ Âmpĭl Leu, Cambodia"
    pred["place"] = {"name": "Cedar City", "admin1": "UT", "country": "United States"}
    assert prediction_text(pred).endswith("near Cedar City, UT, United States")
    pred["place"] = None
    assert prediction_text(pred).endswith("±88 km")
