"""benchmarks/revisions.py: the interleaving order, the summary statistics and the worker's error line (no timing)."""
from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "revisions.py"


@pytest.fixture(scope="module")
def rev():
    spec = importlib.util.spec_from_file_location("bench_revisions", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_call_order(rev):
    rot = rev.call_order(["a", "b"], 4)  # auto: two installs rotate
    assert rot == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    three = rev.call_order(["a", "b", "c"], 6, "rotate")
    assert all(sorted(r) == ["a", "b", "c"] for r in three)
    assert Counter(r[0] for r in three) == {"a": 2, "b": 2, "c": 2}  # each goes first equally often
    rnd = rev.call_order(["a", "b", "c"], 50, "random", seed=3)
    assert all(sorted(r) == ["a", "b", "c"] for r in rnd)
    assert rnd == rev.call_order(["a", "b", "c"], 50, "random", seed=3)  # reproducible from the seed
    assert len({r[0] for r in rnd}) == 3
    assert rev.call_order(["a", "b", "c"], 50, seed=3) == rnd  # auto: three or more are shuffled
    with pytest.raises(ValueError, match="duplicate"):
        rev.call_order(["a", "a"], 2)
    with pytest.raises(ValueError, match="unknown order"):
        rev.call_order(["a", "b"], 2, "zigzag")


def test_percentile_and_summary(rev):
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 30):
        v = rng.gamma(2.0, 10.0, n).tolist()
        for q in (50, 95):
            assert rev.percentile(v, q) == pytest.approx(np.percentile(v, q), rel=1e-12)
    with pytest.raises(ValueError):
        rev.percentile([], 50)
    samples = {("old", "12mp", "paced"): [100.0, 120.0, 140.0], ("new", "12mp", "paced"): [25.0, 30.0, 35.0],
               ("new", "small", "paced"): [5.0]}  # no baseline there: no ratio
    rows = rev.summarize(samples, "old")
    assert [(r["install"], r["image"]) for r in rows] == [("old", "12mp"), ("new", "12mp"), ("new", "small")]
    assert rows[0]["old/x p50"] == 1.0
    assert rows[1]["p50_ms"] == 30.0 and rows[1]["old/x p50"] == pytest.approx(4.0)
    assert rows[1]["old/x p95"] == pytest.approx(np.percentile([100, 120, 140], 95) / np.percentile([25, 30, 35], 95))
    assert rows[2]["old/x p50"] is None and rows[2]["n"] == 1


def test_worker_reports_a_bad_bundle_in_one_line(rev, tmp_path):
    img = tmp_path / "x.jpg"
    img.write_bytes(b"\xff\xd8\xff")
    with pytest.raises(SystemExit, match=r"worker a .*missing"):
        rev.Worker("a", sys.executable, str(tmp_path / "missing"), [img], 1, "onnxruntime", "bytes")
