"""Model formats, export targets, runtime backends and precisions: the one table both sides read (standard library
only, so the device runtime reads it too).

=============  ========  ==========================================  ===============================  ============
target         format    precisions                                  runs on (backends)               default prec.
=============  ========  ==========================================  ===============================  ============
onnxruntime    onnx      fp32, fp16, int8, int8-dynamic              onnxruntime, openvino, tensorrt  fp32
tensorrt       onnx      fp32, fp16, int8, fp8                       onnxruntime, openvino, tensorrt  fp32
coreml         coreml    fp32, fp16, int8-weights, palettize4        coreml                           fp16
=============  ========  ==========================================  ===============================  ============

The CLI choices (``geosurge export --target/--format/--precision``, ``geosurge-run --backend``), the default backend
for a bundle and the check that a backend can read a bundle all come from :data:`TARGETS` and
:data:`FORMAT_BACKENDS`. ``fp8`` exists only in the TensorRT row: FP8 QDQ needs TensorRT (Hopper / Ada / Jetson
Thor); ``int8-dynamic`` only in onnxruntime's (TensorRT takes no dynamic quantization, see TensorRT's
"Working with Quantized Types"); the Core ML weight compressions only in Core ML's (coremltools.optimize).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import GeosurgeError


class _Name(str, Enum):
    """A string enum whose ``str()`` is its value (so f-strings and JSON read ``onnx``, not ``Format.ONNX``)."""

    def __str__(self) -> str:
        return self.value


class Format(_Name):
    """What the bundle's model part is."""

    ONNX = "onnx"
    COREML = "coreml"


class Target(_Name):
    """What the export prepares the model for."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    COREML = "coreml"


class Backend(_Name):
    """What runs the model part on the device (``geosurge.runtime.backends``)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"
    COREML = "coreml"


class Precision(_Name):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # static: calibrated activations and weights (QDQ)
    INT8_DYNAMIC = "int8-dynamic"  # weights offline, activations at run time (onnxruntime)
    FP8 = "fp8"  # QDQ FP8 E4M3, calibrated (TensorRT)
    INT8_WEIGHTS = "int8-weights"  # Core ML: int8 per-channel weights, fp16 compute
    PALETTIZE4 = "palettize4"  # Core ML: 4-bit k-means palettized weights

    @property
    def needs_calibration(self) -> bool:
        """Precisions whose activation ranges come from a calibration set."""
        return self in (Precision.INT8, Precision.FP8)


@dataclass(frozen=True)
class TargetSpec:
    target: Target
    format: Format
    precisions: tuple[Precision, ...]
    default_precision: Precision
    #: how a user names this target on the command line, and its product name (for messages)
    flag: str
    label: str
    summary: str
    #: what a precision means on this target, where it needs saying (the export's banner: :meth:`describe`)
    precision_notes: tuple[tuple[Precision, str], ...] = ()

    def describe(self, precision) -> str:
        """The export banner's words for this target at ``precision``: ``summary``, plus the precision's note."""
        note = dict(self.precision_notes).get(Precision(str(precision)))
        return f"{self.summary}; {note}" if note else self.summary


TARGETS: dict[Target, TargetSpec] = {
    Target.ONNXRUNTIME: TargetSpec(
        Target.ONNXRUNTIME, Format.ONNX,
        (Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT8_DYNAMIC), Precision.FP32,
        "--target onnxruntime", "onnxruntime", "ONNX for onnxruntime (CPU path)",
        ((Precision.FP16, "FP16 weights and compute, float32 inputs and outputs, LayerNorm in float32"),
         (Precision.INT8, "static INT8 QDQ from onnxruntime's quantizer"),
         (Precision.INT8_DYNAMIC, "dynamic INT8 from onnxruntime's quantizer"))),
    Target.TENSORRT: TargetSpec(
        Target.TENSORRT, Format.ONNX,
        (Precision.FP32, Precision.FP16, Precision.INT8, Precision.FP8), Precision.FP32,
        "--target tensorrt", "TensorRT", "TensorRT-bound ONNX (modelopt QDQ for INT8 / FP8; the engine is built on the device)"),
    Target.COREML: TargetSpec(
        Target.COREML, Format.COREML,
        (Precision.FP32, Precision.FP16, Precision.INT8_WEIGHTS, Precision.PALETTIZE4), Precision.FP16,
        "--format coreml", "Core ML", "Core ML mlprogram package (iOS 17+ / macOS 14+)"),
}

#: which backends read which format; the first is the default for a bundle of that format (unless a backend was
#: measured faster at parity on the machine: ``geosurge.runtime.backends.choice``)
FORMAT_BACKENDS: dict[Format, tuple[Backend, ...]] = {
    Format.ONNX: (Backend.ONNXRUNTIME, Backend.OPENVINO, Backend.TENSORRT),
    Format.COREML: (Backend.COREML,),
}

#: every precision some target takes (the CLI's ``--precision`` choices; :func:`check_precision` narrows it)
PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)


def _enum(cls, value, what: str):
    try:
        return cls(str(value))
    except ValueError:
        raise GeosurgeError(f"unknown {what} {value!r}; choose from {', '.join(m.value for m in cls)}") from None


def resolve_target(format: str | None = None, target: str | None = None) -> TargetSpec:
    """The one target a ``--format`` / ``--target`` pair names (either may be None). ``--format coreml`` is the
    coreml target; ``--format onnx`` (the default) takes ``--target onnxruntime`` (default) or ``tensorrt``.
    Raises GeosurgeError for a pair that contradicts itself."""
    fmt = _enum(Format, format, "format") if format is not None else None
    tgt = _enum(Target, target, "target") if target is not None else None
    if tgt is None:
        tgt = next(t for t, s in TARGETS.items() if s.format == (fmt or Format.ONNX))
    spec = TARGETS[tgt]
    if fmt is not None and spec.format != fmt:
        raise GeosurgeError(f"--format {fmt} does not take {spec.flag} (that target writes {spec.format})")
    return spec


def check_precision(target: TargetSpec | Target | str, precision: str | None = None) -> Precision:
    """``precision`` (default: the target's) checked against the target's row of the table. Raises GeosurgeError
    naming the precisions the target takes and, for a precision another target takes, that target."""
    spec = target if isinstance(target, TargetSpec) else TARGETS[_enum(Target, target, "target")]
    if precision is None:
        return spec.default_precision
    p = _enum(Precision, precision, "precision")
    if p not in spec.precisions:
        others = [f"{s.label}: {s.flag}" for s in TARGETS.values() if p in s.precisions]
        raise GeosurgeError(f"{spec.flag} takes --precision {', '.join(x.value for x in spec.precisions)}, not {p}"
                            + (f" ({p} is for {' / '.join(others)})" if others else ""))
    return p


def backends_for(format: Format | str) -> tuple[Backend, ...]:
    return FORMAT_BACKENDS[_enum(Format, format, "format")]


def default_backend(format: Format | str) -> Backend:
    """The backend a bundle of this format opens with when the user names none."""
    return backends_for(format)[0]


def check_backend(format: Format | str, backend: Backend | str) -> Backend:
    """``backend`` if it reads ``format``; GeosurgeError otherwise (``backend 'coreml' needs coreml``)."""
    b = _enum(Backend, backend, "backend")
    fmt = _enum(Format, format, "format")
    if b not in FORMAT_BACKENDS[fmt]:
        wants = next(f for f, bs in FORMAT_BACKENDS.items() if b in bs)
        raise GeosurgeError(f"the bundle holds a {fmt} model; backend {b.value!r} needs {wants}")
    return b
