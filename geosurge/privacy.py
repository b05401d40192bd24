"""No telemetry: geosurge turns off the usage telemetry of the inference libraries it loads, unless the user allows it.

Two of the libraries geosurge runs on collect usage data by default:

* **ONNX Runtime** (the official Linux wheels; seen with 1.32): on ``import onnxruntime`` it writes a device id and an event
  queue (``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}``: the Python path, model file
  names, CPU / OS details, error events) for upload to Microsoft. It honours the environment variable
  ``ORT_DISABLE_TELEMETRY=1``, read when the library loads (so it must be set before the first import), and
  ``onnxruntime.disable_telemetry_events()`` for the events of sessions made after it.
* **OpenVINO** (``import openvino`` imports its model-conversion API, which starts ``openvino_telemetry``): it writes
  ``~/intel/openvino_ga_cid`` and ``~/intel/stats`` and sends Google Analytics events unless the user has opted out
  with ``opt_in_out --opt_out`` (a consent file ``~/intel/openvino_telemetry`` holding ``0``). geosurge does not
  write that file for the user; it has OpenVINO take its own no-telemetry path (``openvino.tools.ovc.telemetry_stub``,
  what OpenVINO uses when the ``openvino_telemetry`` package is not importable) by marking that package
  unimportable in this process.

:func:`opt_out` applies both; ``import geosurge`` calls it, so every geosurge command and the Python API are covered
as long as geosurge is imported before onnxruntime / openvino. :func:`import_onnxruntime` and
:func:`import_openvino` are how geosurge code imports the two libraries where it makes sessions and compiled models.
Setting ``GEOSURGE_ALLOW_TELEMETRY=1`` leaves both libraries at their own defaults. Stdlib only (the runtime imports
it on the device).
"""
from __future__ import annotations

import os
import sys

#: the environment variable that, set to 1 / true / yes, leaves the libraries' telemetry at their defaults
ALLOW_ENV = "GEOSURGE_ALLOW_TELEMETRY"
#: ONNX Runtime's own opt-out, read when libonnxruntime loads
ORT_ENV = "ORT_DISABLE_TELEMETRY"
#: the package OpenVINO sends its telemetry with; without it OpenVINO falls back to a no-op stub
OPENVINO_TELEMETRY_MODULE = "openvino_telemetry"


def telemetry_allowed() -> bool:
    """Whether the user allowed the libraries' telemetry (``GEOSURGE_ALLOW_TELEMETRY`` is 1, true or yes)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def opt_out() -> bool:
    """Turn off ONNX Runtime's and OpenVINO's telemetry in this process (and in child processes, which inherit
    ``ORT_DISABLE_TELEMETRY``), unless :func:`telemetry_allowed`. Idempotent. Has no effect on a library already
    imported before it (ONNX Runtime writes its files on import). Returns True when the opt-out is in force."""
    if telemetry_allowed():
        return False
    os.environ[ORT_ENV] = "1"
    if OPENVINO_TELEMETRY_MODULE not in sys.modules or sys.modules[OPENVINO_TELEMETRY_MODULE] is None:
        # None in sys.modules makes ``import openvino_telemetry`` raise ImportError, which OpenVINO catches
        sys.modules[OPENVINO_TELEMETRY_MODULE] = None  # type: ignore[assignment]
    return True


def import_onnxruntime():
    """``import onnxruntime`` with the opt-out applied first (and ``disable_telemetry_events()`` after, for the
    events of every session made later); returns the module. Raises ImportError when onnxruntime is absent."""
    off = opt_out()
    import onnxruntime

    if off and hasattr(onnxruntime, "disable_telemetry_events"):
        onnxruntime.disable_telemetry_events()
    return onnxruntime


def import_openvino():
    """``import openvino`` with the opt-out applied first; returns the module. Raises ImportError when OpenVINO is
    absent."""
    opt_out()
    import openvino

    return openvino
