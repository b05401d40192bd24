"""Workstation parity: the FP32 torch model vs the deployed bundle through the runtime, on the same images."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from geosurge.errors import GeosurgeError
from geosurge.images import read_image
from geosurge.parity import evaluate_gates, gates_passed, parity_metrics
from geosurge.preprocess import preprocess
from geosurge.runtime.localizer import Localizer, expand_inputs

from .source import load_source_model


def torch_vs_bundle(bundle_dir, images, checkpoint: str | None = None, backend: str = "onnxruntime",
                    threads: int | None = None, gates: dict | None = None, log=print) -> dict:
    loc = Localizer(bundle_dir, backend=backend, threads=threads)
    model = load_source_model(loc.bundle, checkpoint)
    paths = expand_inputs(images)
    xs, names, errors = [], [], []
    for p in paths:  # the same preprocessing for both sides: the manifest's spec
        try:
            xs.append(preprocess(read_image(p), loc.spec))
            names.append(str(p))
        except GeosurgeError as e:
            errors.append({"input": str(p), "error": str(e)})
            log(f"  skip {e}")
    if not xs:
        raise GeosurgeError("parity: no readable images")
    x = np.stack(xs)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model.embed(torch.from_numpy(x)).numpy()
    t1 = time.perf_counter()
    dep = loc.embed(x)
    t2 = time.perf_counter()
    metrics = parity_metrics(ref, dep, loc.scorer)
    manifest_gates = {k: tuple(v) for k, v in loc.bundle.manifest.get("parity_gates", {}).items()}
    rows = evaluate_gates(metrics, gates or manifest_gates or None)
    return {"bundle": str(bundle_dir), "backend": backend, "images": names, "skipped": errors,
            "precision": loc.bundle.manifest["model"]["precision"], "metrics": metrics, "gates": rows,
            "passed": gates_passed(rows),
            "seconds": {"torch_fp32": round(t1 - t0, 3), "deployed": round(t2 - t1, 3)}}
