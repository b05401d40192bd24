"""Calibrated uncertainty: the temperature of the prediction's probabilities, fitted on images with ground truth.

The runtime's probabilities over the finest cells are ``p(f) ∝ exp(A(f) / T)``, ``A`` the logit sum the exact
search ranks by and ``T`` the bundle's ``uncertainty.temperature`` (1 when none was fitted). ``confidence``, the
top-k ``prob`` and ``uncertainty_km`` (the radius around the answer holding 68% of the probability) come from them.
A model that is overconfident reports radii users read as a promise they are not: the reference model's FP32 bundle
put 68% of its probability within a median 392 km of its answer, and the truth was inside that radius for 12% of
its 1,000 held-out views (its median error: thousands of km).

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides the logits by one
``T`` fitted on held-out data with ground truth: the ``T`` that minimises the mean negative log-likelihood of the
finest cell holding each true location (a proper scoring rule: the whole distribution is calibrated, not one
number; convex in ``1 / T``, found by golden-section search). ``T`` scales every cell alike, so the ranking, the
top-k cells, the answer and the parity gates (measured on ``A``) do not change; only the probabilities and the
radius do. The record says what it bought: the share of images whose truth lies within the 68% radius before and
after (``coverage_before``, ``coverage``; 68% when the radius is calibrated) and the median radius. Measured on
the reference model (1,000 held-out views): T 6.9, coverage 12% -> 57%, median radius 392 -> 6,800 km for a median
error of 5,600 km — a weak model's honest radius is wide. Used by ``geosurge export --uncertainty-images CSV``;
recorded as the manifest's ``uncertainty``.
"""
from __future__ import annotations

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.geo.metrics import haversine_km

#: the share of the probability ``uncertainty_km`` holds (``CellScorer.uncertainty_km``'s default)
MASS = 0.68
#: fewer images with ground truth than this and the fit is refused
MIN_IMAGES = 50
#: the temperatures searched
T_RANGE = (1e-2, 1e3)


def coverage(scores: np.ndarray, lat: np.ndarray, lon: np.ndarray, scorer, temperature: float,
             mass: float = MASS) -> tuple[float, np.ndarray, np.ndarray]:
    """(share of images whose true location lies within the radius, radii (N,) km, errors (N,) km) at
    ``temperature``; the radius as ``Localizer`` reports it (at least the best cell's extent). ``scores`` (N,
    n_finest): each image's logit sums ``A`` (``CellScorer.search(..., with_scores=True).scores``); ``lat``,
    ``lon`` (N,) degrees: the truth; the answer is each row's best cell."""
    best = np.argmax(scores, axis=1)
    plat, plon = scorer.rep_lat[best], scorer.rep_lon[best]
    err = np.asarray(haversine_km(plat, plon, lat, lon), np.float64)
    radii = np.empty(len(scores))
    for i, a in enumerate(scores):
        z = a.astype(np.float64) / temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        radii[i] = max(scorer.uncertainty_km(p, float(plat[i]), float(plon[i]), mass=mass),
                       scorer.cell_extent_km(int(best[i])))  # as the runtime reports it
    return float(np.mean(err <= radii)), radii, err


def true_cells(hierarchy, lat, lon) -> np.ndarray:
    """(N,) the finest cell holding each true location, -1 outside the hierarchy's cells. Raises GeosurgeError when
    fewer than :data:`MIN_IMAGES` are inside: too few to fit the probabilities on."""
    cell = hierarchy.locate(lat, lon, strict=False)[:, -1]
    n = int((cell >= 0).sum())
    if n < MIN_IMAGES:
        raise GeosurgeError(f"uncertainty: {n} image(s) with ground truth inside the table's cells; at least "
                            f"{MIN_IMAGES} are needed to fit the probabilities (one image is 1/{max(n, 1)} of them)")
    return cell


def check_images(images, hierarchy, source=None) -> tuple[np.ndarray, np.ndarray]:
    """The truth (lat, lon) of ``images`` (a CalibrationSet), checked before any work: raises GeosurgeError when
    they have no coordinates or too few lie inside ``hierarchy``'s cells (:func:`true_cells`)."""
    if images.truth is None:
        raise GeosurgeError(("" if source is None else f"{source}: ")
                            + "--uncertainty-images needs ground truth: a CSV manifest with path, lat, lon")
    true_cells(hierarchy, *images.truth)
    return images.truth


def fit_temperature(scores: np.ndarray, lat: np.ndarray, lon: np.ndarray, scorer, mass: float = MASS,
                    iters: int = 40, log=print) -> dict:
    """The temperature minimising the mean NLL of the true finest cell (see the module docstring) and the record
    for the manifest: ``temperature``, ``mass``, ``images`` (used: their truth lies in a cell of the table),
    ``nll`` and ``nll_before`` (at 1), ``coverage`` and ``coverage_before`` (the share within the ``mass``
    radius), ``median_radius_km`` and ``_before``, ``median_error_km``. ``iters`` golden-section steps on
    ``log(1 / T)`` over :data:`T_RANGE` (40: T to 1e-6 relative). Raises GeosurgeError for fewer than
    :data:`MIN_IMAGES` images in the table."""
    cell = true_cells(scorer.hierarchy, lat, lon)
    inside = cell >= 0
    n = int(inside.sum())
    a = scores[inside]  # as given (float32): float64 only a chunk of images at a time
    a_true = a[np.arange(n), cell[inside]].astype(np.float64)
    top = a.max(axis=1).astype(np.float64)

    def nll(beta: float) -> float:  # mean over images of logsumexp(beta A) - beta A_true
        z = np.concatenate([np.exp(beta * (a[i:i + 128] - top[i:i + 128, None])).sum(axis=1)
                            for i in range(0, n, 128)])
        return float(np.mean(np.log(z) + beta * (top - a_true)))

    lo, hi = np.log(1 / T_RANGE[1]), np.log(1 / T_RANGE[0])
    g = (np.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = nll(np.exp(x1)), nll(np.exp(x2))
    for _ in range(iters):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = nll(np.exp(x1))
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = nll(np.exp(x2))
    t = float(1 / np.exp((lo + hi) / 2))
    lat, lon = np.asarray(lat)[inside], np.asarray(lon)[inside]
    cov1, radii1, err = coverage(scores[inside], lat, lon, scorer, 1.0, mass)
    cov, radii, _ = coverage(scores[inside], lat, lon, scorer, t, mass)
    rec = {"temperature": round(t, 6), "mass": mass, "images": n, "nll": round(nll(1 / t), 4),
           "nll_before": round(nll(1.0), 4), "coverage": round(cov, 4), "coverage_before": round(cov1, 4),
           "median_radius_km": round(float(np.median(radii)), 1),
           "median_radius_km_before": round(float(np.median(radii1)), 1),
           "median_error_km": round(float(np.median(err)), 1)}
    log(f"uncertainty: temperature {t:.3g} fitted on {n} images with ground truth (NLL of the true cell "
        f"{rec['nll_before']:.2f} -> {rec['nll']:.2f}): the {mass:.0%} radius covers the truth on {cov:.0%} (was "
        f"{cov1:.0%}); median radius {rec['median_radius_km_before']:,.0f} -> {rec['median_radius_km']:,.0f} km, "
        f"median error {rec['median_error_km']:,.0f} km")
    return rec
