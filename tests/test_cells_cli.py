"""The ``geosurge cells`` command line, including its error paths (exit 2, one line, no traceback)."""
import json

import pytest

from .conftest import run_cli


def test_build_and_info_json(tmp_path):
    csv = tmp_path / "pts.csv"
    rows = ["LAT,LON"] + [f"{48 + i * 0.001},{2 + i * 0.002}" for i in range(300)] + \
           [f"{-33 - i * 0.001},{151 + i * 0.001}" for i in range(200)]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "cells.npz"
    r = run_cli("geosurge", "cells", "build", "--points", csv, "--levels", "3", "--tau-max", "200,60,20",
                "--tau-min", "2", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "level" in r.stdout and "cells" in r.stdout
    r = run_cli("geosurge", "cells", "info", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [lv["level"] for lv in info["levels"]] == [0, 1, 2]
    photos = {lv["photos"] for lv in info["levels"]}
    assert len(photos) == 1 and 450 <= photos.pop() <= 500  # every level covers the same photos
    assert info["levels"][2]["cells"] > info["levels"][0]["cells"]
    assert info["structure_digest"] and info["structure_digest"] != info["digest"]
    # a folder holding cells.npz (a bundle, a checkpoint) is read as its cells.npz
    r = run_cli("geosurge", "cells", "info", tmp_path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["digest"] == info["digest"], r.stderr
    assert all(lv["median_area_km2"] > 0 for lv in info["levels"])


BAD_CSVS = {
    "empty.csv": ("", "empty file"),
    "nocols.csv": ("x,y\n1,2\n", "missing column(s) lat, lon"),
    "text.csv": ("lat,lon\n10,20\n11,abc\n", "row 3: lat/lon not numeric"),
    "range.csv": ("latitude,longitude\n10,20\n95,20\n", "row 3: latitude 95.0 out of range"),
    "lonrange.csv": ("lat,lng\n10,200\n", "row 2: longitude 200.0 out of range"),
    "short.csv": ("id,lat,lon\n1,10\n", "row 2: too few fields"),
    "header_only.csv": ("lat,lon\n", "no data rows"),
}


@pytest.mark.parametrize("name", sorted(BAD_CSVS))
def test_build_bad_csv_is_one_clear_line(tmp_path, name):
    text, expected = BAD_CSVS[name]
    p = tmp_path / name
    p.write_text(text)
    r = run_cli("geosurge", "cells", "build", "--points", p, "-o", tmp_path / "o.npz")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and expected in lines[0], r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_missing_files_and_bad_args(tmp_path):
    r = run_cli("geosurge", "cells", "build", "--points", tmp_path / "nope.csv", "-o", tmp_path / "o.npz")
    assert r.returncode == 2 and "nope.csv: file not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("geosurge", "cells", "info", tmp_path / "nope.npz")
    assert r.returncode == 2 and "nope.npz" in r.stderr
    r = run_cli("geosurge", "cells", "build", "--levels", "3", "--tau-max", "1,2", "-o", tmp_path / "o.npz")
    assert r.returncode == 2 and "--tau-max has 2 values" in r.stderr
    r = run_cli("geosurge-run", "--version")
    assert r.returncode == 0 and "geosurge-run" in r.stdout
