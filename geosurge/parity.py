"""Parity between an FP32 reference and a deployed model, measured on the task: where the predicted place moves, in
kilometres (numpy only: used at export, by the precision search, by ``geosurge parity`` on the workstation and by
``geosurge-run verify`` on the device).

Metrics (:func:`parity_metrics`; embeddings (N, D) of the same N images through FP32 and the deployed model, scored by
the bundle's :class:`geosurge.runtime.cells.CellScorer`; the predicted place is the representative point of the
top-1 finest cell of the hierarchical product, as the runtime predicts it):

==========================  =====================================================================================
metric                      what
==========================  =====================================================================================
``median_drift_km``,        geodesic distance (km) from the deployed prediction to the nearest of FP32's
``p95_drift_km``            near-tied answers (see *Near-ties* below); median and 95th percentile over the images
``top1_agreement_confident`` share of images whose deployed top-1 finest cell is FP32's, over the images where FP32
                            is confident (its top-1 leads the runner-up by more than :data:`DRIFT_TIE_MARGIN`)
``accuracy_delta_min_pts``  with ground truth: the worst of deployed - FP32 accuracy within 1 / 25 / 200 / 750 /
                            2500 km, in percentage points (each threshold in ``accuracy_delta_pts``)
``cosine_mean`` / ``_min``  embedding cosine (a diagnostic: it says nothing about places on its own)
``level_top1_agreement_min`` per-level top-1 agreement, per-level ties excluded (a diagnostic)
``top1_in_top5``            FP32's top-1 cell within the deployed top-5 (a diagnostic)
``raw_median_drift_km``,    drift to FP32's own top-1 cell, ties included (a diagnostic: a flat head flips ties)
``raw_p95_drift_km``
==========================  =====================================================================================

Near-ties. FP32's answer is a set, not a cell: every finest cell whose hierarchical score (a sum of per-level
log-probabilities) is within :data:`DRIFT_TIE_MARGIN` of the top-1's is one FP32 itself barely prefers (a
probability ratio below e^0.2 = 1.22). A deployed model that picks any of them has not moved the answer, so the drift
of an image is the distance to the *nearest* cell of that set (0 when the deployed top-1 is in it). This keeps every
image counted — a deployed model that leaves the tied set still shows its full distance, so the tail is gated —
while a flat head, whose near-ties flip under any rounding, shows no drift for it: tests on untrained models do not
depend on which ties flip. Agreement of the top-1 cell is counted only where FP32 is confident (the top-1 leads by
more than the margin), as the per-level agreement always was.

The margin was measured on the reference model (edge, trained on Blue Marble views, 500 held-out views; docs/
quantization.md): embeddings perturbed to cosine 0.999 (what OpenVINO's BF16 hint gives) leave every drift at 0
with a margin of 0.2 and keep 99.5% agreement on the 78% of views FP32 is confident on; at 0.05 the same
perturbation already moved the p95 of cosine-0.995 embeddings to 249 km.

Default gates (:data:`DEFAULT_GATES`), from the same measurements: the plain all-INT8 model of the reference model
(cosine 0.83) drifted 1,044 km median / 15,101 km p95 and lost 8.4 points of acc@2500 km; embeddings perturbed to
cosine 0.99 drifted 0 / 371 km and moved accuracy by at most 1.6 points on 500 views; cosine 0.995: 0 / 0 km,
0.6 points. The drift thresholds are the city (25 km, median) and region (200 km, p95) rungs of the standard
accuracy ladder (1 / 25 / 200 / 750 / 2500 km); accuracy may drop by at most 2 points (on n images one image is
100 / n points: on fewer than 50 images a single lost image fails the gate); top-1 agreement where FP32 is confident
>= 0.95 (cosine 0.995 noise: 0.957). A gate whose metric needs ground truth is ``SKIP`` (not failed) when none is
given. Bundles of schema 1 / 2 carry their own gates (:data:`LEGACY_GATES`), which are all still computed.
"""
from __future__ import annotations

import numpy as np

from .errors import GeosurgeError
from .geo.metrics import ACCURACY_THRESHOLDS_KM, accuracy_within, haversine_km

#: Default gates (configurable): task-level drift and agreement, and the accuracy deltas when ground truth exists.
DEFAULT_GATES = {
    "median_drift_km": ("<=", 25.0),
    "p95_drift_km": ("<=", 200.0),
    "top1_agreement_confident": (">=", 0.95),
    "accuracy_delta_min_pts": (">=", -2.0),
}
#: The gates schema 1 / 2 bundles were written with (embedding cosine, per-level agreement, top-1 in top-5, median
#: drift); such a bundle's manifest carries them and they are still evaluated as written.
LEGACY_GATES = {
    "cosine_mean": (">=", 0.995),
    "cosine_min": (">=", 0.98),
    "level_top1_agreement_min": (">=", 0.95),
    "top1_in_top5": (">=", 0.99),
    "median_drift_km": ("<=", 25.0),
}
#: Per level: a sample's level counts for the per-level agreement only if its FP32 top-1/top-2 margin in logits
#: (log-probabilities) exceeds this (a probability ratio below ~1.05 is a tie a cosine-0.999 model may swap; a logit
#: margin is scale-free, unlike a probability margin).
TIE_MARGIN = 0.05
#: The hierarchical product: FP32's near-tied answers are the finest cells within this of the top-1's score (a sum of
#: 7 levels' log-probabilities; measured on the reference model, see the module docstring).
DRIFT_TIE_MARGIN = 0.2
#: what a report shows first: the task-level figures (km, shares, points), then the embedding cosine (diagnostic)
HEADLINE_METRICS = ("median_drift_km", "p95_drift_km", "top1_agreement_confident", "accuracy_delta_min_pts",
                    "cosine_mean")
#: metrics a gate may name; those needing ground truth are skipped (``SKIP``) without it
GATE_METRICS = ("median_drift_km", "p95_drift_km", "top1_agreement_confident", "accuracy_delta_min_pts",
                "cosine_mean", "cosine_min", "level_top1_agreement_min", "top1_in_top5", "raw_median_drift_km",
                "raw_p95_drift_km", "max_drift_km")
TRUTH_METRICS = ("accuracy_delta_min_pts",)
#: each gate metric's perfect value (the deployed model equal to FP32)
PERFECT = {"median_drift_km": 0.0, "p95_drift_km": 0.0, "raw_median_drift_km": 0.0, "raw_p95_drift_km": 0.0,
           "max_drift_km": 0.0, "accuracy_delta_min_pts": 0.0, "top1_agreement_confident": 1.0, "cosine_mean": 1.0,
           "cosine_min": 1.0, "level_top1_agreement_min": 1.0, "top1_in_top5": 1.0}
#: a choice (the precision search, QAT vs PTQ) is made under gates with this share of each gate's slack: the chosen
#: mix sits at the edge of what passes on the images it was chosen on, and is then checked on other images
CHOOSE_SLACK = 0.5


def _top2(p: np.ndarray):
    part = np.partition(p, -2, axis=1)[:, -2:]
    return part[:, 1], part[:, 0]


def accuracy_pct(distances_km, thresholds_km=ACCURACY_THRESHOLDS_KM) -> dict[str, float]:
    """``{"acc@1km": %, "acc@25km": %, ...}``: percentage of ``distances_km`` (N,) within each threshold (km).
    Raises ValueError for an empty array."""
    return {f"acc@{t:g}km": 100.0 * v for t, v in accuracy_within(distances_km, thresholds_km).items()}


def accuracy_deltas(true_lat, true_lon, ref_lat, ref_lon, dep_lat, dep_lon,
                    thresholds_km=ACCURACY_THRESHOLDS_KM) -> dict:
    """Accuracy of the FP32 and the deployed predictions against ground truth (all (N,) degrees), and the deployed -
    FP32 difference per threshold in percentage points: ``{"n", "fp32": {acc@..: %, "median_km"}, "deployed":
    {...}, "delta_pts": {acc@..: points}, "delta_min_pts": the worst}``. Paired (the same images), so a delta is
    exactly the net number of images that crossed a threshold, times 100 / N."""
    e_ref = haversine_km(true_lat, true_lon, ref_lat, ref_lon)
    e_dep = haversine_km(true_lat, true_lon, dep_lat, dep_lon)
    a_ref, a_dep = accuracy_pct(e_ref, thresholds_km), accuracy_pct(e_dep, thresholds_km)
    delta = {k: a_dep[k] - a_ref[k] for k in a_ref}
    return {"n": int(len(e_ref)),
            "fp32": {**a_ref, "median_km": float(np.median(e_ref))},
            "deployed": {**a_dep, "median_km": float(np.median(e_dep))},
            "delta_pts": delta, "delta_min_pts": float(min(delta.values()))}


def tie_aware_drift(ref_scores: np.ndarray, dep_top1: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                    margin: float = DRIFT_TIE_MARGIN) -> np.ndarray:
    """(N,) km from each deployed top-1 cell (``dep_top1`` (N,) int) to the nearest cell whose FP32 score
    (``ref_scores`` (N, C), log-probabilities) is within ``margin`` of that image's FP32 top-1 score; ``lat`` /
    ``lon`` (C,) the cells' representative points. 0 where the deployed top-1 is one of FP32's near-tied answers."""
    top = ref_scores.max(1)
    out = np.empty(len(ref_scores))
    for i, (row, d) in enumerate(zip(ref_scores, dep_top1)):
        tied = np.flatnonzero(row >= top[i] - margin)
        out[i] = 0.0 if d in tied else float(haversine_km(lat[d], lon[d], lat[tied], lon[tied]).min())
    return out


def parity_metrics(ref_emb: np.ndarray, dep_emb: np.ndarray, scorer, tie_margin: float = TIE_MARGIN,
                   truth: tuple[np.ndarray, np.ndarray] | None = None,
                   drift_tie_margin: float = DRIFT_TIE_MARGIN) -> dict:
    """Compare embeddings ``ref_emb`` / ``dep_emb`` (N, D) float32 of the same images; ``scorer`` is a
    :class:`geosurge.runtime.cells.CellScorer` (the bundle's table); ``truth``: (lat, lon) arrays (N,) in degrees of
    the images' true places, for the accuracy deltas. Returns the metrics of the module docstring (km, points,
    shares) plus ``levels`` (per-level rows) and ``accuracy`` (:func:`accuracy_deltas`, with truth)."""
    ref_emb = np.asarray(ref_emb, np.float32)
    dep_emb = np.asarray(dep_emb, np.float32)
    if ref_emb.shape != dep_emb.shape or ref_emb.ndim != 2 or not len(ref_emb):
        raise GeosurgeError(f"parity: reference and deployed embeddings must be the same (N, D), N >= 1; got "
                            f"{ref_emb.shape} and {dep_emb.shape}")
    cos = (ref_emb * dep_emb).sum(1) / (np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(dep_emb, axis=1))
    ref_lp, dep_lp = scorer.level_log_probs(ref_emb), scorer.level_log_probs(dep_emb)
    levels = []
    for k, (rl, dl) in enumerate(zip(ref_lp, dep_lp)):
        l1, l2 = _top2(rl) if rl.shape[1] > 1 else (rl[:, 0], np.full(len(rl), -np.inf))
        counted = (l1 - l2) > tie_margin
        agree = rl.argmax(1) == dl.argmax(1)
        p1, p2 = np.exp(l1), np.exp(l2)
        levels.append({"level": k, "top1_agreement": float(agree[counted].mean()) if counted.any() else 1.0,
                       "top1_agreement_all": float(agree.mean()),
                       "counted": int(counted.sum()), "ties_excluded": int((~counted).sum()),
                       "fp32_top1_prob": float(p1.mean()), "fp32_margin": float((p1 - p2).mean())})
    ref_scores, dep_scores = scorer.hierarchical_scores(ref_lp), scorer.hierarchical_scores(dep_lp)
    ref_top1 = ref_scores.argmax(1)
    dep_top5 = np.argsort(-dep_scores, axis=1)[:, :5]
    dep_top1 = dep_top5[:, 0]
    in_top5 = (dep_top5 == ref_top1[:, None]).any(1)
    lat, lon = scorer.rep_lat, scorer.rep_lon
    raw = haversine_km(lat[ref_top1], lon[ref_top1], lat[dep_top1], lon[dep_top1])
    drift = tie_aware_drift(ref_scores, dep_top1, lat, lon, drift_tie_margin)
    if ref_scores.shape[1] > 1:
        s1, s2 = _top2(ref_scores)
        confident = (s1 - s2) > drift_tie_margin
    else:
        confident = np.ones(len(ref_scores), bool)
    agree = ref_top1 == dep_top1
    out = {
        "n": int(len(ref_emb)),
        "median_drift_km": float(np.median(drift)), "p95_drift_km": float(np.percentile(drift, 95)),
        "max_drift_km": float(drift.max()),
        "top1_agreement_confident": float(agree[confident].mean()) if confident.any() else 1.0,
        "confident_n": int(confident.sum()), "top1_agreement_all": float(agree.mean()),
        "drift_tie_margin": float(drift_tie_margin),
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
        "level_top1_agreement_min": min(lv["top1_agreement"] for lv in levels),
        "top1_in_top5": float(in_top5.mean()),
        "raw_median_drift_km": float(np.median(raw)), "raw_p95_drift_km": float(np.percentile(raw, 95)),
        "sharpness_top1_prob": float(np.mean([lv["fp32_top1_prob"] for lv in levels])),
        "sharpness_margin": float(np.mean([lv["fp32_margin"] for lv in levels])),
        "levels": levels,
    }
    if truth is not None:
        t_lat, t_lon = (np.asarray(a, np.float64) for a in truth)
        if t_lat.shape != (len(ref_emb),) or t_lon.shape != (len(ref_emb),):
            raise GeosurgeError(f"parity: ground truth needs one (lat, lon) per image ({len(ref_emb)}), got "
                                f"{t_lat.shape} / {t_lon.shape}")
        acc = accuracy_deltas(t_lat, t_lon, lat[ref_top1], lon[ref_top1], lat[dep_top1], lon[dep_top1])
        out["accuracy"] = acc
        out["accuracy_delta_min_pts"] = acc["delta_min_pts"]
    return out


def check_gates(gates: dict) -> dict:
    """``gates`` ({metric: (op, threshold)}) checked: GeosurgeError for an unknown metric or operator."""
    for name, (op, _) in gates.items():
        if name not in GATE_METRICS:
            raise GeosurgeError(f"unknown parity gate {name!r}; gates may name {', '.join(GATE_METRICS)}")
        if op not in (">=", "<="):
            raise GeosurgeError(f"parity gate {name}: the operator must be >= or <=, not {op!r}")
    return gates


def tightened(gates: dict | None = None, slack: float = CHOOSE_SLACK) -> dict:
    """``gates`` (default :data:`DEFAULT_GATES`) with each threshold moved toward its perfect value, keeping
    ``slack`` of the allowed error (0.5: p95 drift 200 -> 100 km, agreement 0.95 -> 0.975, accuracy -2 -> -1 point).
    What a choice is made under, so that it still passes the real gates on images it was not chosen on."""
    out = {}
    for name, (op, t) in check_gates(gates or DEFAULT_GATES).items():
        best = PERFECT[name]
        out[name] = (op, float(best + (t - best) * slack))
    return out


#: count-based gates and the number of images one image is a share of (``metrics`` key): a gate measured on n
#: images cannot resolve less than one of them, so it always tolerates one (see :func:`one_image_threshold`)
COUNT_GATES = {"top1_agreement_confident": "confident_n", "accuracy_delta_min_pts": "n"}


def one_image_threshold(name: str, op: str, threshold: float, metrics: dict) -> tuple[float, str]:
    """The threshold a count-based gate is held to on the images it was measured on, and a note.

    One image is 1/n of an agreement share and 100/n points of accuracy. A gate stricter than one image would fail
    on a single flipped near-tie (on 32 check images one image is 3.1 points, so ``-2`` points means "no image may
    change"), so the threshold is relaxed to exactly one image when it is stricter than that: ``min(t, 1 - 1/n)``
    for the agreement, ``min(t, -100/n)`` for the accuracy delta. With n >= 20 (agreement 0.95) or n >= 50
    (accuracy -2 points) the gate is unchanged. Other gates (drift in km) are returned as they are."""
    key = COUNT_GATES.get(name)
    n = int(metrics.get(key) or 0) if key else 0
    if n <= 0:
        return threshold, ""
    one = 1.0 / n if name == "top1_agreement_confident" else 100.0 / n
    perfect = PERFECT[name]
    if op == ">=" and threshold > perfect - one:
        return perfect - one, f"one image of {n} allowed"
    return threshold, ""


def evaluate_gates(metrics: dict, gates: dict | None = None) -> list[dict]:
    """One row per gate: ``{"gate", "value", "need", "pass"}``, ``pass`` one of PASS / FAIL / SKIP (a metric that
    needs ground truth when none was given: ``value`` None and a ``note``). A count-based gate on few images is held
    to :func:`one_image_threshold` (its ``note`` says so)."""
    rows = []
    for name, (op, threshold) in check_gates(gates or DEFAULT_GATES).items():
        value = metrics.get(name)
        if value is None:
            rows.append({"gate": name, "value": None, "need": f"{op} {threshold:g}", "pass": "SKIP",
                         "note": "no ground truth for these images" if name in TRUTH_METRICS else "not measured"})
            continue
        threshold, note = one_image_threshold(name, op, threshold, metrics)
        ok = value >= threshold if op == ">=" else value <= threshold
        row = {"gate": name, "value": value, "need": f"{op} {threshold:.4g}", "pass": "PASS" if ok else "FAIL"}
        if note:
            row["note"] = note
        rows.append(row)
    return rows


def failed_gates_text(rows: list[dict]) -> str:
    """The FAILed gates of :func:`evaluate_gates` rows as one phrase, value and need each:
    ``"p95_drift_km 7038 (needs <= 200); top1_agreement_confident 0.61 (needs >= 0.95)"`` ("" when none failed;
    a row without a value or need, as an old manifest may hold, gives its name alone)."""
    def one(r):
        value = f" {r['value']:.4g}" if isinstance(r.get("value"), (int, float)) else ""
        return f"{r['gate']}{value}" + (f" (needs {r['need']})" if r.get("need") else "")

    return "; ".join(one(r) for r in rows if r.get("pass") == "FAIL")


def gates_passed(rows: list[dict]) -> bool:
    """No gate FAILed (a SKIP is not a failure)."""
    return all(r["pass"] != "FAIL" for r in rows)


def format_parity(metrics: dict, rows: list[dict], title: str) -> str:
    """The parity report as text: the gates, the task figures (accuracy vs ground truth when measured), and the
    diagnostics (embedding cosine, per-level agreement, raw drift)."""
    from .report import format_table

    gates = format_table([{**r, "note": r.get("note", "")} for r in rows], ["gate", "value", "need", "pass", "note"],
                         mixed=["value"])  # one metric a row: km, fractions, cosines
    parts = [title, gates]
    acc = metrics.get("accuracy")
    if acc:
        keys = [k for k in acc["fp32"] if k.startswith("acc@")]
        parts.append(format_table(
            [{"": "FP32", **{k: acc["fp32"][k] for k in keys}, "median_km": acc["fp32"]["median_km"]},
             {"": "deployed", **{k: acc["deployed"][k] for k in keys}, "median_km": acc["deployed"]["median_km"]},
             {"": "delta (points)", **{k: acc["delta_pts"][k] for k in keys}}],
            ["", *keys, "median_km"], title=f"accuracy vs ground truth on {acc['n']} images (% within)"))
    lv = format_table([{"level": r["level"], "top1_agreement": r["top1_agreement"], "counted": r["counted"],
                        "ties": r["ties_excluded"], "agreement_incl_ties": r.get("top1_agreement_all", float("nan")),
                        "fp32_top1_prob": r["fp32_top1_prob"], "fp32_margin": r["fp32_margin"]}
                       for r in metrics["levels"]], title="diagnostics: per-level top-1 agreement")
    parts.append(lv)
    sharp = metrics["sharpness_top1_prob"]
    diag = (f"n={metrics['n']}  cosine mean {metrics['cosine_mean']:.4f} min {metrics['cosine_min']:.4f}  "
            f"top-1 in top-5 {metrics['top1_in_top5']:.3f}")
    if "confident_n" in metrics:
        diag += (f"  FP32 confident on {metrics['confident_n']} (top-1 agreement on all: "
                 f"{metrics['top1_agreement_all']:.3f})\ndrift to FP32's own top-1 cell (a near-tie counted as a "
                 f"move; the gated drift above forgives near-ties): median {metrics['raw_median_drift_km']:.1f} km, "
                 f"p95 {metrics['raw_p95_drift_km']:.1f} km")
    diag += (f"\nsharpness: mean top-1 prob {sharp:.3f}, margin {metrics['sharpness_margin']:.3f}"
             + ("  (a flat head: parity numbers mean little)" if sharp < 0.05 else ""))
    parts.append(diag)
    return "\n\n".join(parts)


def compare(ref_emb: np.ndarray, dep_emb: np.ndarray, scorer, gates: dict | None = None,
            truth: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """FP32 reference vs deployed embeddings under ``gates`` (default :data:`DEFAULT_GATES`), with the accuracy
    deltas when ``truth`` ((lat, lon) arrays (N,)) is given: ``{"metrics": parity_metrics(...), "gates":
    evaluate_gates(...) rows, "passed": bool}``. The one comparison behind the export's held-out check, the precision
    search, ``geosurge parity`` and ``geosurge-run verify``."""
    metrics = parity_metrics(ref_emb, dep_emb, scorer, truth=truth)
    rows = evaluate_gates(metrics, gates)
    return {"metrics": metrics, "gates": rows, "passed": gates_passed(rows)}
