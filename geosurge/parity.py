"""Parity metrics and gates between an FP32 reference and a deployed model (numpy only: used by
``geosurge parity`` on the workstation and ``geosurge-run verify`` on the device)."""
from __future__ import annotations

import numpy as np

from .geo.metrics import haversine_km

#: Default gates (configurable): embedding cosine, per-level top-1 agreement (FP32 ties excluded), FP32 top-1 within
#: the deployed top-5 (finest level, hierarchical product), median geodesic drift of the predicted point.
DEFAULT_GATES = {
    "cosine_mean": (">=", 0.995),
    "cosine_min": (">=", 0.98),
    "level_top1_agreement_min": (">=", 0.95),
    "top1_in_top5": (">=", 0.99),
    "median_drift_km": ("<=", 25.0),
}
#: A sample's level counts for agreement only if its FP32 top-1/top-2 margin in logits (log-probabilities) exceeds
#: this: a ratio p1/p2 below ~1.05 is a tie that a deployed model at cosine 0.999 may legitimately swap. A logit
#: margin is scale-free, unlike a probability margin (level 6's 18K cells all sit near 5e-5 on a flat head).
TIE_MARGIN = 0.05


def _top2(p: np.ndarray):
    part = np.partition(p, -2, axis=1)[:, -2:]
    return part[:, 1], part[:, 0]


def parity_metrics(ref_emb: np.ndarray, dep_emb: np.ndarray, scorer, tie_margin: float = TIE_MARGIN) -> dict:
    """Compare embeddings (N, D); ``scorer`` is a :class:`geosurge.runtime.cells.CellScorer` (the bundle's table)."""
    ref_emb = np.asarray(ref_emb, np.float32)
    dep_emb = np.asarray(dep_emb, np.float32)
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
    in_top5 = (dep_top5 == ref_top1[:, None]).any(1)
    lat, lon = scorer.rep_lat, scorer.rep_lon
    dep_top1 = dep_top5[:, 0]
    drift = haversine_km(lat[ref_top1], lon[ref_top1], lat[dep_top1], lon[dep_top1])
    return {
        "n": int(len(ref_emb)),
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
        "level_top1_agreement_min": min(lv["top1_agreement"] for lv in levels),
        "top1_in_top5": float(in_top5.mean()),
        "median_drift_km": float(np.median(drift)), "p95_drift_km": float(np.percentile(drift, 95)),
        "sharpness_top1_prob": float(np.mean([lv["fp32_top1_prob"] for lv in levels])),
        "sharpness_margin": float(np.mean([lv["fp32_margin"] for lv in levels])),
        "levels": levels,
    }


def evaluate_gates(metrics: dict, gates: dict | None = None) -> list[dict]:
    rows = []
    for name, (op, threshold) in (gates or DEFAULT_GATES).items():
        value = metrics[name]
        ok = value >= threshold if op == ">=" else value <= threshold
        rows.append({"gate": name, "value": value, "need": f"{op} {threshold:g}", "pass": "PASS" if ok else "FAIL"})
    return rows


def gates_passed(rows: list[dict]) -> bool:
    return all(r["pass"] == "PASS" for r in rows)


def format_parity(metrics: dict, rows: list[dict], title: str) -> str:
    from .report import format_table

    lv = format_table([{"level": r["level"], "top1_agreement": r["top1_agreement"], "counted": r["counted"],
                        "ties": r["ties_excluded"], "agreement_incl_ties": r.get("top1_agreement_all", float("nan")), "fp32_top1_prob": r["fp32_top1_prob"],
                        "fp32_margin": r["fp32_margin"]} for r in metrics["levels"]])
    gates = format_table(rows, ["gate", "value", "need", "pass"])
    extra = (f"n={metrics['n']}  p95 drift {metrics['p95_drift_km']:.2f} km  sharpness: mean top-1 prob "
             f"{metrics['sharpness_top1_prob']:.3f}, margin {metrics['sharpness_margin']:.3f}"
             + ("  (a flat head: parity numbers mean little)" if metrics["sharpness_top1_prob"] < 0.05 else ""))
    return f"{title}\n{lv}\n\n{gates}\n{extra}"


def compare(ref_emb: np.ndarray, dep_emb: np.ndarray, scorer, gates: dict | None = None) -> dict:
    """FP32 reference vs deployed embeddings under ``gates`` (default :data:`DEFAULT_GATES`): ``{"metrics":
    parity_metrics(...), "gates": evaluate_gates(...) rows, "passed": bool}``. The one comparison behind the export's
    held-out check, the precision search, ``geosurge parity`` and ``geosurge-run verify``."""
    metrics = parity_metrics(ref_emb, dep_emb, scorer)
    rows = evaluate_gates(metrics, gates)
    return {"metrics": metrics, "gates": rows, "passed": gates_passed(rows)}
