"""Task-level parity gates (geosurge.parity): each gate fails and passes deterministically on constructed embeddings
and a constructed scorer; the p95 tail; near-ties on a flat head; accuracy deltas against ground truth (skipped, not
failed, without it); the three-way image split is disjoint; old bundles' gates still evaluate."""
import numpy as np
import pytest

from geosurge.calibration.dataset import CalibrationSet
from geosurge.errors import GeosurgeError
from geosurge.geo import haversine_km
from geosurge.manifest import ParityRecord
from geosurge.parity import (DEFAULT_GATES, DRIFT_TIE_MARGIN, LEGACY_GATES, accuracy_deltas, compare,
                             evaluate_gates, failed_gates_text, format_parity, parity_metrics)
from geosurge.preprocess import PreprocessSpec

SPEC = PreprocessSpec(size=2, resize_size=2)


class OneLevelScorer:
    """A one-level cell scorer: cell i's embedding is the unit vector e_i, logits = emb . e_i / temperature, so an
    embedding names its top cell exactly and the FP32 margin is set by construction. Cells sit on the equator every
    ``spacing`` degrees of longitude (1 degree = 111.2 km)."""

    def __init__(self, cells: int = 16, temperature: float = 0.01, spacing: float = 10.0):
        self.temperature = temperature
        self.rep_lat = np.zeros(cells)
        self.rep_lon = np.arange(cells) * spacing - 80.0
        self.cells = cells

    def level_log_probs(self, emb):
        z = np.asarray(emb, np.float64) / self.temperature
        z = z - z.max(1, keepdims=True)
        return [z - np.log(np.exp(z).sum(1, keepdims=True))]

    def hierarchical_scores(self, lps):
        return sum(lps)


def onehot(idx, cells=16, second=None, gap=1.0):
    """Embeddings whose top cell is ``idx``; with ``second``, that cell trails by ``gap`` (in emb units)."""
    e = np.full((len(idx), cells), 0.0)
    e[np.arange(len(idx)), idx] = 1.0
    if second is not None:
        e[np.arange(len(idx)), second] = 1.0 - gap
    return e.astype(np.float32)


def gate(rep, name):
    return next(g for g in rep["gates"] if g["gate"] == name)


def test_identical_outputs_pass_every_gate_with_zero_drift():
    sc = OneLevelScorer()
    e = onehot(np.arange(16) % 16)
    rep = compare(e, e, sc)
    m = rep["metrics"]
    assert rep["passed"] and m["median_drift_km"] == 0 and m["p95_drift_km"] == 0
    assert m["top1_agreement_confident"] == 1.0 and m["confident_n"] == 16
    assert gate(rep, "accuracy_delta_min_pts")["pass"] == "SKIP"  # no ground truth given


def test_the_p95_tail_fails_while_the_median_passes():
    # 100 images; 90 keep their cell, 10 jump 6 cells (60 degrees of longitude on the equator, ~6,672 km)
    sc = OneLevelScorer()
    ref_idx = np.arange(100) % 8
    dep_idx = ref_idx.copy()
    dep_idx[:10] += 6
    rep = compare(onehot(ref_idx), onehot(dep_idx), sc)
    m = rep["metrics"]
    tail = float(haversine_km(0, 0, 0, 60))
    assert m["median_drift_km"] == 0 and gate(rep, "median_drift_km")["pass"] == "PASS"
    assert m["p95_drift_km"] == pytest.approx(tail) and gate(rep, "p95_drift_km")["pass"] == "FAIL"
    assert not rep["passed"]
    # the failed gate as one line with value and need (what verify / choose-backend print)
    assert failed_gates_text(rep["gates"]) == (f"p95_drift_km {tail:.4g} (needs <= 200); "
                                               "top1_agreement_confident 0.9 (needs >= 0.95)")
    # the schema-2 gates (median only) pass the same bundle: why the tail is gated now
    assert compare(onehot(ref_idx), onehot(dep_idx), sc, LEGACY_GATES)["gates"][-1] == {
        "gate": "median_drift_km", "value": 0.0, "need": "<= 25", "pass": "PASS"}
    # 4 of 100 jumping is inside the 95th percentile
    dep_idx[4:10] = ref_idx[4:10]
    assert compare(onehot(ref_idx), onehot(dep_idx), sc)["passed"]


def test_top1_agreement_where_fp32_is_confident_fails_on_flips_a_drift_gate_lets_through():
    # neighbour flips of 0.1 degree (11 km: under both drift gates) on 10 of 100 confident images
    sc = OneLevelScorer(spacing=0.1)
    ref_idx = np.arange(100) % 8
    dep_idx = ref_idx.copy()
    dep_idx[:10] += 1
    rep = compare(onehot(ref_idx), onehot(dep_idx), sc)
    assert gate(rep, "median_drift_km")["pass"] == "PASS" and gate(rep, "p95_drift_km")["pass"] == "PASS"
    assert rep["metrics"]["top1_agreement_confident"] == pytest.approx(0.9)
    assert gate(rep, "top1_agreement_confident")["pass"] == "FAIL" and not rep["passed"]
    dep_idx[:6] = ref_idx[:6]  # 4 of 100 flip: 0.96 >= 0.95
    assert compare(onehot(ref_idx), onehot(dep_idx), sc)["passed"]


def test_near_ties_flip_without_drift_and_a_flat_head_shows_none():
    sc = OneLevelScorer(temperature=0.01)
    n = 20
    ref_idx, other = np.zeros(n, int), np.full(n, 9)  # cells 0 and 9: 90 degrees apart
    # FP32 prefers cell 0 over cell 9 by 0.001 emb = 0.1 in log-probability: a near-tie (< DRIFT_TIE_MARGIN)
    assert 0.001 / sc.temperature < DRIFT_TIE_MARGIN
    ref = onehot(ref_idx, second=other, gap=0.001)
    flipped = onehot(other, second=ref_idx, gap=0.001)
    m = parity_metrics(ref, flipped, sc)
    assert m["median_drift_km"] == 0 and m["p95_drift_km"] == 0  # the deployed answer is one FP32 tied with
    assert m["confident_n"] == 0 and m["top1_agreement_confident"] == 1.0  # ties are not counted for agreement
    assert m["raw_median_drift_km"] == pytest.approx(float(haversine_km(0, -80, 0, 10)))  # the diagnostic sees it
    # leaving the tied set shows the distance to the nearest tied answer (cell 9 -> cell 10: 10 degrees)
    away = parity_metrics(ref, onehot(np.full(n, 10)), sc)
    assert away["median_drift_km"] == pytest.approx(float(haversine_km(0, 10, 0, 20)))
    # a flat head (every cell within the margin): whatever rounding flips, no drift and no failed gate
    flat = OneLevelScorer(temperature=100.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16)).astype(np.float32)
    b = a + rng.normal(scale=0.05, size=a.shape).astype(np.float32)
    rep = compare(a, b, flat)
    assert rep["metrics"]["p95_drift_km"] == 0 and rep["passed"]


def test_accuracy_deltas_gate_with_ground_truth():
    sc = OneLevelScorer()
    ref_idx = np.arange(50) % 16
    truth = (sc.rep_lat[ref_idx], sc.rep_lon[ref_idx])  # FP32 is exactly right on all 50
    dep_idx = ref_idx.copy()
    dep_idx[:2] = (dep_idx[:2] + 3) % 16  # 2 of 50 wrong by >= 30 degrees: -4 points at every threshold
    rep = compare(onehot(ref_idx), onehot(dep_idx), sc, {"accuracy_delta_min_pts": (">=", -2.0)}, truth=truth)
    acc = rep["metrics"]["accuracy"]
    assert acc["fp32"]["acc@25km"] == 100.0 and acc["deployed"]["acc@25km"] == 96.0
    assert acc["delta_pts"]["acc@2500km"] == pytest.approx(-4.0) and rep["metrics"]["accuracy_delta_min_pts"] == -4.0
    assert not rep["passed"] and rep["gates"][0]["pass"] == "FAIL"
    dep_idx[1] = ref_idx[1]  # 1 of 50: -2 points, at the gate
    assert compare(onehot(ref_idx), onehot(dep_idx), sc, {"accuracy_delta_min_pts": (">=", -2.0)},
                   truth=truth)["passed"]
    text = format_parity(rep["metrics"], rep["gates"], "t")
    assert "accuracy vs ground truth on 50 images" in text and "delta (points)" in text


def test_accuracy_deltas_are_paired_counts():
    d = accuracy_deltas([0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 3])  # one of two moves 333 km off
    assert d["delta_pts"]["acc@25km"] == -50.0 and d["delta_pts"]["acc@750km"] == 0.0 and d["n"] == 2


def test_unknown_gates_are_refused_and_skips_are_not_failures():
    with pytest.raises(GeosurgeError, match="unknown parity gate 'cosine'"):
        evaluate_gates({"cosine_mean": 1.0}, {"cosine": (">=", 0.9)})
    rows = evaluate_gates({"median_drift_km": 0.0}, {"median_drift_km": ("<=", 25.0),
                                                    "accuracy_delta_min_pts": (">=", -2.0)})
    rec = ParityRecord(passed=True, gates=rows)
    assert [r["pass"] for r in rows] == ["PASS", "SKIP"] and rec.failed_gates() == []
    assert set(DEFAULT_GATES) == {"median_drift_km", "p95_drift_km", "top1_agreement_confident",
                                  "accuracy_delta_min_pts"}


def test_the_three_way_split_is_disjoint_and_sized():
    n = 40
    cs = CalibrationSet(np.zeros((n, 2, 2, 3), np.uint8), SPEC, [f"im{i}" for i in range(n)], "d", False,
                        lat=np.arange(n, dtype=float), lon=np.zeros(n))
    cal, choose, check = cs.split_parts(check=0.25, choose=0.25, seed=3)
    names = [set(p.names) for p in (cal, choose, check)]
    assert [len(p) for p in (cal, choose, check)] == [20, 10, 10]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set().union(*names) == set(cs.names)
    # coordinates travel with their images
    for p in (cal, choose, check):
        assert [int(x) for x in p.lat] == [int(s[2:]) for s in p.names]
    # augmented views: no source image (group) in two parts
    g = CalibrationSet(np.zeros((n, 2, 2, 3), np.uint8), SPEC, [f"v{i}" for i in range(n)], "d", False,
                       groups=np.arange(n) % 8)
    parts = g.split_parts(check=0.25, choose=0.25, seed=0)
    groups = [set(p.groups.tolist()) for p in parts]
    assert all(groups) and not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    from geosurge.export.bundle import ImageSplit  # what the export's log line says of such a split

    assert ImageSplit(*parts).sources() == "views of source images: 4 calibrate / 2 choose / 2 check"
    assert ImageSplit(parts[0], None, parts[2]).sources() == "views of source images: 4 calibrate / 2 check"
    assert ImageSplit(cal, choose, check).sources() == ""  # plain images: nothing to say
    # the two-way split is the three-way one without a choose part
    cal2, check2 = cs.split(0.25, seed=3)
    assert cal2.names == sorted(set(cal.names) | set(choose.names), key=cs.names.index) and check2.names == check.names
    with pytest.raises(GeosurgeError, match="cannot be split"):
        CalibrationSet(np.zeros((2, 2, 2, 3), np.uint8), SPEC, ["a", "b"], "d", False).split_parts(0.25, 0.25)


def test_choices_are_made_with_half_the_slack():
    from geosurge.parity import tightened

    t = tightened()
    assert t["p95_drift_km"] == ("<=", 100.0) and t["median_drift_km"] == ("<=", 12.5)
    assert t["top1_agreement_confident"] == (">=", 0.975)
    assert t["accuracy_delta_min_pts"] == (">=", -1.0)
    assert tightened({"cosine_mean": (">=", 0.995)}) == {"cosine_mean": (">=", 0.9975)}


def test_a_count_gate_on_few_images_allows_exactly_one_image():
    """On 32 images one image is 3.125 points: a -2 point gate would mean "no image may change". It is held to one
    image there, and unchanged where it can resolve its own threshold (n >= 50 for -2 points, n >= 20 for 0.95)."""
    gates = {"accuracy_delta_min_pts": (">=", -2.0), "top1_agreement_confident": (">=", 0.95)}

    def row(metrics, name):
        return next(r for r in evaluate_gates(metrics, gates) if r["gate"] == name)

    one, two = -100 / 32, -200 / 32
    assert row({"n": 32, "accuracy_delta_min_pts": one}, "accuracy_delta_min_pts")["pass"] == "PASS"
    r = row({"n": 32, "accuracy_delta_min_pts": two}, "accuracy_delta_min_pts")
    assert r["pass"] == "FAIL" and r["note"] == "one image of 32 allowed" and r["need"] == ">= -3.125"
    r = row({"n": 200, "accuracy_delta_min_pts": -2.5}, "accuracy_delta_min_pts")  # 5 images of 200: over -2
    assert r["pass"] == "FAIL" and "note" not in r and r["need"] == ">= -2"
    assert row({"confident_n": 10, "top1_agreement_confident": 0.9}, "top1_agreement_confident")["pass"] == "PASS"
    assert row({"confident_n": 10, "top1_agreement_confident": 0.8}, "top1_agreement_confident")["pass"] == "FAIL"
    r = row({"confident_n": 100, "top1_agreement_confident": 0.94}, "top1_agreement_confident")
    assert r["pass"] == "FAIL" and "note" not in r
