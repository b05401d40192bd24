"""``geosurge benchmark``: bundles x every installed backend, with torch anchors, in one run (in the manner of
``yolo benchmark`` and OpenVINO's ``benchmark_app``).

The runtime timing is ``geosurge.runtime.benchmark`` (torch-free, shared with ``geosurge-run bench``); this module
adds what needs the workstation: the torch anchors (eager FP32 and ``torch.compile`` of each bundle's source model,
inference-only rows timed in the same interleaved loop), task-level parity against FP32 torch when ground truth is
given (``geosurge.parity.compare`` and ``geosurge.geo.metrics.summarize``), the report, its tables and the PNG.
torch is imported only for the anchors and the FP32 reference; without it those rows are skipped with the reason.
"""
from __future__ import annotations

import contextlib
import logging
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from geosurge.errors import GeosurgeError, InputFileError
from geosurge.report import format_table
from geosurge.runtime.benchmark import (CAMERA_PAUSE_MS, E2E, STAGES, Contender, DecodePools, bench_images,
                                        decode_preprocess, latency_rows, open_contenders, runtime_peak_rss,
                                        scenarios, throughput_table, time_scenarios)
from geosurge.runtime.verify import replay_golden

#: report format version (the JSON's ``schema``)
SCHEMA = "geosurge-benchmark/1"
ANCHORS = ("eager", "compile")
ANCHOR_NAMES = {"eager": "torch eager FP32", "compile": "torch.compile FP32"}
POOLS = ("serial", "threads", "processes")
#: the scenario the summary, the short form and the PNG read: the 12 MP JPEG at 10 fps
HEADLINE = ("12mp", "paced")
#: (iters, warmup, folder images, folder passes, RSS calls) of a full and of a --quick run
SETTINGS = {"full": (30, 3, 6, 2, 5), "quick": (5, 1, 2, 1, 2)}
#: An anchor ratio (``x_eager``, ``x_compile``) is flagged noisy when the anchor's inference p95 exceeds this many
#: times its p50 in the headline scenario. On this project's quiet 2-core run
#: (benchmarks/results/benchmark-edge-fp32-quiet.json, 30 runs a row) every row's p95/p50 was 1.14-1.45 and the
#: torch anchors' 1.14-1.27; a user's loaded runs, whose x_eager read 2.2, 88.8 and 22.5 within 10 minutes, had
#: torch eager at 1,525 / 2,522 ms (1.65). Beyond 1.5 the anchor's calls were being descheduled (OpenMP threads
#: waiting at a barrier for a sibling another process holds), and its p50 says more about the load than the model.
NOISY_ANCHOR_P95_P50 = 1.5
#: ... or when the per-round ratio (anchor ms / this ms, the two calls of one round being neighbours in time) has
#: p75 / p25 above this: the middle half of the rounds disagree by more than 1.5x on the speed-up, so a figure read
#: off another half of the same run could differ by 50 %.
NOISY_RATIO_P75_P25 = 1.5

Log = Callable[[str], None]


# ---- anchors ------------------------------------------------------------------------------------------------------
def _source_key(bundle) -> tuple:
    s = bundle.manifest.source
    return (s.checkpoint, s.config, s.seed, bundle.manifest.hierarchy.digest)


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's one-line note "No CUDA runtime is found, using CUDA_HOME=..." (logged by
    ``torch.utils.cpp_extension`` when inductor imports it on a machine with a CUDA toolkit but no GPU): the CPU
    anchor never uses CUDA, so the note is noise there. Only that message; the module's other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


@contextlib.contextmanager
def _quiet_cuda_home_note():
    log = logging.getLogger("torch.utils.cpp_extension")
    note = _NoCudaRuntimeNote()
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


def anchor_contenders(contenders: list[Contender], images: dict[str, bytes], which=ANCHORS,
                      threads: int | None = None, log: Log = print) -> tuple[list[Contender], list[dict], dict]:
    """Torch anchors for the source model of every bundle among ``contenders`` (one set per distinct source):
    ``eager`` (``model.embed`` in ``torch.inference_mode``) and ``compile`` (``torch.compile`` of it, compiled
    before timing). Their input is each timed image decoded and preprocessed per the bundle's spec, ahead of time:
    the rows are inference only. Returns (anchors, skipped rows, ``{bundle label: {anchor kind: (anchor's bundle
    label, anchor's backend name)}}``: the anchors each bundle is compared with)."""
    runtime = [c for c in contenders if c.kind == "runtime"]
    if not which or not runtime:
        return [], [], {}
    try:
        import torch
    except ImportError:
        return [], [{"bundle": "(anchors)", "backend": ANCHOR_NAMES[k], "reason": "torch is not installed"}
                    for k in which], {}
    from .source import load_source_model

    if threads:
        torch.set_num_threads(threads)
    anchors, skipped, by_bundle, built = [], [], {}, {}
    for c in runtime:
        bundle = c.localizer.bundle
        key = _source_key(bundle)
        if key not in built:
            built[key] = {}
            try:
                model = load_source_model(bundle).eval()
            except GeosurgeError as e:
                skipped += [{"bundle": c.bundle, "backend": ANCHOR_NAMES[k], "reason": str(e)} for k in which]
                continue
            spec = bundle.preprocess
            inputs = {data: torch.from_numpy(decode_preprocess(data, spec)[None]) for data in images.values()}
            for kind in which:
                fn = model.embed
                if kind == "compile":
                    log(f"  {c.bundle}: torch.compile of the source model (compiles on the first call) ...")
                    t0 = time.perf_counter()
                    try:
                        fn = torch.compile(model.embed)
                        with torch.inference_mode(), _quiet_cuda_home_note():  # compiles on this first call
                            for x in inputs.values():
                                fn(x)
                    except Exception as e:  # noqa: BLE001 - inductor raises many types (no compiler, unsupported op)
                        reason = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        skipped.append({"bundle": c.bundle, "backend": ANCHOR_NAMES[kind], "reason": reason})
                        log(f"  {c.bundle}: {reason}")
                        continue
                    log(f"    compiled in {time.perf_counter() - t0:.1f} s")

                def run(data, fn=fn, inputs=inputs):
                    with torch.inference_mode():
                        fn(inputs[data])

                a = Contender(c.bundle, ANCHOR_NAMES[kind], "anchor", run,
                              info={"precision": "fp32", "torch": torch.__version__,
                                    "threads": torch.get_num_threads()})
                anchors.append(a)
                built[key][kind] = (a.bundle, a.backend)
        by_bundle[c.bundle] = built[key]
    return anchors, skipped, by_bundle


def _reference_embed(bundle):
    """FP32 torch ``embed`` of the bundle's source model, or (None, reason)."""
    try:
        from .compare import torch_embed
        from .source import load_source_model
    except ImportError as e:
        return None, f"torch is not installed ({e})"
    try:
        model = load_source_model(bundle)
    except GeosurgeError as e:
        return None, str(e)
    return (lambda x: torch_embed(model, x)), None


# ---- parity -------------------------------------------------------------------------------------------------------
def recorded_parity(bundle) -> dict:
    """The parity the export recorded in the manifest (held-out images vs FP32 torch): ``{"status", "cosine_mean",
    ...}``; an FP32 bundle is its own reference."""
    from geosurge.runtime.verify import export_check

    m = bundle.manifest
    rec = export_check(m)  # the one reading of the record, shared with geosurge-run verify
    if rec["status"] == "none":
        return {"status": "reference" if m.model.precision.value == "fp32" else "not recorded"}
    if rec["status"] == "not measured":
        return {"status": "not measured", "reason": rec["reason"]}
    return {"status": rec["status"], "images": rec["images"], "runner": m.check.runner,
            **headline_metrics(m.check.metrics or {}, m.gates()), "failed_gates": rec["failed_gates"]}


def headline_metrics(metrics: dict, gates: dict | None = None) -> dict:
    """The parity figures a report shows: the task-level ones in km (``geosurge.parity.HEADLINE_METRICS``: drift
    median / p95, top-1 agreement where FP32 is confident, the worst accuracy delta when measured), the embedding
    cosine as a diagnostic, and whatever else ``gates`` names (an old bundle's cosine / per-level gates); None for
    a metric not measured."""
    from geosurge.parity import HEADLINE_METRICS

    names = list(dict.fromkeys([*HEADLINE_METRICS, *(gates or {})]))
    return {k: metrics.get(k) for k in names}


def task_parity(contenders: list[Contender], truth, log: Log = print) -> dict[str, dict]:
    """Task-level parity on a ground-truth manifest (CSV ``path,lat,lon``): every runtime contender locates each
    image; km to the truth summarised by ``geosurge.geo.metrics.summarize`` (acc@1/25/200/750/2500 km as fractions,
    median km, GeoScore), beside the FP32 torch model's own (same pixels, same table), and
    ``geosurge.parity.compare`` of the two embeddings with the truth under the bundle's gates (drift median / p95
    km, top-1 agreement where FP32 is confident, accuracy deltas in points — also as ``delta_accuracy_pts`` —,
    cosine as a diagnostic). Unreadable images are counted and named."""
    from geosurge.geo.metrics import haversine_km, summarize
    from geosurge.inputs import read_manifest
    from geosurge.parity import compare

    man = read_manifest(truth)
    refs: dict = {}
    out = {}
    for c in (c for c in contenders if c.kind == "runtime"):
        loc = c.localizer
        xs, keep, refused = [], [], []
        for i, p in enumerate(man.paths):
            try:
                xs.append(loc.preprocess(p))
                keep.append(i)
            except GeosurgeError as e:
                refused.append({"input": str(p), "error": str(e)})
        if not xs:
            out[c.name] = {"n": 0, "refused": refused, "error": "no readable image in the manifest"}
            continue
        x = np.stack(xs)
        lat, lon = man.lat[keep], man.lon[keep]
        dep = loc.embed(x)
        preds = [loc.predict_embedding(e, top_k=1) for e in dep]
        rep = {"n": len(keep), "refused": refused, "deployed": summarize(
            haversine_km(lat, lon, [p["lat"] for p in preds], [p["lon"] for p in preds]))}
        key = _source_key(loc.bundle)
        if key not in refs:
            refs[key] = _reference_embed(loc.bundle)
        embed, why = refs[key]
        if embed is None:
            rep["fp32"] = None
            rep["fp32_skipped"] = why
        else:
            ref = embed(x)
            rp = [loc.predict_embedding(e, top_k=1) for e in ref]
            rep["fp32"] = summarize(haversine_km(lat, lon, [p["lat"] for p in rp], [p["lon"] for p in rp]))
            # the bundle's gates (in km, with the accuracy deltas vs the truth) on these images
            cmp = compare(ref, dep, loc.scorer, loc.bundle.manifest.gates() or None, truth=(lat, lon))
            rep["delta_accuracy_pts"] = cmp["metrics"]["accuracy"]["delta_pts"]
            rep["parity"] = {"passed": cmp["passed"], "gates": cmp["gates"],
                             **{k: v for k, v in cmp["metrics"].items() if k != "levels"}}
        log(f"  {c.name}: {rep['n']} images with ground truth ({len(refused)} refused)")
        out[c.name] = rep
    return out


# ---- the run ------------------------------------------------------------------------------------------------------
def _machine() -> dict:
    import os

    import cv2
    import numpy

    versions = {"numpy": numpy.__version__, "opencv": cv2.__version__}
    for mod in ("onnxruntime", "openvino", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    # the 1 / 5 / 15-minute load average as the run ends (Unix): a load above the CPU count explains noisy ratios
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "loadavg": load, "python": platform.python_version(), "versions": versions}


def run_benchmark(bundles, *, images=None, truth=None, backends=None, threads: int | None = None,
                  iters: int | None = None, warmup: int | None = None, pause_ms: float = CAMERA_PAUSE_MS,
                  quick: bool = False, anchors=ANCHORS, workers: int = 2, pools=POOLS,
                  folder_size: int | None = None, passes: int | None = None, rss: bool = True,
                  cache_dir=None, accuracy_km: float = 25.0, log: Log = print) -> dict:
    """The whole benchmark; returns the report (see docs/benchmarks.md, "geosurge benchmark", for every field).
    Raises BundleError (naming the path) before timing anything when a bundle cannot be opened."""
    t_start = time.perf_counter()
    it, wu, fsize, npass, rss_calls = SETTINGS["quick" if quick else "full"]
    iters, warmup = iters or it, wu if warmup is None else warmup
    folder_size, passes = folder_size or fsize, passes or npass
    bundles = [bundles] if isinstance(bundles, (str, Path)) else list(bundles)
    if not bundles:
        raise GeosurgeError("benchmark: give at least one bundle")
    for what, got, known in (("anchor", anchors or (), ANCHOR_NAMES), ("decode pool", pools or (), POOLS)):
        bad = [x for x in got if x not in known]
        if bad:
            raise GeosurgeError(f"benchmark: unknown {what} {', '.join(map(repr, bad))}; choose from "
                                f"{', '.join(known)}")
    if truth is not None and not Path(truth).is_file():
        raise InputFileError(f"{truth}: ground-truth manifest not found")
    log(f"benchmark: {len(bundles)} bundle(s); opening every backend that reads each format")
    contenders, skipped, opened = open_contenders(bundles, backends, threads, log)
    runtime = list(contenders)
    try:
        imgs = bench_images(folder_size, images, opened[0], cache_dir, log=log)
        timed = {name: p.read_bytes() for name, p in imgs.timed().items()}
        log(f"images: 12 MP JPEG {imgs.info['12mp']['path']} ({imgs.info['12mp']['mb']:.1f} MB), small photo "
            f"{imgs.info['small']['size'][0]}x{imgs.info['small']['size'][1]}, folder of {len(imgs.folder)}")
        anchor_list, anchor_skipped, anchor_of = anchor_contenders(runtime, timed, anchors, threads, log)
        skipped += anchor_skipped
        contenders = runtime + anchor_list
        if not contenders:
            raise GeosurgeError("benchmark: no bundle could run on this machine: "
                                + "; ".join(f"{s['bundle']} ({s['backend']}): {s['reason']}" for s in skipped))
        log(f"latency: {len(contenders)} contender(s) interleaved call by call, {iters} runs (+{warmup} warm-up)")
        run = time_scenarios(contenders, scenarios(timed, pause_ms), iters, warmup, log)
        rows = latency_rows(run, contenders)
        throughput = {}
        if runtime and pools:
            log(f"throughput: folder of {len(imgs.folder)} image(s), decode on {', '.join(pools)} "
                f"({workers} workers), {passes} pass(es)")
            with DecodePools(workers, pools) as dp:
                throughput = throughput_table(runtime, imgs.folder, dp, passes, log)
        parity = {}
        for c in runtime:
            g = replay_golden(c.localizer)
            parity[c.name] = {"recorded": recorded_parity(c.localizer.bundle),
                              "golden": {"passed": g["passed"], "images": g["metrics"]["n"],
                                         **headline_metrics(g["metrics"], c.localizer.bundle.manifest.gates())}}
        task = task_parity(runtime, truth, log) if truth else {}
        memory = {}
        if rss:
            for c in runtime:
                log(f"  peak RSS: {c.name} in a fresh runtime process ...")
                memory[c.name] = runtime_peak_rss(c.info["bundle_path"], c.backend, c.info["threads"],
                                                  [imgs.phone, imgs.small], rss_calls)
    finally:
        for c in contenders:
            c.close()
    report = {
        "schema": SCHEMA, "machine": _machine(),
        "settings": {"threads": threads, "iters": iters, "warmup": warmup, "pause_ms": pause_ms, "quick": quick,
                     "workers": workers, "pools": list(pools), "passes": passes, "anchors": list(anchors or ()),
                     "truth": str(truth) if truth else None, "accuracy_km": accuracy_km},
        "images": imgs.info,
        "contenders": [{"name": c.name, "bundle": c.bundle, "backend": c.backend, "kind": c.kind, **c.info}
                       for c in contenders],
        "skipped": skipped,
        "latency": rows,
        "summary": summary_rows(contenders, rows, throughput, memory, parity, task, anchor_of, accuracy_km,
                                run.samples),
        "throughput": throughput, "memory": memory, "parity": parity, "task": task,
        "call_order": [list(o) for o in run.order],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return report


def ratio_spread(anchor_ms, this_ms) -> dict:
    """How far one anchor ratio can be trusted, from one run's samples (ms per timed call, round by round: the i-th
    anchor call and the i-th call of this contender ran in the same round, side by side). Returns
    ``{"anchor_p95_p50", "ratio_p25", "ratio_min", "ratio_p75", "ratio_max", "rounds", "noisy", "why"}``: the
    anchor's own spread, the quartiles and extremes of the per-round ratio anchor / this, and ``noisy`` (bool) with
    ``why`` (the criteria that fired, in words; None when not noisy): anchor p95/p50 above
    :data:`NOISY_ANCHOR_P95_P50` or ratio p75/p25 above :data:`NOISY_RATIO_P75_P25`. Raises ValueError on no
    samples."""
    a, b = np.asarray(anchor_ms, float), np.asarray(this_ms, float)
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError("ratio_spread: no samples")
    a, b = a[:n], b[:n]
    p50, p95 = np.percentile(a, [50, 95])
    r = a / np.maximum(b, 1e-9)
    q25, q75 = np.percentile(r, [25, 75])
    out = {"anchor_p95_p50": float(p95 / p50) if p50 > 0 else float("inf"), "ratio_p25": float(q25),
           "ratio_p75": float(q75), "ratio_min": float(r.min()), "ratio_max": float(r.max()), "rounds": n}
    why = []
    if out["anchor_p95_p50"] > NOISY_ANCHOR_P95_P50:
        why.append(f"anchor p95/p50 {out['anchor_p95_p50']:.2f} > {NOISY_ANCHOR_P95_P50:g}")
    if q75 > NOISY_RATIO_P75_P25 * q25:
        why.append(f"per-round ratio p25-p75 {q25:.3g}-{q75:.3g} (x{q75 / q25:.2f} > {NOISY_RATIO_P75_P25:g})")
    return {**out, "noisy": bool(why), "why": "; ".join(why) or None}


def noise_lines(summary: list[dict]) -> list[str]:
    """One warning line per anchor ratio of ``summary`` flagged noisy (``x_{kind}_noisy``), naming the row, the
    anchor and why; empty when none is."""
    lines = []
    for r in summary:
        for kind in ANCHORS:
            sp = r.get(f"x_{kind}_spread")
            if r.get(f"x_{kind}_noisy") and sp:
                lines.append(f"warning: x_{kind} {r[f'x_{kind}']:.3g} of {r['bundle']} | {r['backend']} is noisy "
                             f"({ANCHOR_NAMES[kind]}: {sp['why']}; per-round ratio min-max {sp['ratio_min']:.3g}-"
                             f"{sp['ratio_max']:.3g} over {sp['rounds']} rounds): the machine was busy; rerun on a "
                             "quiet one (or with --threads 1) before quoting it")
    return lines


def _row(rows: list[dict], bundle: str, backend: str, image: str, mode: str) -> dict | None:
    return next((r for r in rows if (r["bundle"], r["backend"], r["image"], r["mode"]) == (bundle, backend, image,
                                                                                            mode)), None)


def summary_rows(contenders, rows, throughput, memory, parity, task, anchor_of, accuracy_km,
                 samples: dict | None = None) -> list[dict]:
    """One row per bundle x backend: the headline latency (12 MP JPEG, paced), speed-ups over the anchors
    (inference p50) with, when ``samples`` (``TimingRun.samples``) are given, their spread and noise flag
    (``x_{kind}_spread``: :func:`ratio_spread`; ``x_{kind}_noisy``), folder img/s, sizes, peak RSS, parity."""
    out = []
    km = f"{accuracy_km:g}km"
    for c in contenders:
        if c.kind != "runtime":
            continue
        r = _row(rows, c.bundle, c.backend, *HEADLINE) or {}
        row = {"bundle": c.bundle, "backend": c.backend, "precision": c.info["precision"],
               "e2e_p50_ms": r.get(f"{E2E}_p50_ms"), "e2e_p95_ms": r.get(f"{E2E}_p95_ms"),
               "inference_p50_ms": r.get("inference_p50_ms"), "cell_search_p95_ms": r.get("cell_search_p95_ms")}
        for kind, (a_bundle, a_backend) in anchor_of.get(c.bundle, {}).items():
            a = _row(rows, a_bundle, a_backend, *HEADLINE)
            if a and row["inference_p50_ms"]:
                row[f"x_{kind}"] = a["inference_p50_ms"] / row["inference_p50_ms"]
                scen = " ".join(HEADLINE)
                got = (samples or {}).get((scen, f"{a_bundle} | {a_backend}")), (samples or {}).get((scen, c.name))
                if all(got):
                    sp = ratio_spread(got[0]["inference"], got[1]["inference"])
                    row[f"x_{kind}_noisy"] = sp.pop("noisy")
                    row[f"x_{kind}_spread"] = sp
        t = throughput.get(c.name)
        if t:
            row["img_s"] = t[t["best"]]["img_s"]
            row["img_s_pool"] = t["best"]
        row["model_mb"], row["bundle_mb"] = c.info["model_mb"], c.info["bundle_mb"]
        row["peak_rss_mb"] = (memory.get(c.name) or {}).get("peak_rss_mb")
        p = parity.get(c.name, {})
        row["recorded"] = (p.get("recorded") or {}).get("status")
        g = p.get("golden") or {}
        row["golden_cos_mean"] = g.get("cosine_mean")
        row["golden"] = None if not g else ("PASS" if g["passed"] else "FAIL")
        tk = task.get(c.name)
        if tk and tk.get("deployed"):
            row[f"acc@{km}"] = tk["deployed"]["accuracy"].get(km)
            row["median_km"] = tk["deployed"]["median_km"]
            if tk.get("fp32"):
                tp = tk["parity"]
                row[f"fp32_acc@{km}"] = tk["fp32"]["accuracy"].get(km)
                row["drift_median_km"], row["drift_p95_km"] = tp["median_drift_km"], tp["p95_drift_km"]
                row["agree_confident"] = tp["top1_agreement_confident"]
                row["acc_delta_min_pts"] = tp.get("accuracy_delta_min_pts")
                row["task"] = "PASS" if tp["passed"] else "FAIL"
        hint = (c.info.get("runner_options") or {}).get("INFERENCE_PRECISION_HINT")
        if hint:
            row["precision_hint"] = str(hint)
        out.append(row)
    return out


# ---- output -------------------------------------------------------------------------------------------------------
LATENCY_COLUMNS = ["bundle", "backend", "image", "mode"] + [f"{s}_{q}_ms" for s in (*STAGES, E2E)
                                                             for q in ("p50", "p95")]


def format_report(report: dict) -> str:
    """The tables: latency per stage (every bundle x backend x image x pacing; anchors are inference rows), the
    summary per bundle x backend, what was skipped and why."""
    s = report["settings"]
    lat = [{k.removesuffix("_ms"): r[k] for k in LATENCY_COLUMNS} for r in report["latency"]]
    head = (f"latency, ms (p50 / p95 of {s['iters']} runs per row, contenders interleaved call by call; paced = "
            f"{s['pause_ms']:.0f} ms pause before each call, a camera at {1000 / s['pause_ms']:.0f} fps; e2e = "
            "locate() wall time)" if s["pause_ms"] else "latency, ms")
    parts = [format_table(lat, title=head)]
    summary = report["summary"]
    if summary:
        # every row's columns (OpenVINO's hint ...) but the anchor ratios' spread: the JSON's, and warnings below
        cols = [k for k in dict.fromkeys(k for r in summary for k in r) if not k.endswith(("_spread", "_noisy"))]
        parts.append(format_table(summary, cols, title=f"\nsummary: {HEADLINE[0]} {HEADLINE[1]} latency; x_eager / "
                                                 "x_compile = anchor inference p50 / this inference p50; img/s = "
                                                 "folder throughput, best decode pool; peak RSS of the runtime "
                                                 "alone; parity vs FP32 torch"))
        parts += noise_lines(summary)
    if report["skipped"]:
        parts.append(format_table(report["skipped"], title="\nskipped"))
    return "\n".join(parts)


def short_form(report: dict, bundle=None) -> str:
    """A compact table for one bundle (its label in the report or its path; default: the first that ran), one row
    per backend: end to end on the 12 MP
    JPEG at 10 fps (p50 / p95 ms), inference p50, speed-up over torch eager FP32 (inference p50 ratio), folder img/s,
    peak RSS, the parity the export recorded (``reference`` for FP32, PASS / FAIL); under the table, a warning line
    for each speed-up flagged noisy (:func:`noise_lines`). For ``geosurge demo`` and other callers that print a line
    or two of speed."""
    if bundle is not None:  # a label of the report, or the bundle's path
        by_path = {str(Path(c["bundle_path"]).resolve()): c["bundle"] for c in report["contenders"]
                   if c.get("bundle_path")}
        bundle = by_path.get(str(Path(bundle).resolve()), str(bundle))
    rows = [r for r in report["summary"] if bundle is None or r["bundle"] == bundle]
    if not rows:
        raise GeosurgeError(f"benchmark: no results for bundle {bundle!r}" if bundle else "benchmark: nothing ran")
    bundle = rows[0]["bundle"]
    short = [{"backend": r["backend"], "precision": r["precision"], "12mp_e2e_p50_ms": r["e2e_p50_ms"],
              "12mp_e2e_p95_ms": r["e2e_p95_ms"], "inference_p50_ms": r["inference_p50_ms"],
              "x_torch_eager": r.get("x_eager"), "img_s": r.get("img_s"), "peak_rss_mb": r.get("peak_rss_mb"),
              "parity": r.get("recorded")}
             for r in rows if r["bundle"] == bundle]
    pause = report["settings"]["pause_ms"]
    paced = f", paced at {1000 / pause:.0f} fps" if pause else ""
    noisy = [r for r in rows if r["bundle"] == bundle and r.get("x_eager_noisy")]
    return "\n".join([format_table(short, title=f"{bundle}: 12 MP JPEG end to end{paced}"),
                      *(line for line in noise_lines(noisy) if line.startswith("warning: x_eager"))])


def write_png(report: dict, path) -> Path:
    """Latency vs parity: one point per bundle x backend; x = p50 ms of inference (left) and end to end (right) on
    the 12 MP JPEG, paced; y = deployed acc@km when ground truth was given, else the golden-replay embedding cosine
    vs FP32 torch. Torch anchors are vertical lines on the inference panel. Written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    from geosurge.fsutil import atomic_write_bytes

    km = f"{report['settings']['accuracy_km']:g}km"
    summary = report["summary"]
    use_acc = bool(summary) and all(r.get(f"acc@{km}") is not None for r in summary)
    ykey, ylabel = ((f"acc@{km}", f"accuracy within {km} (deployed, vs ground truth)") if use_acc else
                    ("golden_cos_mean", "embedding cosine vs FP32 torch (golden replay)"))
    anchors = [r for r in report["latency"] if r["kind"] == "anchor" and (r["image"], r["mode"]) == HEADLINE]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    # points named in a legend, not by labels beside them: bundles at parity sit on top of each other
    # (colour: the bundle, marker: the backend)
    bundles = list(dict.fromkeys(r["bundle"] for r in summary))
    backends = list(dict.fromkeys(r["backend"] for r in summary))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, xkey, xlabel in ((axes[0], "inference_p50_ms", "inference p50 (ms)"),
                             (axes[1], "e2e_p50_ms", "end to end p50 (ms)")):
        xs = []
        for r in summary:
            if r.get(xkey) is None or r.get(ykey) is None:
                continue
            xs.append(r[xkey])
            ax.scatter(r[xkey], r[ykey], s=40, color=colours[bundles.index(r["bundle"]) % len(colours)],
                       marker="osD^v<>"[backends.index(r["backend"]) % 7],
                       label=f"{r['bundle']} | {r['backend']} {r['precision']}")
        if ax is axes[0]:  # the torch anchors: FP32 references, inference only
            for i, a in enumerate(anchors):
                xs.append(a["inference_p50_ms"])
                ax.axvline(a["inference_p50_ms"], ls=("--", ":", "-.")[i % 3], lw=1, color="grey",
                           label=f"{a['bundle']} | {a['backend']}")
        if xs:  # log scale: speed-ups read as distances; ticks at 1, 2, 5 x 10^n ms
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.5, max(xs) * 2.0)
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{xlabel}, 12 MP JPEG, paced (log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(ylabel)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="best", framealpha=0.8)
    fig.suptitle(f"geosurge benchmark: latency vs parity ({report['machine']['machine']}, "
                 f"{report['machine']['cpus']} CPUs, threads {report['settings']['threads'] or 'default'})",
                 fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
