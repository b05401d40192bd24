"""The measured precision search: all-INT8 first; if the parity gates fail on held-out images, rank the quantizable
nodes by the error each causes alone and keep the worst out of INT8 compute, group by group, until a mix passes.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.parity import compare

from . import ort_dynamic, ort_static
from .bias_correction import correct_biases, input_means
from .config import COMPUTE_OP_TYPES, DYNAMIC_OP_TYPES, WEIGHT_ONLY_MAX_ERROR, QuantConfig
from .graph import quantizable_nodes, weight_only_int8

if TYPE_CHECKING:
    from geosurge.calibration.dataset import CalibrationSet


def run_embeddings(path, inputs: np.ndarray, threads: int | None = 2, output: str = "embedding",
                   simulate_int8: bool = False) -> np.ndarray:
    """Run an ONNX model file (static batch 1 or dynamic) over ``inputs`` one image at a time on onnxruntime CPU
    (``simulate_int8``: a QDQ model as simulated INT8, :class:`~geosurge.runtime.backends.onnxruntime.
    OnnxRuntimeRunner`)."""
    from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, threads=threads, simulate_int8=simulate_int8) as r:
        name = r.input_names[0]
        return np.concatenate([r.infer({name: inputs[i:i + 1]})[output] for i in range(len(inputs))])


class Quantizer:
    """One precision's quantize call with everything but the node choice fixed (what the search varies)."""

    def __init__(self, prepared: Path, cfg: QuantConfig, calib: CalibrationSet | None, cache: Path | None,
                 log=print):
        self.prepared, self.cfg, self.calib, self.cache = prepared, cfg, calib, cache
        self.op_types = COMPUTE_OP_TYPES if cfg.precision == "int8" else DYNAMIC_OP_TYPES
        #: nodes allowed weight-only INT8 when kept out of INT8 compute (None: all); set from measurements
        self.weight_only_ok: set[str] | None = None
        self._input_means: dict | None = None  # bias correction's FP32 statistics, measured on first use
        self.log = log

    def __call__(self, dst: Path, exclude: list[str] = (), only: list[str] | None = None) -> dict:
        exclude = list(self.cfg.nodes_to_exclude) + list(exclude)
        if not only and {n["node"] for n in self.nodes()} <= set(exclude):  # nothing left to quantize
            shutil.copyfile(self.prepared, dst)
            facts = {"quantizer": "none (every quantizable node excluded)", "nodes_excluded": exclude}
        elif self.cfg.precision == "int8":
            facts = ort_static.quantize_int8_static(self.prepared, dst, self.calib, self.cfg, exclude, self.cache, only)
        else:
            facts = ort_dynamic.quantize_int8_dynamic(self.prepared, dst, self.cfg, exclude, only)
        wo = self.weight_only_nodes(exclude) if not only else []
        if wo or (not only and self.cfg.excluded_weights == "int8"):
            facts["weight_only_int8"] = weight_only_int8(dst, wo) if wo else 0
        if self.cfg.precision == "int8" and "nodes_excluded" in facts:
            facts["bias_correction"] = self._correct_biases(dst)
        elif self.cfg.precision != "int8":
            facts["bias_correction"] = {"applied": False, "why": "static int8 only"}
        self.last_facts = facts
        return facts

    def _correct_biases(self, dst: Path) -> dict:
        """Bias correction of the INT8 weights of ``dst`` (:mod:`.bias_correction`), with the FP32 input means of
        the prepared graph measured once per quantizer on its calibration images: ``{"applied": True, "nodes",
        "without_bias", "max_abs", "images"}`` or ``{"applied": False, "why"}``."""
        if not self.cfg.bias_correction:
            return {"applied": False, "why": self.cfg.bias_correction_off or "turned off (--no-bias-correction)"}
        if self.calib is None:
            return {"applied": False, "why": "no calibration images given"}
        if self._input_means is None:
            self._input_means = input_means(self.prepared, self.calib, log=self.log)
        return {"applied": True, **correct_biases(dst, self._input_means), "images": len(self.calib)}

    def with_config(self, cfg: QuantConfig) -> "Quantizer":
        """The same prepared graph, calibration images, range cache and bias-correction statistics under ``cfg``."""
        q = Quantizer(self.prepared, cfg, self.calib, self.cache, log=self.log)
        q._input_means = self._input_means
        return q

    def weight_only_nodes(self, exclude) -> list[str]:
        """Which of the kept-out nodes ``exclude`` get weight-only INT8 weights: the search's (``excluded_weights``
        "int8") where measured harmless (:attr:`weight_only_ok`; None: all), the hand-excluded ones
        (``cfg.nodes_to_exclude``) only with ``exclude_nodes_weights`` "int8"; never ``cfg.float_weight_nodes``."""
        hand = set(self.cfg.nodes_to_exclude)
        ok = self._names() if self.weight_only_ok is None else self.weight_only_ok
        picked = []
        for n in dict.fromkeys(exclude):
            if n in self.cfg.float_weight_nodes:
                continue
            if n in hand:
                if self.cfg.exclude_nodes_weights == "int8":
                    picked.append(n)
            elif self.cfg.excluded_weights == "int8" and n in ok:
                picked.append(n)
        return picked

    def _names(self) -> set[str]:
        return {n["node"] for n in quantizable_nodes(self.prepared, self.op_types)}

    def nodes(self) -> list[dict]:
        return [n for n in quantizable_nodes(self.prepared, self.op_types)
                if n["node"] not in self.cfg.nodes_to_exclude]


# ---- sensitivity and the search --------------------------------------------------------------------------------
def node_sensitivity(quantizer: Quantizer, inputs: np.ndarray, workdir: Path, threads: int | None = 2,
                     log=print) -> list[dict]:
    """Per quantizable node, the error it causes alone: the graph with only that node quantized (static: with the
    shared calibration ranges) vs the float graph, on ``inputs``: 1 - mean embedding cosine. Worst first.

    Measured end to end rather than as a tensor's local SQNR: a node's local noise says little about how much of
    it survives to the embedding (local SQNR ranked these graphs' culprits poorly)."""
    ref = run_embeddings(quantizer.prepared, inputs, threads)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    trial = workdir / "sensitivity.onnx"
    nodes = quantizer.nodes()
    rows = []
    weights_too = quantizer.cfg.excluded_weights == "int8"
    for i, n in enumerate(nodes):
        quantizer(trial, only=[n["node"]])
        dep = run_embeddings(trial, inputs, threads, simulate_int8=quantizer.cfg.simulate_int8)
        cos = (ref * dep).sum(1) / np.linalg.norm(dep, axis=1)
        row = {"node": n["node"], "op": n["op"], "error": float(1.0 - cos.mean()), "cosine_min": float(cos.min())}
        if weights_too:  # the same node with weight-only INT8 (float compute): may it keep INT8 weights?
            shutil.copyfile(quantizer.prepared, trial)
            if weight_only_int8(trial, [n["node"]]):
                dep = run_embeddings(trial, inputs, threads, simulate_int8=quantizer.cfg.simulate_int8)
                row["weight_only_error"] = float(1.0 - ((ref * dep).sum(1) / np.linalg.norm(dep, axis=1)).mean())
        rows.append(row)
        if (i + 1) % 10 == 0 or i + 1 == len(nodes):
            log(f"  sensitivity: {i + 1}/{len(nodes)} nodes measured")
    trial.unlink(missing_ok=True)
    rows.sort(key=lambda r: (-r["error"], r["node"]))
    return rows


#: what a search step records of the parity metrics (task-level first, then the diagnostics)
STEP_METRICS = ("median_drift_km", "p95_drift_km", "top1_agreement_confident", "accuracy_delta_min_pts",
                "cosine_mean", "cosine_min", "level_top1_agreement_min", "top1_in_top5")


def summary(rec: dict) -> str:
    """One line of a parity result: the task-level figures, cosine as a diagnostic, and the verdict."""
    m = rec["metrics"]
    acc = (f", acc delta {m['accuracy_delta_min_pts']:+.1f} pts" if m.get("accuracy_delta_min_pts") is not None
           else "")
    failed = [g["gate"] for g in rec["gates"] if g["pass"] == "FAIL"]
    return (f"drift median {m['median_drift_km']:.1f} km p95 {m['p95_drift_km']:.1f} km, confident top-1 agreement "
            f"{m['top1_agreement_confident']:.3f} ({m['confident_n']} images){acc}; cos {m['cosine_mean']:.4f} -> "
            + ("PASS" if rec["passed"] else f"FAIL ({', '.join(failed)})"))


def step_record(rec: dict, **extra) -> dict:
    m = rec["metrics"]
    return {**extra, "passed": rec["passed"], **{k: m[k] for k in STEP_METRICS if m.get(k) is not None}}


def search_precision(quantizer: Quantizer, dst: Path, holdout: np.ndarray, scorer, workdir: Path,
                     gates: dict | None = None, threads: int | None = 2, sensitivity_images: int = 8,
                     ranking: list[dict] | None = None, log=print, reference: np.ndarray | None = None,
                     truth=None) -> dict:
    """All-INT8 first; if the gates fail on ``holdout`` (the *choose* images: never calibrated on, never used for
    the final check), rank nodes by measured error and exclude the worst 1, 2, 4, ... until a mix passes, then
    bisect down to the smallest passing group. ``reference``: the FP32 model's embeddings of ``holdout`` (default:
    the prepared graph's own — differs when the graph is a QAT-tuned copy); ``truth``: their (lat, lon) for the
    accuracy gates. Writes the chosen mix to ``dst`` and returns the record for the manifest (``passed`` False,
    nothing written, when no mix passes)."""
    ref = reference if reference is not None else run_embeddings(quantizer.prepared, holdout, threads)
    trial = workdir / "trial.onnx"
    steps = []

    def attempt(excluded: list[str], label: str | None = None) -> dict:
        quantizer(trial, excluded)
        rec = compare(ref, run_embeddings(trial, holdout, threads, simulate_int8=quantizer.cfg.simulate_int8),
                      scorer, gates, truth=truth)
        steps.append(step_record(rec, excluded=len(excluded)))
        log(f"  {label or f'exclude {len(excluded):3d} node(s)'}: {summary(rec)}")
        return rec

    t0 = time.perf_counter()
    rec = attempt([])
    result = {"method": "auto", "choose_images": int(len(holdout)), "steps": steps, "ranking": [],
              "excluded_nodes": [], "passed": rec["passed"]}
    if rec["passed"]:
        os.replace(trial, dst)
        log(f"  all-INT8 passes the gates ({time.perf_counter() - t0:.1f}s)")
        return {**result, "check": rec}
    if ranking is None:
        log(f"  all-INT8 fails the gates: measuring each node's quantization error alone on {sensitivity_images} "
            "held-out image(s) ...")
        ranking = node_sensitivity(quantizer, holdout[:sensitivity_images], workdir, threads, log)
    result["ranking"] = ranking
    names = [r["node"] for r in ranking]
    if quantizer.cfg.excluded_weights == "int8":
        quantizer.weight_only_ok = {r["node"] for r in ranking
                                    if r.get("weight_only_error", np.inf) <= WEIGHT_ONLY_MAX_ERROR}
        log(f"  weight-only INT8 measured harmless (1-cos <= {WEIGHT_ONLY_MAX_ERROR:g}) for "
            f"{len(quantizer.weight_only_ok)} of {len(names)} node(s)")
    log("  worst nodes: " + ", ".join(f"{r['node']} (1-cos {r['error']:.2e})" for r in ranking[:5]))
    lo, k, best_k, best = 0, 1, None, None
    while names:
        k = min(k, len(names))
        rec = attempt(names[:k])
        if rec["passed"]:
            best_k, best = k, rec
            break
        lo = k
        if k == len(names):
            break
        k *= 2
    if best_k is None:
        log("  no mix passes the gates, even with every quantizable node in float")
        return {**result, "passed": False, "check": rec}
    hi = best_k  # bisect between the last failing and the first passing group size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rec = attempt(names[:mid])
        if rec["passed"]:
            hi, best = mid, rec
        else:
            lo = mid
    if quantizer.cfg.excluded_weights == "int8" and quantizer.weight_only_ok is not None:
        # compress further while the gates still pass: give weight-only INT8 to the kept-out nodes left in fp32,
        # least harmful first, keeping each only if the whole mix still passes on the held-out images
        extra = sorted((r for r in ranking if r["node"] in set(names[:hi]) and r["node"] not in quantizer.weight_only_ok
                        and r["node"] not in quantizer.cfg.float_weight_nodes and "weight_only_error" in r),
                       key=lambda r: r["weight_only_error"])
        for r in extra:
            quantizer.weight_only_ok.add(r["node"])
            rec = attempt(names[:hi], label=f"+ weight-only {r['node']}")
            if rec["passed"]:
                best = rec
            else:
                quantizer.weight_only_ok.discard(r["node"])
    if quantizer.weight_only_ok is not None:
        result["weight_only_nodes"] = sorted(quantizer.weight_only_nodes(names[:hi]))
    quantizer(dst, names[:hi])
    log(f"  chosen mix: {hi} of {len(names)} quantizable node(s) kept out of INT8 compute (weights "
        f"{quantizer.cfg.excluded_weights}; {time.perf_counter() - t0:.1f}s)")
    return {**result, "passed": True, "excluded_nodes": names[:hi], "check": best}


class PrecisionSearchFailed(GeosurgeError):
    def __init__(self, search: dict):
        self.search = search
        last = search["steps"][-1]
        super().__init__(f"precision search: no mix passes the parity gates (with every quantizable node in "
                         f"float: drift median {last['median_drift_km']:.1f} km, p95 {last['p95_drift_km']:.1f} km, "
                         f"cosine mean {last['cosine_mean']:.4f}); not exported — use fp32/fp16, another "
                         "calibration set or method")
