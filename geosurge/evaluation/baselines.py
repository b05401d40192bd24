"""Baselines beside a trained model, and the task-level drift between two predictors.

The two baselines every accuracy figure of the reference model is shown beside, measured on the same rows:

* the prior's most likely cell — the representative point of the finest cell holding most photos of the hierarchy,
  predicted for every image (:meth:`geosurge.geo.CellHierarchy.prior_mode`);
* the untrained model — the same config built with the same seed, before any training.
"""
from __future__ import annotations

import numpy as np

PRIOR_LABEL = "prior's most likely cell"
UNTRAINED_LABEL = "untrained model"


def baselines(config, hierarchy, seed: int = 0) -> list:
    """[prior predictor, untrained GeoSurge (eval mode)] for ``geosurge.evaluation.evaluate_models`` /
    ``geosurge.api.evaluate``; labels :data:`PRIOR_LABEL`, :data:`UNTRAINED_LABEL`. ``config``: a config name or a
    ``GeoSurgeConfig``; ``hierarchy``: the trained model's cell hierarchy."""
    import torch

    from ..models import build_model
    from .predictors import ConstantPredictor, TorchPredictor

    lat, lon = hierarchy.prior_mode()
    torch.manual_seed(seed)
    untrained = build_model(config, hierarchy).eval()
    return [ConstantPredictor(lat, lon, PRIOR_LABEL), TorchPredictor(None, UNTRAINED_LABEL, model=untrained)]


def drift_km(reference, other) -> dict:
    """Task-level drift of ``other`` vs ``reference`` (two :class:`~geosurge.evaluation.EvalResult` over the same
    rows, e.g. an INT8 and the FP32 bundle): on the images both predicted, the geodesic km between their predicted
    points (median, p95, max; km), the share with the same point, and the acc@km deltas in points (other minus
    reference, per threshold of ``summarize_errors``). Raises ValueError when they share no image."""
    from ..geo import haversine_km, summarize_errors

    ref = {p["path"]: p for p in reference.predictions}
    pairs = [(ref[p["path"]], p) for p in other.predictions if p["path"] in ref]
    if not pairs:
        raise ValueError("drift_km: the two results share no image")
    a = np.array([[r["pred_lat"], r["pred_lon"], r["km"]] for r, _ in pairs])
    b = np.array([[o["pred_lat"], o["pred_lon"], o["km"]] for _, o in pairs])
    d = haversine_km(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    sa, sb = summarize_errors(a[:, 2]), summarize_errors(b[:, 2])
    return {"n": len(pairs), "same_point": float(np.mean(d < 1e-6)), "drift_median_km": float(np.median(d)),
            "drift_p95_km": float(np.percentile(d, 95)), "drift_max_km": float(d.max()),
            **{f"delta_{k}": sb[k] - sa[k] for k in sa if k.startswith("acc@")}}
