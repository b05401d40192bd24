"""Geolocation accuracy in kilometres (``geosurge eval``, ``geosurge.api.evaluate``): manifests (ours, Im2GPS3k /
YFCC4k, OSV-5M, a folder of GPS-tagged photos), predictors (a checkpoint through torch, a bundle through the
runtime), per-source summaries, the table, the JSON report and two plots.

Library use::

    from geosurge.evaluation import read_items, evaluate_models, results_table
    items, fmt = read_items("heldout/manifest.csv")
    results = evaluate_models(["runs/ref/checkpoint", "runs/ref/bundle-int8"], items)
    print(results_table(results)); results[1].errors()  # per-image km, in item order of the predictions
"""
from ..geo import summarize_errors
from .evaluate import (TABLE_COLUMNS, EvalReport, EvalResult, evaluate, evaluate_models, failures_text,
                       results_table, run_eval)
from .manifests import (EvalInputs, EvalItem, exif_gps, read_exif_folder, read_items, read_manifest_items,
                        read_source)
from .predictors import BundlePredictor, ConstantPredictor, Predictor, TorchPredictor, load_predictor

__all__ = ["TABLE_COLUMNS", "EvalReport", "EvalResult", "evaluate", "evaluate_models", "failures_text",
           "results_table", "run_eval", "summarize_errors", "EvalInputs", "EvalItem", "exif_gps", "read_exif_folder",
           "read_items", "read_manifest_items", "read_source", "BundlePredictor", "ConstantPredictor", "Predictor",
           "TorchPredictor", "load_predictor"]
