"""Accuracy in kilometres: predictors over evaluation items -> per-item errors, per-source summaries, a table.

Metrics (``geosurge.geo.summarize_errors``): % of images within 1 / 25 / 200 / 750 / 2500 km (the thresholds of Im2GPS3k,
YFCC4k and the GeoSURGE paper), median and mean great-circle error in km, mean GeoScore (5000 * exp(-d / 1492.7)).
Accuracy is over the images that could be evaluated; every other row is counted (``failed``) and named with its
reason (missing file, undecodable image, no GPS tags), never dropped silently.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputFileError
from ..geo import ACCURACY_THRESHOLDS_KM, haversine_km, summarize_errors
from .manifests import EvalItem

TABLE_COLUMNS = ["model", "source", "n", "failed", *[f"acc@{t:g}km" for t in ACCURACY_THRESHOLDS_KM], "median_km",
                 "mean_km", "geoscore"]
#: the accuracy columns are percentages: one decimal in tables (23.3, not 23.3333 or 0.0000)
PERCENT_DECIMALS = {f"acc@{t:g}km": 1 for t in ACCURACY_THRESHOLDS_KM}


@dataclass
class EvalResult:
    """One predictor over the items: ``predictions`` (one dict per evaluated item) and ``failures`` (one per
    item that could not be evaluated), with ``summary`` per source (``"all"`` first)."""

    model: dict
    tencrop: bool
    predictions: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def errors(self, source: str | None = None) -> np.ndarray:
        return np.array([p["km"] for p in self.predictions if source in (None, "all") or p["source"] == source])

    def sources(self) -> list[str]:
        srcs = sorted({p["source"] for p in self.predictions} | {f["source"] for f in self.failures})
        return [s for s in srcs if s != "all"]

    def summary(self) -> dict:
        out = {"all": {**summarize_errors(self.errors()), "failed": len(self.failures)}}
        srcs = self.sources()
        if len(srcs) > 1 or (srcs and srcs[0] != "all"):
            for s in srcs:
                out[s] = {**summarize_errors(self.errors(s)),
                          "failed": sum(1 for f in self.failures if f["source"] == s)}
        return out

    def rows(self) -> list[dict]:
        return [{"model": self.model["label"], "source": s, **v} for s, v in self.summary().items()]

    def to_dict(self) -> dict:
        return {"model": self.model, "tencrop": self.tencrop, "summary": self.summary(), "seconds": self.seconds,
                "ms_per_image": 1e3 * self.seconds / max(1, len(self.predictions)),
                "failures": self.failures, "predictions": self.predictions}


def evaluate(predictor, items: list[EvalItem], tencrop: bool = False, batch: int = 16, progress: bool = False,
             desc: str | None = None) -> EvalResult:
    """Run ``predictor`` over ``items`` in batches; every item ends as a prediction or a failure. Images are
    decoded by ``geosurge.images.load_image`` per the predictor's preprocessing spec (JPEG DCT scaling, alpha
    background, EXIF orientation), exactly as the runtime decodes them."""
    from ..images import load_image

    res = EvalResult(predictor.describe(), tencrop)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc or predictor.label, leave=False, dynamic_ncols=True)

    def fail(it: EvalItem, why: str):
        res.failures.append({"path": str(it.path), "source": it.source, "row": it.row, "error": why})

    pending: list[tuple[EvalItem, np.ndarray]] = []

    def flush():
        if not pending:
            return
        pred = predictor.predict([rgb for _, rgb in pending], tencrop)
        for (it, _), (plat, plon) in zip(pending, pred):
            km = float(haversine_km(it.lat, it.lon, plat, plon))
            res.predictions.append({"path": str(it.path), "source": it.source, "lat": it.lat, "lon": it.lon,
                                    "pred_lat": float(plat), "pred_lon": float(plon), "km": km})
        pending.clear()

    for it in items:
        if it.error or it.lat is None:
            fail(it, it.error or "no ground-truth position")
        else:
            try:
                pending.append((it, load_image(it.path, predictor.spec)))
            except InputFileError as e:
                msg = str(e)
                fail(it, msg[len(str(it.path)) + 2:] if msg.startswith(str(it.path)) else msg)
            if len(pending) >= batch:
                flush()
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    res.seconds = time.perf_counter() - t0
    return res


def evaluate_models(models, items, backend: str | None = None, threads: int | None = None, tencrop: bool = False,
                    batch: int = 16, labels=None, progress: bool = False, log=None) -> list[EvalResult]:
    """Several checkpoints and/or bundles (paths, see :func:`load_predictor`; or ready :class:`Predictor` objects)
    over the same items, one :class:`EvalResult` each, in order. Predictors opened here are closed here."""
    from .predictors import Predictor, load_predictor

    out = []
    labels = list(labels or [])
    for i, m in enumerate(models):
        own = not isinstance(m, Predictor)
        p = load_predictor(m, backend, threads, labels[i] if i < len(labels) else None) if own else m
        try:
            if log:
                log(f"evaluating {p.label} ({p.kind}) on {len(items)} item(s){' with TenCrop' if tencrop else ''}")
            out.append(evaluate(p, items, tencrop, batch, progress))
        finally:
            if own:
                p.close()
    return out


def results_table(results: list[EvalResult], title: str | None = None) -> str:
    from ..report import format_table

    return format_table([r for res in results for r in res.rows()], TABLE_COLUMNS, title=title,
                        decimals=PERCENT_DECIMALS)


def failures_text(results: list[EvalResult], limit: int = 20) -> str:
    """The rows that could not be evaluated, once per item (they are the same for every model but decoding may
    differ), with the reason."""
    seen, lines = set(), []
    for res in results:
        for f in res.failures:
            key = (f["path"], f["error"])
            if key in seen:
                continue
            seen.add(key)
            where = f" (row {f['row']})" if f.get("row") else ""
            lines.append(f"  {f['path']}{where}: {f['error']}")
    if not lines:
        return ""
    more = f"\n  ... and {len(lines) - limit} more (see the JSON report)" if len(lines) > limit else ""
    return f"{len(lines)} row(s) not evaluated:\n" + "\n".join(lines[:limit]) + more


@dataclass
class EvalReport:
    """What ``geosurge eval`` measured: ``results`` (one :class:`EvalResult` per model, in order) on ``items``
    rows of ``source`` (``format``: geosurge | im2gps | osv5m | exif), the ``table`` as printed, the files of a
    folder that were ``skipped`` (not images), and the ``plots`` written (name -> path)."""

    source: str
    format: str
    items: int
    tencrop: bool
    results: list[EvalResult]
    table: str
    skipped: list = field(default_factory=list)
    plots: dict = field(default_factory=dict)

    @property
    def failures_text(self) -> str:
        return failures_text(self.results)

    def rows(self) -> list[dict]:
        """The table's rows: one per (model, source)."""
        return [r for res in self.results for r in res.rows()]

    def inputs(self) -> dict:
        """``{"files", "read", "refused", "skipped"}`` over the source's rows (the first model's decode)."""
        r = self.results[0] if self.results else None
        read = len(r.predictions) if r else 0
        return {"files": self.items + len(self.skipped), "read": read, "refused": self.items - read,
                "skipped": len(self.skipped)}

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "items": self.items, "tencrop": self.tencrop,
                "inputs": self.inputs(), "not_images": [{"path": str(s.path), "reason": s.reason}
                                                        for s in self.skipped],
                "table": self.table, "failures_text": self.failures_text, "plots": self.plots,
                "results": [r.to_dict() for r in self.results]}


def run_eval(source, models, output=None, *, images=None, backend: str | None = None, threads: int | None = None,
             tencrop: bool = False, batch: int = 16, labels=None, limit: int | None = None, plots: bool = True,
             progress: bool = False, log=None) -> EvalReport:
    """The whole of ``geosurge eval`` (``geosurge.api.evaluate`` calls it): the source's rows
    (:func:`~geosurge.evaluation.manifests.read_source`) -> every model -> :class:`EvalReport`. With ``output``,
    writes ``eval.json``, ``eval.txt`` and (``plots``) ``error_cdf.png`` and ``world_map.png`` there (atomic
    writes). ``limit``: only the first N rows."""
    from pathlib import Path

    from ..fsutil import atomic_write_bytes
    from ..report import write_json
    from .manifests import read_source

    src = read_source(source, images)
    if log:
        for s in src.skipped:
            log(f"skipped {s.path}: {s.reason}")
    items = src.items[:limit] if limit else src.items
    results = evaluate_models(models, items, backend, threads, tencrop, batch, labels, progress, log)
    title = (f"% of images within each distance ({src.format} manifest, {len(items)} row(s)"
             f"{', TenCrop' if tencrop else ''})")
    report = EvalReport(str(source), src.format, len(items), tencrop, results, results_table(results, title),
                        src.skipped)
    if output is not None:
        out = Path(output)
        if plots and any(r.predictions for r in results):
            from .plots import plot_error_cdf, plot_world_map

            report.plots = {"error_cdf": str(plot_error_cdf(results, out / "error_cdf.png")),
                            "world_map": str(plot_world_map(results, out / "world_map.png"))}
        write_json(out / "eval.json", report.to_dict())
        atomic_write_bytes(out / "eval.txt", (report.table + "\n" + report.failures_text + "\n").encode())
    return report
