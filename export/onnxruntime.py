"""Export target ``onnxruntime``: ONNX for onnxruntime (the CPU path) at fp32, fp16, int8 (static QDQ) or
int8-dynamic, optionally through the measured precision search; a non-FP32 model also records its latency against
the FP32 graph on this CPU (an INT8 model slower than FP32 on its target is a failed export, TOOLCHAIN.md)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Precision, Target
from geosurge.manifest import MODEL_FILES, QuantizationSection
from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner
from geosurge.timing import interleaved

from .onnx import INPUT_NAME, export_onnx, onnx_sections, onnx_versions
from .precision import PrecisionSearchFailed, QuantConfig, Quantizer, convert_fp16, search_precision
from .precision.ort_static import prepare
from .target import ExportJob, ExportTarget, TargetOutput


class OnnxRuntimeTarget(ExportTarget):
    target = Target.ONNXRUNTIME

    def export(self, model, job: ExportJob) -> TargetOutput:
        o, log = job.options, job.log
        fp32 = job.workdir / "model-fp32.onnx"
        facts = export_onnx(model, fp32, opset=o.opset, dynamic_batch=o.dynamic_batch, with_logits=o.with_logits,
                            log=log)
        name = MODEL_FILES[o.spec.format]
        dst = job.stage / name
        record = apply_precision(fp32, dst, o.quant, job.workdir, job.calibration, job.scorer, job.gates,
                                 threads=o.threads, check_inputs=job.check_inputs, log=log)
        if o.precision != Precision.FP32:
            record["latency_vs_fp32"] = lat = latency_vs_fp32(fp32, dst, facts["input_hw"], o.threads)
            log(f"onnxruntime CPU, batch 1, {o.threads} threads: fp32 p50 {lat['fp32_p50_ms']:.1f} ms, "
                f"{o.precision} p50 {lat['p50_ms']:.1f} ms (x{lat['speedup']:.2f})"
                + ("  -- NOT faster than FP32 on this CPU" if lat["speedup"] < 1.0 else ""))
        section, io = onnx_sections(model, facts, o.spec, o.precision)
        return TargetOutput(name, section, io, QuantizationSection.from_dict(record, "quantization"),
                            onnx_versions())


def apply_precision(fp32: Path, dst: Path, cfg: QuantConfig, workdir: Path, calibration=None, scorer=None,
                    gates: dict | None = None, threads: int | None = 2, check_inputs: np.ndarray | None = None,
                    log=print) -> dict:
    """FP32 ONNX -> ``dst`` at ``cfg.precision`` on onnxruntime. ``calibration``: the CalibrationSet to calibrate
    on (int8); ``check_inputs``: held-out images (N, 3, S, S) for the precision search. Returns the manifest's
    ``quantization`` record (the held-out parity check is added by the bundle writer, for every target alike).
    Raises PrecisionSearchFailed when no mix passes the gates."""
    t0 = time.perf_counter()
    record: dict = {"precision": cfg.precision, "config": cfg.to_dict()}
    if cfg.precision == Precision.FP32:
        os.replace(fp32, dst)
        return record
    if cfg.precision == Precision.FP16:
        record.update(convert_fp16(fp32, dst))
    else:
        # static QDQ wants onnxruntime's pre-processing (fusions, shapes); dynamic runs on the unfused export
        static = cfg.precision == Precision.INT8
        prepared = prepare(fp32, workdir / "prepared.onnx") if static else fp32
        if static and calibration is None:
            raise GeosurgeError("--precision int8 needs a calibration set (--calib DIR|MANIFEST)")
        calib = calibration.inputs if static else None
        quantizer = Quantizer(prepared, cfg, calib, workdir / "calibration-ranges.json")
        if cfg.search == "auto":
            if scorer is None or check_inputs is None:
                raise GeosurgeError("the precision search needs the bundle's cell scorer and held-out images")
            log(f"precision search on {len(check_inputs)} held-out image(s)"
                + (f", calibrating on {len(calib)}" if calib is not None else "") + " ...")
            search = search_precision(quantizer, dst, check_inputs, scorer, workdir, gates, threads, log=log)
            if not search["passed"] and cfg.excluded_weights == "int8" and search["ranking"]:
                log("no mix passes with weight-only INT8 outside the INT8 compute: retrying with float weights")
                cfg = QuantConfig(**{**cfg.to_dict(), "excluded_weights": "fp32"})
                record["config"] = cfg.to_dict()
                quantizer = Quantizer(prepared, cfg, calib, workdir / "calibration-ranges.json")
                search = search_precision(quantizer, dst, check_inputs, scorer, workdir, gates, threads,
                                          ranking=search["ranking"], log=log)
            search.pop("check", None)  # the writer's held-out check is the record
            record["search"] = search
            if not search["passed"]:
                raise PrecisionSearchFailed(search)
            record.update(quantizer.last_facts)  # the last quantization written was the chosen mix
        else:
            record.update(quantizer(dst))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def latency_vs_fp32(fp32: Path, deployed: Path, input_hw: list[int], threads: int | None, iters: int = 20) -> dict:
    """p50 of the FP32 and the deployed ONNX on onnxruntime CPU, interleaved run by run (same machine state)."""
    feed = {INPUT_NAME: np.zeros((1, 3, *input_hw), np.float32)}
    with OnnxRuntimeRunner(fp32, threads) as a, OnnxRuntimeRunner(deployed, threads) as b:
        t = interleaved({"fp32": lambda: a.infer(feed), "deployed": lambda: b.infer(feed)}, iters, warmup=3)
    pa, pb = float(np.median(t["fp32"])), float(np.median(t["deployed"]))
    return {"fp32_p50_ms": round(pa, 2), "p50_ms": round(pb, 2), "speedup": round(pa / pb, 3), "threads": threads,
            "note": "onnxruntime CPU, batch 1, interleaved; a zero image"}
