"""Geolocation accuracy in kilometres (``geosurge eval``): manifests (ours, Im2GPS3k / YFCC4k, OSV-5M, a folder of
GPS-tagged photos), predictors (a checkpoint through torch, a bundle through the runtime), per-source summaries,
the table, the JSON report and two plots.

Library use (e.g. for task-level parity gates)::

    from geosurge.evaluation import read_items, evaluate_models, results_table
    items, fmt = read_items("heldout/manifest.csv")
    results = evaluate_models(["runs/ref/checkpoint", "runs/ref/bundle-int8"], items)
    print(results_table(results)); results[1].errors()  # per-image km, in item order of the predictions
"""
from .evaluate import (TABLE_COLUMNS, EvalResult, evaluate, evaluate_models, failures_text, results_table,
                       summarize_errors)
from .manifests import EvalItem, exif_gps, read_exif_folder, read_items, read_manifest_items
from .predictors import BundlePredictor, Predictor, TorchPredictor, load_predictor

__all__ = ["TABLE_COLUMNS", "EvalResult", "evaluate", "evaluate_models", "failures_text", "results_table",
           "summarize_errors", "EvalItem", "exif_gps", "read_exif_folder", "read_items", "read_manifest_items",
           "BundlePredictor", "Predictor", "TorchPredictor", "load_predictor", "run_eval"]


def run_eval(source, models, output=None, images=None, backend: str = "onnxruntime", threads: int | None = None,
             tencrop: bool = False, batch: int = 16, labels=None, limit: int | None = None, plots: bool = True,
             progress: bool = False, log=None) -> tuple[dict, list]:
    """The whole of ``geosurge eval``: items -> every model -> (report dict: ``table``, ``results``, ``format``,
    ``plots``; the :class:`EvalResult` list); with ``output``, writes ``eval.json``, ``eval.txt`` and (``plots``) ``error_cdf.png`` and
    ``world_map.png`` there."""
    from pathlib import Path

    from ..report import write_json

    items, fmt = read_items(source, images)
    if limit:
        items = items[:limit]
    results = evaluate_models(models, items, backend, threads, tencrop, batch, labels, progress, log)
    report = {"source": str(source), "format": fmt, "items": len(items), "tencrop": tencrop,
              "table": results_table(results, title=f"% of images within each distance ({fmt} manifest, "
                                                    f"{len(items)} row(s){', TenCrop' if tencrop else ''})"),
              "failures_text": failures_text(results), "results": [r.to_dict() for r in results], "plots": {}}
    if output is not None:
        out = Path(output)
        if plots and any(r.predictions for r in results):
            from .plots import plot_error_cdf, plot_world_map

            report["plots"] = {"error_cdf": str(plot_error_cdf(results, out / "error_cdf.png")),
                               "world_map": str(plot_world_map(results, out / "world_map.png"))}
        write_json(out / "eval.json", report)
        from ..fsutil import atomic_write_bytes

        atomic_write_bytes(out / "eval.txt", (report["table"] + "\n" + report["failures_text"] + "\n").encode())
    return report, results
