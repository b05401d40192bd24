"""On-device parity: every sha256, then the golden probes replayed through the backend and compared with the FP32
torch embeddings stored in the bundle, under the manifest's gates (numpy + one backend; no torch). The report names
the backend and the run-time options that change its numerics (OpenVINO's precision hint, device)."""
from __future__ import annotations

from geosurge.parity import compare, failed_gates_text

from .bundle import open_bundle
from .golden import Golden
from .localizer import Localizer


def verify_bundle(bundle_dir, backend: str | None = None, threads: int | None = None, **options) -> dict:
    """Checksums + golden replay + the export's own held-out parity record. ``options``: the backend's own
    (OpenVINO: ``device``, ``precision_hint``; onnxruntime: ``simulate_int8``). Returns ``{"bundle", "backend",
    "runner_options", "files", "metrics", "gates", "golden_passed", "export_check", "notes", "passed"}``
    (``notes``: lines on what the figures mean here, :func:`machine_notes`): ``passed`` needs the golden replay to pass
    *and* the export's check not to have FAILed (:func:`export_check`: a bundle its export refused — measured on
    far more images than the 6 golden probes — is not fit to deploy, whatever the probes say). Raises BundleError
    for a missing, tampered-with or unreadable bundle (the message names the file)."""
    bundle = open_bundle(bundle_dir, verify=False)
    backend = bundle.backend(backend)
    files = bundle.verify_checksums()
    with Localizer(bundle, backend=backend, threads=threads, verify=False, options=options) as loc:
        rep = replay_golden(loc)
        runner_options = dict(loc.runner.options or {})
    check = export_check(bundle.manifest)
    return {"bundle": str(bundle_dir), "backend": backend.value, "runner_options": runner_options, "files": files,
            **rep, "golden_passed": rep["passed"], "export_check": check,
            "notes": machine_notes(bundle.manifest, backend, runner_options),
            "passed": bool(rep["passed"]) and check["status"] != "FAIL"}


def machine_notes(manifest, backend, runner_options: dict) -> list[str]:
    """What the replay's figures mean on this machine: an INT8 model the export checked as simulated INT8 (for a
    device that accumulates exactly), replayed on onnxruntime's kernels of a CPU that saturates (x86 without VNNI,
    :func:`~geosurge.runtime.backends.onnxruntime.int8_saturates`), is not measured as the device it was made for
    computes it."""
    from geosurge.formats import Backend

    from .backends.onnxruntime import int8_saturates

    check = manifest.check
    simulated = check is not None and checked_simulated(check)
    if (simulated and Backend(str(backend)) is Backend.ONNXRUNTIME and not runner_options.get("simulate_int8")
            and int8_saturates()):
        return ["the export checked this INT8 model as simulated INT8 (exact accumulation: ARM, VNNI / AMX, "
                "TensorRT devices); this CPU's onnxruntime kernels sum u8 x s8 pairs in int16 with saturation (x86 "
                "without VNNI), so figures measured here on its kernels are not that device's: run verify on the "
                "device, or add --simulate-int8 here"]
    return []


def export_check(manifest) -> dict:
    """The held-out parity check the export recorded (``quantization.check``): ``{"status": "PASS" | "FAIL" |
    "not measured" | "none", "images", "failed_gates", "reason"}``, and for a measured check ``failed`` (the failed
    gates with value and need, :func:`geosurge.parity.failed_gates_text`) and ``measured_as``. ``none``: an FP32
    model part is its own reference; ``not measured``: the exporting machine could not run it (the record says why)."""
    c = manifest.check
    if c is None:
        return {"status": "none", "images": None, "failed_gates": [], "reason": "FP32: the model is the reference"}
    if c.passed is None:
        return {"status": "not measured", "images": c.images, "failed_gates": [], "reason": c.skipped}
    return {"status": "PASS" if c.passed else "FAIL", "images": c.images, "failed_gates": c.failed_gates(),
            "failed": failed_gates_text(c.gates or []), "reason": None, "measured_as": measured_as(c)}


def checked_simulated(check) -> bool:
    """Whether the export ran its held-out check (a ParityRecord) as simulated INT8."""
    return bool((check.runner_options or {}).get("simulate_int8"))


def measured_as(check) -> str:
    """How the export ran its held-out check: ``"simulated INT8"`` (exact accumulation) or ``"<runner> on the
    exporting machine"`` (that machine's kernels)."""
    if checked_simulated(check):
        return "simulated INT8"
    return f"{check.runner or 'its backend'} on the exporting machine"


def measured_suffix(check: dict) -> str:
    """``", measured as ..."`` for an :func:`export_check` dict that says how, else ``""``."""
    return f", measured as {check['measured_as']}" if check.get("measured_as") else ""


def export_check_line(check: dict) -> str | None:
    """One line saying that the export refused this bundle, or None when it did not."""
    if check["status"] != "FAIL":
        return None
    gates = check.get("failed") or ", ".join(check["failed_gates"]) or "its gates"
    return (f"the export's held-out parity check FAILED ({gates} on {check['images']} image(s)"
            f"{measured_suffix(check)}): the exporting "
            "toolkit refused this bundle; it is not fit to deploy (re-export in another precision, or for INT8 "
            "with --reduce-range for CPUs that saturate or --simulate-int8 for devices that accumulate exactly)")


def replay_golden(loc: Localizer) -> dict:
    """The bundle's golden inputs through ``loc``'s backend vs the FP32 torch embeddings stored beside them, under
    the manifest's gates: ``geosurge.parity.compare``'s ``{"metrics", "gates", "passed"}``."""
    golden = Golden.load(loc.bundle.path("golden"))
    return compare(golden.embedding, loc.embed(golden.inputs), loc.scorer, loc.bundle.manifest.gates() or None)
