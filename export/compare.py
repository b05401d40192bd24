"""Parity on the workstation: the FP32 torch model vs a deployed model part, through the runtime.

* :func:`heldout_parity`: at export, every non-FP32 model part against the FP32 model on images the quantizer did
  not calibrate on (the manifest's ``quantization.check``), whatever the target.
* :func:`torch_vs_bundle`: ``geosurge parity``: a finished bundle against its source model on the user's images.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from geosurge.formats import Precision, Target, default_backend
from geosurge.inputs import read_preprocessed
from geosurge.manifest import ParityRecord
from geosurge.parity import compare
from geosurge.runtime.backends import BackendUnavailable, embed_batches, get_runner
from geosurge.runtime.localizer import Localizer
from geosurge.runtime.verify import machine_notes

from .source import load_source_model, reference_label

REFERENCE = "FP32 torch (the exported model)"


def torch_embed(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """FP32 torch embeddings (N, D) of preprocessed images (N, 3, S, S)."""
    with torch.no_grad():
        return np.concatenate([model.eval().embed(torch.from_numpy(np.ascontiguousarray(x[i:i + batch],
                                                                                       np.float32))).numpy()
                               for i in range(0, len(x), batch)])


def heldout_parity(model, bundle, inputs: np.ndarray, scorer, gates: dict | None = None,
                   threads: int | None = 2, truth=None, simulate_int8: bool = False,
                   reference: str = REFERENCE) -> ParityRecord:
    """The staged model part (``bundle``: its Bundle, parts written) vs the FP32 torch ``model`` on ``inputs``
    (N, 3, S, S), scored with the bundle's table; ``truth`` ((lat, lon) arrays) adds the accuracy deltas. Runs on
    the format's default backend on this machine (onnxruntime for ONNX, also for a TensorRT-bound QDQ model; Core
    ML on macOS); where that backend cannot run here, the record says so (``passed`` None) instead of inventing a
    result. An INT8 model runs as simulated INT8 (exact accumulation) when ``simulate_int8`` and always when it is
    TensorRT-bound (as TensorRT's kernels compute it), not on this CPU's integer kernels, which saturate on x86
    without VNNI. ``reference``: what ``model`` is, for the record."""
    m = bundle.manifest
    backend = default_backend(m.model.format)
    cls = get_runner(backend)
    simulate = m.model.precision is Precision.INT8 and (simulate_int8 or m.model.target is Target.TENSORRT)
    options = {"simulate_int8": True} if simulate else {}
    try:
        runner = cls.open(bundle, threads=threads if cls.thread_option else None, **options)
    except BackendUnavailable as e:
        return ParityRecord(passed=None, images=int(len(inputs)), reference=reference, runner=backend.value,
                            skipped=f"not measurable on this machine: {e}")
    with runner:
        dep = embed_batches(runner, inputs, m.io.input.name, m.io.embedding.name, m.io.static_batch)
        options = dict(runner.options or {})
    rep = compare(torch_embed(model, inputs), dep, scorer, gates, truth=truth)
    metrics = {k: v for k, v in rep["metrics"].items() if k != "levels"}
    return ParityRecord(passed=rep["passed"], metrics=metrics, gates=rep["gates"], images=int(len(inputs)),
                        reference=reference, runner=backend.value, runner_options=options or None)


def torch_vs_bundle(bundle_dir, images, checkpoint: str | None = None, backend: str | None = None,
                    threads: int | None = None, gates: dict | None = None, log=print, **options) -> dict:
    """FP32 torch (the manifest's ``source.reference`` or else its source, or ``checkpoint``) vs the bundle through the
    runtime on ``images`` (files, folders listed by content, or CSV manifests ``path, lat, lon`` whose coordinates
    add the accuracy deltas in km), both decoded and preprocessed by the one implementation. ``options``: the
    backend's own (OpenVINO ``device``, ``precision_hint``). Returns the report (``passed``, ``metrics``, ``gates``,
    ``backend``, ``runner_options``, ``reference``: the FP32 model compared with, ``skipped``: refused images,
    ``inputs``: read / refused / skipped counts, ``not_images``: folder files that are not images, ``notes``: what
    the figures mean on this machine, :func:`geosurge.runtime.verify.machine_notes`); raises GeosurgeError when no
    image is readable."""
    with Localizer(bundle_dir, backend=backend, threads=threads, options=options) as loc:
        model = load_source_model(loc.bundle, checkpoint)
        reference = reference_label(loc.bundle, checkpoint)
        read = read_preprocessed(images, loc.spec, log=log, what="parity")
        x, names = read.inputs, read.names
        t0 = time.perf_counter()
        ref = torch_embed(model, x)
        t1 = time.perf_counter()
        dep = loc.embed(x)
        t2 = time.perf_counter()
        rep = compare(ref, dep, loc.scorer, gates or loc.bundle.manifest.gates() or None, truth=read.truth)
        m = loc.bundle.manifest
        runner_options = dict(loc.runner.options or {})
        return {"bundle": str(bundle_dir), "backend": loc.runner.name.value, "runner_options": runner_options,
                "notes": machine_notes(m, loc.runner.name, runner_options), "images": names, "skipped": read.errors,
                "inputs": read.summary.to_dict(), "not_images": read.not_images,
                "precision": m.model.precision.value, "reference": reference, **rep,
                "seconds": {"torch_fp32": round(t1 - t0, 3), "deployed": round(t2 - t1, 3)}}


def time_torch_vs_runtime(model, loc, x: np.ndarray, iters: int = 50, warmup: int = 5) -> list[dict]:
    """Batch latency of torch eager ``model.embed`` and the runtime's backend on the same input, interleaved run
    by run so both see the same machine state. Returns one row per engine (p50/p95 in ms)."""
    from geosurge.timing import interleaved

    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    with torch.inference_mode():
        t = interleaved({"torch": lambda: model.embed(xt), "runtime": lambda: loc.embed(x)}, iters, warmup)
    t_torch, t_rt = t["torch"], t["runtime"]
    precision = loc.bundle.manifest.model.precision.value.upper()
    return [{"engine": "torch eager FP32", "p50_ms": float(np.median(t_torch)),
             "p95_ms": float(np.percentile(t_torch, 95))},
            {"engine": f"{loc.runner.name.value} {precision}", "p50_ms": float(np.median(t_rt)),
             "p95_ms": float(np.percentile(t_rt, 95))}]
