"""Workstation parity: the FP32 torch model vs the deployed bundle through the runtime, on the same images."""
from __future__ import annotations

import time

import numpy as np
import torch

from geosurge.errors import GeosurgeError
from geosurge.images import list_images, load_image
from geosurge.parity import evaluate_gates, gates_passed, parity_metrics
from geosurge.preprocess import preprocess
from geosurge.runtime.localizer import Localizer

from .source import load_source_model


def torch_vs_bundle(bundle_dir, images, checkpoint: str | None = None, backend: str = "onnxruntime",
                    threads: int | None = None, gates: dict | None = None, log=print) -> dict:
    loc = Localizer(bundle_dir, backend=backend, threads=threads)
    model = load_source_model(loc.bundle, checkpoint)
    listing = list_images(images)
    summary = listing.summary()
    for line in listing.skip_lines():
        log(f"  {line}")
    xs, names, errors = [], [], []
    for p in listing.paths:  # the same decode and preprocessing for both sides: the manifest's spec
        try:
            xs.append(preprocess(load_image(p, loc.spec), loc.spec))
            names.append(str(p))
            summary.count(True)
        except GeosurgeError as e:
            errors.append({"input": str(p), "error": str(e)})
            summary.count(False)
            log(f"  refused {e}")
    log(f"parity: {summary.line()}")
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
            "inputs": summary.to_dict(), "not_images": [{"input": str(s.path), "reason": s.reason}
                                                      for s in listing.skipped],
            "precision": loc.bundle.manifest["model"]["precision"], "metrics": metrics, "gates": rows,
            "passed": gates_passed(rows),
            "seconds": {"torch_fp32": round(t1 - t0, 3), "deployed": round(t2 - t1, 3)}}


def time_torch_vs_runtime(model, loc, x: np.ndarray, iters: int = 50, warmup: int = 5) -> list[dict]:
    """Batch latency of torch eager ``model.embed`` and the runtime's backend on the same input, interleaved run
    by run so both see the same machine state. Returns one row per engine (p50/p95 in ms)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    t_torch, t_rt = [], []
    with torch.inference_mode():
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            model.embed(xt)
            t1 = time.perf_counter()
            loc.embed(x)
            t2 = time.perf_counter()
            if i >= warmup:
                t_torch.append((t1 - t0) * 1e3)
                t_rt.append((t2 - t1) * 1e3)
    precision = loc.bundle.manifest["model"]["precision"].upper()
    return [{"engine": "torch eager FP32", "p50_ms": float(np.median(t_torch)),
             "p95_ms": float(np.percentile(t_torch, 95))},
            {"engine": f"{loc.backend.name} {precision}", "p50_ms": float(np.median(t_rt)),
             "p95_ms": float(np.percentile(t_rt, 95))}]
