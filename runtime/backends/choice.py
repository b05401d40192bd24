"""Which backend runs a bundle by default: the format's first backend (``geosurge.formats.FORMAT_BACKENDS``:
onnxruntime for ONNX), unless another was **measured faster at parity on this machine** and is installed here.

Why a measurement and why per machine: OpenVINO's CPU plugin runs BF16 inside on CPUs with AVX512-BF16 / AMX
(the edge model, batch 1, 2 threads, on an AVX-512 machine: 2.06 ms vs onnxruntime's 3.7 at embedding cosine
0.999) but FP32 on AVX2-only CPUs, where it is no faster;
INT8 kernels differ by instruction set too. The same bundle has a different best backend on different CPUs, so a
recommendation is only valid where it was measured.

Where it is recorded:

* ``geosurge-run choose-backend BUNDLE`` (on the device) times every installed backend that reads the bundle's
  format, interleaved and paced, replays the golden probes through each under the manifest's gates, and writes the
  winner to the sidecar ``BUNDLE/backend.json`` (not a bundle part and not checksummed — like the TensorRT engine,
  it belongs to the machine, not to the bundle), keyed by :func:`machine_fingerprint`.
* ``geosurge export --recommend-backend`` does the same on the exporting machine and records it in the manifest
  (``backend_choice``): it applies on devices with the same fingerprint (exporting on the deployment machine).

:func:`default_backend_for` reads the sidecar first, then the manifest; a recommendation from another machine, or for
a backend not installed here, is ignored. An explicit ``--backend`` always wins.
"""
from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Backend, backends_for, default_backend
from geosurge.manifest import SIDECAR_FILE  # the per-machine recommendation beside a bundle's manifest

#: the Python package each backend needs (an ``importlib.util.find_spec`` check imports nothing)
LIBRARIES = {Backend.ONNXRUNTIME: "onnxruntime", Backend.OPENVINO: "openvino", Backend.TENSORRT: "tensorrt",
             Backend.COREML: "coremltools"}
#: instruction-set flags that change which kernels (and numerics) backends pick
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
             "asimddp", "i8mm", "bf16", "sve")


def installed(backend: Backend | str) -> bool:
    return importlib.util.find_spec(LIBRARIES[Backend(str(backend))]) is not None


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:  # not Linux: the platform's processor string alone
        pass
    return model, sorted(f for f in ISA_FLAGS if f in flags)


def machine_fingerprint() -> str:
    """``"<arch> | <cpu model> | <ISA flags that matter>"``: what a backend recommendation is valid for."""
    model, flags = _cpu()
    return f"{platform.machine()} | {model or 'unknown cpu'} | {','.join(flags) or '-'}"


def sidecar_path(bundle) -> Path:
    return Path(bundle) / SIDECAR_FILE


def recorded_choice(bundle) -> dict | None:
    """The recommendation that applies on this machine: the sidecar's, else the manifest's ``backend_choice``, when
    measured on a machine with this fingerprint; None otherwise. An unreadable sidecar is ignored (it is advice)."""
    here = machine_fingerprint()
    side = sidecar_path(bundle)
    if side.is_file():
        try:
            rec = json.loads(side.read_text())
            if isinstance(rec, dict) and rec.get("machine") == here and rec.get("backend"):
                return rec
        except (OSError, ValueError):
            pass
    choice = getattr(bundle.manifest, "backend_choice", None)
    if choice is not None and choice.machine == here:
        return choice.to_dict()
    return None


def default_backend_for(bundle) -> Backend:
    """The backend a bundle opens with when none is named: a recorded recommendation for this machine whose backend
    reads the format and is installed, else the format's default."""
    fmt = bundle.manifest.model.format
    rec = recorded_choice(bundle)
    if rec is not None:
        try:
            b = Backend(rec["backend"])
        except ValueError:
            b = None
        if b is not None and b in backends_for(fmt) and installed(b):
            return b
    return default_backend(fmt)


def reduced_precision(options: dict | None) -> str | None:
    """The precision hint in ``options`` (a runner's) when it computes below float32 (bf16, f16), else None."""
    hint = str((options or {}).get("INFERENCE_PRECISION_HINT") or "")
    return hint if any(t in hint.lower() for t in ("bf16", "bfloat16", "f16", "float16")) else None


#: the fewest of the user's images a reduced-precision backend is judged on (one image moves the agreement by 1/N;
#: OpenVINO bf16 passed 5 phone photos and failed 200 held-out views of the reference model)
FEW_IMAGES = 50
#: why a reduced-precision backend is not chosen on the golden probes alone, or on too few images (docs/runtime.md)
NEEDS_IMAGES = (f"not judged on enough of your images: add --images with {FEW_IMAGES}+ (six golden probes "
                "cannot judge a reduced-precision backend)")


def decide(rows: list[dict], baseline: str, min_speedup: float = 1.0) -> tuple[str, str]:
    """(winner, why) from measured rows (``backend``, ``p50_ms``, ``parity_passed``, ``needs_images``): the fastest
    backend that passes parity, was judged on enough evidence (no ``needs_images``) and beats ``baseline``'s p50 by
    more than ``min_speedup``; the baseline otherwise."""
    base = next((r for r in rows if r["backend"] == baseline), None)
    if base is None:
        raise GeosurgeError(f"choose-backend: the baseline {baseline} was not measured")
    ok = [r for r in rows if r["backend"] != baseline and r.get("parity_passed") and not r.get("needs_images")
          and base["p50_ms"] / r["p50_ms"] > min_speedup]
    if not ok:
        slower = [f"{r['backend']} x{base['p50_ms'] / r['p50_ms']:.2f}"
                  + (" (fails parity)" if not r.get("parity_passed") else
                     f" ({r['needs_images']})" if r.get("needs_images") else "")
                  for r in rows if r["backend"] != baseline and r.get("p50_ms")]
        return baseline, (f"{baseline}: no other backend passes parity and is more than x{min_speedup:g} faster"
                          + (f" ({', '.join(slower)})" if slower else ""))
    best = min(ok, key=lambda r: r["p50_ms"])
    return best["backend"], (f"{best['backend']}: x{base['p50_ms'] / best['p50_ms']:.2f} faster than {baseline} "
                             f"(p50 {best['p50_ms']:.2f} vs {base['p50_ms']:.2f} ms, paced) and passes parity"
                             + (f" at INFERENCE_PRECISION_HINT {best['options'].get('INFERENCE_PRECISION_HINT')}"
                                if best.get("options", {}).get("INFERENCE_PRECISION_HINT") else ""))


def measure_backends(bundle, threads: int | None = None, backends=None, iters: int = 30, warmup: int = 5,
                     pause_ms: float = 100.0, min_speedup: float = 1.0, measure=None, images=None,
                     log=print) -> dict:
    """Every installed backend that reads ``bundle``'s format (or ``backends``): the golden probes replayed under
    the manifest's gates, and inference latency on one probe, interleaved and paced (``pause_ms`` before each call:
    a camera at 10 fps). ``measure(calls) -> {name: [ms, ...]}`` replaces the timing (tests).

    ``images`` (files, folders, CSV manifests ``path, lat, lon``: the deployment's own images): each backend is
    also compared on them with the format's default backend (onnxruntime for ONNX) as the reference, under the same
    gates (accuracy deltas in km too for manifests), and passes parity only if both replays pass. Six golden probes
    are too few to judge a reduced-precision backend: OpenVINO's BF16 default on an AVX512-BF16 CPU passed them
    (cosine 0.999) and failed the km gates on 1,000 held-out views of the reference model (cosine 0.993,
    confident agreement 0.84), so without ``images`` (or with fewer than :data:`FEW_IMAGES`) such a backend (a
    bf16 / f16 precision hint) is measured and never chosen (its row says ``needs_images``). For an FP32 bundle
    the reference is the FP32 model itself; for a quantized one it is that bundle on the default backend, not FP32.

    Returns the ``backend_choice`` record (``backend``, ``machine``, ``reason``, ``measured`` rows, ``min_speedup``,
    ``images``: what was read and the reference, when given); a backend that cannot open here is a row with
    ``skipped``. Raises GeosurgeError when none of ``images`` is readable."""
    from geosurge.parity import compare
    from geosurge.timing import interleaved

    from ..golden import Golden
    from . import BackendUnavailable, embed_batches, get_runner

    m = bundle.manifest
    golden = Golden.load(bundle.path("golden"))
    from ..cells import CellScorer

    scorer = CellScorer.load(bundle.path("cells"), bundle.path("cell_table"))
    base = default_backend(m.model.format)
    names = [Backend(str(b)) for b in (backends or backends_for(m.model.format))]
    if base not in names:
        names.insert(0, base)
    rows, runners, read_rec = [], {}, None
    try:
        for b in names:
            cls = get_runner(b)
            if not installed(b):
                rows.append({"backend": b.value, "skipped": f"{LIBRARIES[b]} is not installed"})
                continue
            try:
                runners[b.value] = cls.open(bundle, threads=threads if cls.thread_option else None)
            except BackendUnavailable as e:
                rows.append({"backend": b.value, "skipped": str(e)})
        for name, r in runners.items():
            rep = compare(golden.embedding, embed_batches(r, golden.inputs, m.io.input.name, m.io.embedding.name,
                                                          m.io.static_batch), scorer, m.gates() or None)
            rows.append({"backend": name, "options": dict(getattr(r, "options", {}) or {}),
                         "parity_passed": rep["passed"], "median_drift_km": rep["metrics"]["median_drift_km"],
                         "p95_drift_km": rep["metrics"]["p95_drift_km"],
                         "cosine_mean": rep["metrics"]["cosine_mean"]})
        if images is not None and runners:
            read_rec = _images_parity(images, m, runners, base.value, scorer, rows, log)
        if read_rec is None or read_rec["n"] < FEW_IMAGES:  # too little evidence: measured, never chosen
            for row in rows:
                hint = reduced_precision(row.get("options"))
                if hint and row["backend"] != base.value:
                    row["needs_images"] = f"INFERENCE_PRECISION_HINT {hint} {NEEDS_IMAGES}"
        x = {m.io.input.name: golden.inputs[:1]}
        calls = {name: (lambda r=r: r.infer(x)) for name, r in runners.items()}
        times = measure(calls) if measure else interleaved(calls, iters, warmup, pause_ms=pause_ms)
    finally:
        for r in runners.values():
            r.close()
    for row in rows:
        t = times.get(row["backend"]) if "skipped" not in row else None
        if t:
            row["p50_ms"], row["p95_ms"] = float(np.median(t)), float(np.percentile(t, 95))
    base_row = next(r for r in rows if r["backend"] == base.value)
    if "skipped" in base_row:
        raise GeosurgeError(f"choose-backend: the format's default backend cannot run here ({base_row['skipped']})")
    base_t = np.asarray(times[base.value], np.float64)
    for row in rows:
        if row.get("p50_ms"):
            row["speedup"] = base_row["p50_ms"] / row["p50_ms"]
            # the spread: the default backend's time over this one's, round by round (the calls of a round ran
            # side by side, so machine noise moves both): 10th and 90th percentile
            t = np.asarray(times[row["backend"]], np.float64)
            n = min(len(t), len(base_t))
            ratio = base_t[:n] / np.maximum(t[:n], 1e-9)
            row["speedup_p10"], row["speedup_p90"] = (float(np.percentile(ratio, 10)),
                                                      float(np.percentile(ratio, 90)))
    winner, why = decide([r for r in rows if "p50_ms" in r], base.value, min_speedup)
    log(f"choose-backend: {why}")
    return {"backend": winner, "machine": machine_fingerprint(), "reason": why, "measured": rows,
            "min_speedup": float(min_speedup), **({"images": read_rec} if read_rec else {}),
            "settings": {"iters": iters, "pause_ms": pause_ms, "threads": threads}}


def _images_parity(images, m, runners: dict, base: str, scorer, rows: list[dict], log) -> dict:
    """Each runner vs ``base``'s embeddings of ``images``, under the manifest's gates; updates ``rows`` in place
    (``images_parity_passed``, ``images_failed``: the failed gates with values, ``images_p95_drift_km``,
    ``images_agreement``, ``images_cosine_mean``, ``images_accuracy_delta_min_pts`` with ground truth;
    ``golden_parity_passed`` keeps the golden replay's verdict and ``parity_passed`` becomes both). Returns what was
    read."""
    from geosurge.inputs import read_preprocessed
    from geosurge.parity import compare, failed_gates_text

    from . import embed_batches

    read = read_preprocessed(images, m.preprocess, log=log, what="images")
    if base not in runners:
        raise GeosurgeError(f"choose-backend: the reference backend {base} could not open here")
    embs = {name: embed_batches(r, read.inputs, m.io.input.name, m.io.embedding.name, m.io.static_batch)
            for name, r in runners.items()}
    for row in rows:
        if row["backend"] not in embs:
            continue
        rep = compare(embs[base], embs[row["backend"]], scorer, m.gates() or None, truth=read.truth)
        met = rep["metrics"]
        row.update(images_parity_passed=rep["passed"], images_p95_drift_km=met["p95_drift_km"],
                   images_agreement=met["top1_agreement_confident"], images_cosine_mean=met["cosine_mean"],
                   images_accuracy_delta_min_pts=met.get("accuracy_delta_min_pts"),
                   images_failed=failed_gates_text(rep["gates"]))
        row["golden_parity_passed"] = row["parity_passed"]
        row["parity_passed"] = bool(row["parity_passed"] and rep["passed"])
    return {"n": len(read.names), "refused": read.errors, "not_images": read.not_images,
            "reference": f"{base} (the format's default backend)", "ground_truth": read.truth is not None}


def write_choice(bundle, choice: dict) -> Path:
    """Write the recommendation to the bundle's sidecar (atomically)."""
    from geosurge.report import write_json

    return write_json(sidecar_path(bundle), choice)
