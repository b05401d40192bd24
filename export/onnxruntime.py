"""Export target ``onnxruntime``: ONNX for onnxruntime (the CPU path) at fp32, fp16, int8 (static QDQ) or
int8-dynamic, optionally through quantization-aware distillation (``--qat``) and the measured precision search.

INT8 that pays (static int8; ``--qat`` and / or ``--precision-search auto``), in this order, each step measured on the
*choose* images (never calibrated on, never used for the final check) against the FP32 model:

1. all-INT8 PTQ (onnxruntime static QDQ, U8 activations / S8 per-channel weights after ``quant_pre_process``);
2. if it fails the gates and ``--qat``: quantization-aware distillation of the FP32 model
   (:mod:`.precision.qat`), its tuned FP32 weights exported and quantized by the same PTQ — all-INT8 again; the
   graph (plain or QAT) closer to FP32 on a majority of the task figures is the base from here; nodes kept out of
   INT8 by ``--exclude-nodes`` stay float in QAT's student too (QAT for that mix);
3. if it still fails and ``--precision-search auto``: nodes kept out of INT8, worst first, until a mix passes
   (:mod:`.precision.search`), always in the *original* weights (QAT's are tuned for INT8 in every node: kept
   float they move away from FP32); a mix whose kept-out nodes hold weight-only INT8 is timed against the same mix with
   float weights (a DequantizeLinear per run can cost more than it saves);
4. speed is a gate: every candidate is timed against FP32 on this machine (interleaved, paced like a camera), and
   an int8 / int8-dynamic model that is not faster than FP32 by more than ``min_speedup`` is not recommended — the
   bundle is written for inspection, the manifest's ``quantization.decision`` says FP32 won and why, and
   ``geosurge export`` exits 1.

The decision (``quantization.decision``) names which candidate won on speed, which on parity, and the one chosen.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Precision, Target
from geosurge.manifest import MODEL_FILES, QuantizationSection
from geosurge.parity import compare, tightened
from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner, int8_saturates
from geosurge.timing import interleaved

from .onnx import INPUT_NAME, export_onnx, onnx_sections, onnx_versions
from .precision import PrecisionSearchFailed, QuantConfig, Quantizer, convert_fp16, run_embeddings, search_precision
from .precision.graph import check_node_names
from .precision.ort_static import prepare
from .precision.search import step_record, summary
from .target import ExportJob, ExportTarget, TargetOutput

#: the pause before each timed call (ms): a camera at 10 fps; idle thread pools have stopped spinning by then
PACE_MS = 100.0
LATENCY_ITERS = 20
ALL_INT8 = "all-INT8 PTQ"


def base_labels(cfg: QuantConfig) -> tuple[str, str]:
    """The names of the PTQ and QAT graphs every INT8 export starts from: "all-INT8 PTQ" / "all-INT8 QAT", or
    with ``--exclude-nodes`` "PTQ, N node(s) kept float" / "QAT, N node(s) kept float" (what the decision prints),
    the PTQ one with ", weight-only INT8 weights" when those nodes get them (``--exclude-nodes-weights int8``);
    a QAT checkpoint's graph is "all-INT8 QAT checkpoint" / "QAT checkpoint, N node(s) kept float"."""
    n = len(cfg.nodes_to_exclude)
    if cfg.from_qat_checkpoint:
        return ("all-INT8 QAT checkpoint", "all-INT8 QAT") if not n else \
            (f"QAT checkpoint, {n} node(s) kept float", f"QAT, {n} node(s) kept float")
    if not n:
        return ALL_INT8, "all-INT8 QAT"
    weight_only = (cfg.exclude_nodes_weights == "int8" and not cfg.qat
                   and not set(cfg.nodes_to_exclude) <= set(cfg.float_weight_nodes))
    return (f"PTQ, {n} node(s) kept float" + (", weight-only INT8 weights" if weight_only else ""),
            f"QAT, {n} node(s) kept float")


#: ``latency(paths, input_hw, threads) -> {name: {"p50_ms", "p95_ms"}}``: how candidates are timed (tests inject one)
LatencyProbe = Callable[[dict[str, Path], list[int], int | None], dict[str, dict]]


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
                                 threads=o.threads, choose=job.choose, model=model, input_hw=facts["input_hw"],
                                 export_kwargs={"opset": o.opset, "dynamic_batch": o.dynamic_batch,
                                                "with_logits": o.with_logits},
                                 latency=job.latency, reference_model=job.reference, log=log)
        section, io = onnx_sections(model, facts, o.spec, o.precision)
        return TargetOutput(name, section, io, QuantizationSection.from_dict(record, "quantization"),
                            onnx_versions())


def measure_latency(paths: dict[str, Path], input_hw: list[int], threads: int | None, iters: int = LATENCY_ITERS,
                    pause_ms: float = PACE_MS) -> dict[str, dict]:
    """p50 / p95 ms of each ONNX file on onnxruntime CPU, batch 1, a zero image: interleaved call by call (every
    model sees the same machine state) and paced (``pause_ms`` before each call)."""
    feed = {INPUT_NAME: np.zeros((1, 3, *input_hw), np.float32)}
    runners = {k: OnnxRuntimeRunner(p, threads) for k, p in paths.items()}
    try:
        t = interleaved({k: (lambda r=r: r.infer(feed)) for k, r in runners.items()}, iters, warmup=3,
                        pause_ms=pause_ms)
    finally:
        for r in runners.values():
            r.close()
    return {k: {"p50_ms": round(float(np.median(v)), 3), "p95_ms": round(float(np.percentile(v, 95)), 3)}
            for k, v in t.items()}


def latency_vs_fp32(fp32: Path, deployed: Path, input_hw: list[int], threads: int | None,
                    latency: LatencyProbe | None = None) -> dict:
    """The deployed model's p50 against FP32's on this machine (onnxruntime CPU, batch 1, interleaved, paced)."""
    t = (latency or measure_latency)({"fp32": fp32, "deployed": deployed}, input_hw, threads)
    pa, pb = t["fp32"]["p50_ms"], t["deployed"]["p50_ms"]
    return {"fp32_p50_ms": pa, "p50_ms": pb, "p95_ms": t["deployed"].get("p95_ms"), "speedup": round(pa / pb, 3),
            "threads": threads, "note": f"onnxruntime CPU, batch 1, interleaved, paced {PACE_MS:g} ms; a zero image"}


class Candidates:
    """The INT8 models tried on the way (all-INT8 PTQ, QAT all-INT8, the search's mix, ...): their files, their
    parity on the choose images and, at the end, their latency against FP32 — the decision's evidence."""

    def __init__(self, workdir: Path, fp32: Path, reference: np.ndarray | None, inputs: np.ndarray | None, truth,
                 scorer, gates, threads, log, simulate_int8: bool = False):
        self.dir = workdir / "candidates"
        self.dir.mkdir(exist_ok=True)
        self.fp32, self.reference, self.inputs, self.truth = fp32, reference, inputs, truth
        self.scorer, self.gates, self.threads, self.log = scorer, gates, threads, log
        #: parity measured as simulated INT8 (QuantConfig.simulate_int8); latency always on this CPU's kernels
        self.simulate_int8 = simulate_int8
        self.rows: dict[str, dict] = {}
        self.files: dict[str, Path] = {}

    def add(self, name: str, path: Path, parity: dict | None = None) -> dict | None:
        """Keep a copy of ``path`` as candidate ``name``; measure its parity on the choose images unless given."""
        self.files[name] = self.dir / f"{len(self.files)}.onnx"
        shutil.copyfile(path, self.files[name])
        if parity is None and self.inputs is not None:
            dep = run_embeddings(path, self.inputs, self.threads, simulate_int8=self.simulate_int8)
            parity = compare(self.reference, dep, self.scorer, self.gates, truth=self.truth)
            self.log(f"  {name}: {summary(parity)}")
        self.rows[name] = {"candidate": name, **(step_record(parity) if parity is not None else {})}
        return parity

    def time(self, input_hw, latency: LatencyProbe | None) -> dict:
        t = (latency or measure_latency)({"fp32": self.fp32, **self.files}, input_hw, self.threads)
        base = t["fp32"]["p50_ms"]
        for name, row in self.rows.items():
            row.update(t[name], speedup=round(base / t[name]["p50_ms"], 3))
        return t["fp32"]


#: what ``decision.passed`` says (beside ``check.passed``, the held-out verdict, in the same manifest)
DECISION_PASSED_MEANS = ("a candidate passed the gates on the choose images (or was left to the held-out check) and "
                         "the speed gate; the held-out verdict is quantization.check.passed")


def decide(rows: list[dict], fp32: dict, precision: str, min_speedup: float, gated: bool) -> dict:
    """Which candidate won on speed, which on parity, and the one recommended: the fastest candidate that passes
    parity and beats FP32 by more than ``min_speedup`` (when ``gated``). ``rows``: candidates with ``passed``
    (parity; None when not measured here) and ``speedup``."""
    timed = [r for r in rows if "speedup" in r]
    fastest = max(timed, key=lambda r: r["speedup"]) if timed else None
    passing = [r for r in timed if r.get("passed") is not False]
    on_speed = (f"{fastest['candidate']} x{fastest['speedup']:.2f} FP32" + ("" if fastest.get("passed") is not False
                                                                           else " (fails parity)")) if fastest else "-"
    measured = [r for r in rows if r.get("passed") is not None]
    best_parity = measured[0] if measured else None
    for r in measured[1:]:
        if closer_to_fp32(r, best_parity):
            best_parity = r
    on_parity = ("the held-out check below (nothing to choose between)" if best_parity is None
                 else best_parity["candidate"]
                 + ("" if best_parity["passed"] else " (the closest; none passes the gates)"))
    fast_enough = [r for r in passing if not gated or r["speedup"] > min_speedup]
    if fast_enough:
        win = max(fast_enough, key=lambda r: r["speedup"])
        why = (f"{win['candidate']} " + ("passes parity on the choose images" if win.get("passed") else
                                          "(parity: the held-out check)")
               + f" and runs x{win['speedup']:.2f} FP32 (p50 {win['p50_ms']:.2f} vs {fp32['p50_ms']:.2f} ms)"
               + (f", above the x{min_speedup:g} speed gate" if gated else " (speed not gated)"))
        return {"winner": win["candidate"], "precision": precision, "passed": True,
                "passed_means": DECISION_PASSED_MEANS, "on_speed": on_speed,
                "on_parity": on_parity, "why": why, "min_speedup": min_speedup, "fp32": fp32, "candidates": rows}
    if passing:
        best = max(passing, key=lambda r: r["speedup"])
        passes = ("that passes parity on the choose images" if best.get("passed") else
                  "(its parity is measured by the held-out check)")
        why = (f"FP32: the fastest {precision} model {passes} ({best['candidate']}) runs "
               f"x{best['speedup']:.2f} FP32 on this machine, not above the x{min_speedup:g} speed gate — use "
               "--precision fp32 (or another machine / backend; --min-speedup 0 turns the gate off)")
    else:
        why = f"FP32: no {precision} candidate passes the parity gates"
    return {"winner": "fp32", "precision": precision, "passed": False, "passed_means": DECISION_PASSED_MEANS,
            "on_speed": on_speed, "on_parity": on_parity,
            "why": why, "min_speedup": min_speedup, "fp32": fp32, "candidates": rows}


def apply_precision(fp32: Path, dst: Path, cfg: QuantConfig, workdir: Path, calibration=None, scorer=None,
                    gates: dict | None = None, threads: int | None = 2, choose=None, model=None,
                    input_hw: list[int] | None = None, export_kwargs: dict | None = None,
                    latency: LatencyProbe | None = None, reference_model=None, log=print) -> dict:
    """FP32 ONNX -> ``dst`` at ``cfg.precision`` on onnxruntime. ``calibration``: the CalibrationSet to calibrate
    (and train QAT) on (int8); ``choose``: the CalibrationSet the search and the QAT-vs-PTQ comparison measure on
    (its ``truth`` adds the accuracy gates); ``model``: the FP32 torch model (QAT's teacher); ``latency``: how
    candidates are timed (default :func:`measure_latency`); ``reference_model``: the FP32 torch model the choose
    images' reference embeddings come from (default: the FP32 graph of ``fp32`` itself). Returns the manifest's
    ``quantization`` record, with ``decision`` for int8 / int8-dynamic (the held-out check is added by the bundle
    writer, for every target alike). Raises PrecisionSearchFailed when no mix passes the gates."""
    t0 = time.perf_counter()
    record: dict = {"precision": cfg.precision, "config": cfg.record()}
    input_hw = input_hw or [224, 224]
    if cfg.precision == Precision.FP32:
        os.replace(fp32, dst)
        return record
    if cfg.precision == Precision.FP16:
        record.update(convert_fp16(fp32, dst))
        record["latency_vs_fp32"] = lat = latency_vs_fp32(fp32, dst, input_hw, threads, latency)
        log(f"fp16 model {dst.stat().st_size / 1e6:.1f} MB; onnxruntime CPU, batch 1, {threads} threads: fp32 p50 "
            f"{lat['fp32_p50_ms']:.1f} ms, fp16 p50 {lat['p50_ms']:.1f} ms (x{lat['speedup']:.2f}; FP16 is for GPUs, "
            "not gated on a CPU)")
        record["seconds"] = round(time.perf_counter() - t0, 1)
        return record
    static = cfg.precision == Precision.INT8
    # static QDQ wants onnxruntime's pre-processing (fusions, shapes); dynamic runs on the unfused export
    prepared = prepare(fp32, workdir / "prepared.onnx") if static else fp32
    if static and calibration is None:
        raise GeosurgeError("--precision int8 needs a calibration set (--calib DIR|MANIFEST)")
    # (the dynamic quantizer renames a Gemm "<name>_MatMul": such exclusions name a node of the export too)
    check_node_names(prepared, [n[:-len("_MatMul")] if not static and n.endswith("_MatMul") else n
                                for n in cfg.nodes_to_exclude])
    calib = calibration if static else None  # a CalibrationSet: uint8 pixels, preprocessed per batch
    if static and not (cfg.reduce_range or cfg.simulate_int8) and int8_saturates():
        log("note: this CPU (x86 without VNNI) sums u8 x s8 pairs in int16 with saturation, and every INT8 figure "
            "below is measured on it; to deploy on CPUs like it add --reduce-range (7-bit weights), for a device that "
            "accumulates exactly (ARM, VNNI / AMX, TensorRT) add --simulate-int8")
    # with --qat the kept-out nodes deploy with the float weights the student trains; the PTQ graph QAT is compared
    # with keeps them float too (not weight-only INT8), so the two differ only in what QAT changed
    ptq_cfg = (replace(cfg, float_weight_nodes=sorted(set(cfg.float_weight_nodes) | set(cfg.nodes_to_exclude)))
               if cfg.qat and cfg.nodes_to_exclude else cfg)
    quantizer = Quantizer(prepared, ptq_cfg, calib, workdir / "calibration-ranges.json", log=log)
    inputs = choose.inputs if choose is not None else None
    truth = choose.truth if choose is not None else None
    if cfg.chooses and (scorer is None or inputs is None):
        raise GeosurgeError("the precision search / QAT needs the bundle's cell scorer and choose images")
    if inputs is None:
        reference = None
    elif reference_model is not None:  # e.g. a QAT checkpoint's teacher: what its INT8 graph must match
        from .compare import torch_embed

        reference = torch_embed(reference_model, inputs)
    else:
        reference = run_embeddings(prepared, inputs, threads)
    # choices are made with half of each gate's slack, so the mix still passes on the check images
    choose_gates = tightened(gates)
    cands = Candidates(workdir, fp32, reference, inputs, truth, scorer, choose_gates, threads, log,
                       simulate_int8=cfg.simulate_int8)
    if cfg.chooses:
        log(f"choosing the INT8 model on {len(inputs)} image(s) never calibrated on, under the gates with half their "
            "slack" + (" (with ground truth: accuracy deltas gated)" if truth is not None else "")
            + (f", calibrating on {len(calib)}" if calib is not None else "")
            + (", as simulated INT8 (exact accumulation)" if cfg.simulate_int8 else ""))
    trial = workdir / "all-int8.onnx"
    facts = quantizer(trial)
    ptq_label, qat_label = base_labels(cfg)
    ptq = cands.add(ptq_label if static else "all-INT8 dynamic", trial)
    ptq_quantizer = quantizer
    if cfg.qat and not ptq["passed"]:
        quantizer, qat_facts = _qat(model, cfg, calibration, quantizer, cands, workdir, export_kwargs or {},
                                    calib, log)
        # what QAT was compared with: its kept-out nodes' weights in the PTQ graph (0 weight-only: float, as QAT's)
        record["qat"] = {**qat_facts, "ptq_weight_only_int8": int(facts.get("weight_only_int8", 0))}
    base_rec = next(iter(cands.rows.values())) if not record.get("qat") else \
        cands.rows[qat_label if record["qat"]["base"] == "qat" else ptq_label]
    if cfg.search == "auto" and not base_rec.get("passed"):
        log("precision search: keeping the worst nodes out of INT8 until a mix passes ...")
        if quantizer is not ptq_quantizer:
            # QAT tuned every weight for INT8 everywhere: kept float, its nodes move *away* from FP32 (measured
            # on the reference model: all-INT8 QAT cosine 0.988 on the choose images; its worst node float 0.830;
            # every node float 0.939), so nodes are kept float in the original FP32 weights
            log("  on the original weights: QAT's are tuned for INT8 in every node, and kept float they move away "
                "from FP32 (to train for a mix, give its nodes with --exclude-nodes to --qat)")
            record["qat"]["search_base"] = "ptq"
            quantizer = ptq_quantizer
        search = search_precision(quantizer, dst, inputs, scorer, workdir, choose_gates, threads, log=log,
                                  reference=reference, truth=truth)
        if not search["passed"] and cfg.excluded_weights == "int8" and search["ranking"]:
            log("no mix passes with weight-only INT8 outside the INT8 compute: retrying with float weights")
            cfg2 = QuantConfig(**{**cfg.to_dict(), "excluded_weights": "fp32"})
            record["config"] = cfg2.record()
            quantizer = quantizer.with_config(cfg2)
            search = search_precision(quantizer, dst, inputs, scorer, workdir, choose_gates, threads,
                                      ranking=search["ranking"], log=log, reference=reference, truth=truth)
        chk = search.pop("check", None)
        search["gates"] = {k: list(v) for k, v in choose_gates.items()}
        record["search"] = search
        if not search["passed"]:
            raise PrecisionSearchFailed(search)
        facts = quantizer.last_facts  # the last quantization written was the chosen mix
        label = f"search mix ({len(search['excluded_nodes'])} node(s) float)"
        cands.add(label, dst, chk)
        if search.get("weight_only_nodes"):  # weight-only INT8 costs a DequantizeLinear per run: time float too
            floatw = quantizer.with_config(QuantConfig(**{**quantizer.cfg.to_dict(), "excluded_weights": "fp32"}))
            alt = workdir / "mix-float-weights.onnx"
            alt_facts = floatw(alt, search["excluded_nodes"])
            cands.add(f"search mix ({len(search['excluded_nodes'])} node(s) float, float weights)", alt)
    else:
        base = cands.files[base_rec["candidate"]]
        shutil.copyfile(base, dst)
        if base_rec["candidate"] == qat_label:
            facts = record["qat"]["facts"]
    record.update(facts)
    fp32_lat = cands.time(input_hw, latency)
    rows = list(cands.rows.values())
    decision = decide(rows, fp32_lat, cfg.precision, cfg.min_speedup, cfg.speed_gated)
    chosen = decision["winner"] if decision["passed"] else _chosen_file(cands, dst)
    if chosen in cands.files and cands.files[chosen] != dst:
        shutil.copyfile(cands.files[chosen], dst)
        if "float weights" in chosen:
            record.update(alt_facts, weight_only_int8=0)
            record["search"]["weight_only_nodes"] = []
            record["config"] = floatw.cfg.record()
    decision["shipped"] = chosen
    if cfg.simulate_int8 and not decision["passed"] and "speed gate" in decision["why"]:
        decision["why"] += ("; the speed gate timed this machine's INT8 kernels, not the device's that "
                            "--simulate-int8 judges parity for: for an export to that device, --min-speedup 0")
    record["decision"] = decision
    row = cands.rows[chosen]
    record["latency_vs_fp32"] = {"fp32_p50_ms": fp32_lat["p50_ms"], "p50_ms": row["p50_ms"],
                                 "p95_ms": row.get("p95_ms"), "speedup": row["speedup"], "threads": threads,
                                 "note": f"onnxruntime CPU, batch 1, interleaved, paced {PACE_MS:g} ms; a zero image"}
    _log_decision(decision, threads, log)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _chosen_file(cands: Candidates, dst: Path) -> str:
    """The candidate whose file is ``dst`` (the one written when no candidate is recommended)."""
    data = dst.read_bytes()
    return next((n for n, p in cands.files.items() if p.read_bytes() == data), next(iter(cands.files)))


def _qat(model, cfg: QuantConfig, calibration, quantizer: Quantizer, cands: Candidates, workdir: Path,
         export_kwargs: dict, calib, log):
    """QAT of ``model`` on the calibration images, its tuned FP32 weights exported, prepared and quantized all-INT8;
    returns (the quantizer of the graph closer to FP32 (:func:`closer_to_fp32`), the manifest's ``qat`` record)."""
    from .precision.qat import QATConfig, compute_modules, modules_of_onnx_nodes, qat_distill

    if model is None:
        raise GeosurgeError("--qat needs the FP32 torch model")
    log(f"{base_labels(cfg)[0]} fails the gates: quantization-aware distillation on the {len(calibration)} "
        "calibration image(s) ...")
    # nodes kept out of INT8 (--exclude-nodes) stay float in the student too; a node with no Conv / Linear of its
    # own (an activation MatMul) has nothing QAT quantizes
    exclude = sorted({m for m in modules_of_onnx_nodes(cfg.nodes_to_exclude, compute_modules(model)).values() if m})
    init = None
    if cfg.qat_init:
        from .source import load_model

        init, _ = load_model(checkpoint=cfg.qat_init)
        log(f"QAT: the student starts from {cfg.qat_init} (the teacher is the exported model)")
    tuned, rec = qat_distill(model, calibration, QATConfig(steps=cfg.qat_steps, lr=cfg.qat_lr,
                                                                  rank_weight=cfg.qat_rank_weight,
                                                                  weight_bits=7 if cfg.reduce_range else 8,
                                                                  seed=cfg.seed, exclude=exclude), log=log,
                             init=init)
    if cfg.qat_init:
        rec["init"] = str(cfg.qat_init)
    if cfg.qat_save:
        # the nodes it trained float go with the weights: an export of the checkpoint keeps them float (float weights)
        saved = tuned.save_pretrained(cfg.qat_save, extra={"qat": {
            **{k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool))},
            "kept_float_nodes": list(cfg.nodes_to_exclude), "teacher_checkpoint": cfg.qat_teacher}})
        rec["saved"] = str(saved)
        log(f"QAT: tuned FP32 weights saved as a checkpoint in {saved} (export it with --precision int8"
            f"{' --reduce-range' if cfg.reduce_range else ''} for this QAT graph without training again"
            + (f"; its {len(cfg.nodes_to_exclude)} node(s) kept float come with it" if cfg.nodes_to_exclude else "")
            + ")")
    qfp32 = workdir / "qat-fp32.onnx"
    export_onnx(tuned, qfp32, log=lambda m: None, **export_kwargs)
    qprep = prepare(qfp32, workdir / "qat-prepared.onnx")
    # the kept-out nodes keep the float weights the student trained (QuantConfig.float_weight_nodes); no bias
    # correction: the student trained under the rounded weights, its biases already absorbed their mean error
    qcfg = replace(cfg, float_weight_nodes=list(cfg.nodes_to_exclude), bias_correction=False,
                   bias_correction_off="a QAT graph (its student trained under the rounded weights)")
    qq = Quantizer(qprep, qcfg, calib, workdir / "qat-calibration-ranges.json", log=log)
    trial = workdir / "qat-all-int8.onnx"
    rec["facts"] = qq(trial)
    ptq_label, qat_label = base_labels(cfg)
    cands.add(qat_label, trial)
    ptq_row, qat_row = cands.rows[ptq_label], cands.rows[qat_label]
    better = closer_to_fp32(qat_row, ptq_row)
    rec["base"] = "qat" if better else "ptq"
    rec["ptq"] = {k: v for k, v in ptq_row.items() if k != "candidate"}
    rec["qat"] = {k: v for k, v in qat_row.items() if k != "candidate"}
    log(f"QAT {'improves' if better else 'does not improve'} on plain PTQ on the choose images: p95 drift "
        f"{ptq_row['p95_drift_km']:.1f} -> {qat_row['p95_drift_km']:.1f} km, cosine {ptq_row['cosine_mean']:.4f} -> "
        f"{qat_row['cosine_mean']:.4f}; continuing from the {'QAT' if better else 'PTQ'} graph")
    return (qq if better else quantizer), rec


#: the task-level figures two INT8 graphs are compared on (lower / higher is closer to FP32)
CLOSER_LOWER = ("median_drift_km", "p95_drift_km")
CLOSER_HIGHER = ("top1_agreement_confident", "accuracy_delta_min_pts", "cosine_mean")


def closer_to_fp32(a: dict, b: dict) -> bool:
    """Whether candidate row ``a`` is closer to FP32 than ``b`` (both measured on the same choose images): one that
    passes the gates beats one that fails; otherwise ``a`` must be better on more of the task figures
    (:data:`CLOSER_LOWER`, :data:`CLOSER_HIGHER`, those both rows have) than it is worse — a tie keeps ``b``. A
    majority, not one figure first: with a badly quantized model the p95 drift saturates near half the Earth's
    circumference for both graphs (measured on the reference model: all-INT8 PTQ 14,942 km, QAT 15,132 km) while
    the median drift, the agreement and the accuracy deltas still rank them (1,279 vs 619 km; 0.19 vs 0.32;
    -18.8 vs -10.9 points)."""
    if bool(a.get("passed")) != bool(b.get("passed")):
        return bool(a.get("passed"))
    score = 0
    for keys, sign in ((CLOSER_LOWER, -1), (CLOSER_HIGHER, 1)):
        for k in keys:
            if a.get(k) is not None and b.get(k) is not None and a[k] != b[k]:
                score += sign if a[k] > b[k] else -sign
    return score > 0


def _log_decision(d: dict, threads, log) -> None:
    log(f"decision ({threads} threads, onnxruntime CPU, paced): won on speed: {d['on_speed']}; on parity: "
        f"{d['on_parity']}; -> {d['why']}")
    for r in d["candidates"]:
        par = "PASS" if r.get("passed") else ("FAIL" if r.get("passed") is False else "in the held-out check")
        log(f"    {r['candidate']:<48s} p50 {r.get('p50_ms', float('nan')):7.2f} ms  x{r.get('speedup', 0):.2f}  "
            f"parity {par}")
