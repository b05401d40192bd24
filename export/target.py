"""What every export target is: one module per target behind one small interface, looked up in one table.

    ExportTarget.export(model, job) -> TargetOutput

A target writes its model part into the bundle's staging folder and returns the part's file name with its manifest
sections (model, io, quantization) and the versions of its tools. :func:`geosurge.export.bundle.write_bundle`
assembles the rest (hierarchy, cell table, places, golden probes, the held-out parity check, checksums) the same way
for every target, with no branch on the format or the target.

==============  =======================================  ==========================================================
target          module                                   model part
==============  =======================================  ==========================================================
onnxruntime     ``geosurge.export.onnxruntime``          ``model.onnx``: fp32 / fp16 / int8 QDQ / int8 dynamic
tensorrt        ``geosurge.export.tensorrt``             ``model.onnx``: fp32 / fp16 / modelopt INT8 / FP8 QDQ
coreml          ``geosurge.export.coreml``               ``model.mlpackage``: mlprogram, fp32 / fp16 / compressed
==============  =======================================  ==========================================================
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from geosurge.errors import GeosurgeError
from geosurge.formats import Precision, Target, TargetSpec, check_precision, resolve_target
from geosurge.manifest import IOSection, ModelSection, QuantizationSection
from geosurge.registry import Registry

DEFAULT_OPSET = 17


@dataclass
class ExportOptions:
    """What to export, resolved once against ``geosurge.formats`` (target, format, precision) and checked there.

    ``quant`` (a :class:`geosurge.export.precision.QuantConfig`) carries the ONNX quantizers' settings (calibration
    method, excluded nodes, the precision search); its precision is ``precision``.
    """

    spec: TargetSpec
    precision: Precision
    quant: object = None
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    with_logits: bool = False
    table_dtype: str = "float16"
    threads: int | None = 2

    @property
    def target(self) -> Target:
        return self.spec.target

    @classmethod
    def create(cls, *, format: str | None = None, target: str | None = None, precision: str | None = None,
               quant=None, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, with_logits: bool = False,
               table_dtype: str = "float16", threads: int | None = 2) -> "ExportOptions":
        """Check a format / target / precision choice (GeosurgeError naming what is wrong) and fill the defaults:
        the target's default precision, a default QuantConfig."""
        from geosurge.runtime.cells import table_dtype as canonical_table

        from .precision import QuantConfig

        spec = resolve_target(format, target)
        if precision is None and quant is not None:
            precision = quant.precision
        p = check_precision(spec, precision)
        if quant is None:
            quant = QuantConfig(precision=p.value)
        elif quant.precision != p.value:
            raise GeosurgeError(f"precision {p} and the quantization config's {quant.precision} differ")
        if quant.search and spec.target != Target.ONNXRUNTIME:
            raise GeosurgeError(f"the precision search (--precision-search) measures onnxruntime CPU parity; "
                                f"{spec.flag} does not take it")
        if quant.qat and spec.target != Target.ONNXRUNTIME:
            raise GeosurgeError(f"--qat feeds onnxruntime's static INT8 (the CPU path); {spec.flag} does not take it")
        if opset < 17:
            raise GeosurgeError("opset must be >= 17 (LayerNormalization as one op)")
        if dynamic_batch and spec.target == Target.COREML:
            raise GeosurgeError(f"{spec.flag} exports a fixed 1 x 3 x S x S image input; --dynamic-batch is ONNX only")
        return cls(spec, p, quant, opset, dynamic_batch, with_logits, canonical_table(table_dtype), threads)


@dataclass
class ExportJob:
    """What a target gets besides the model: its options, where to write, and the data the precision step needs."""

    options: ExportOptions
    stage: Path  # the bundle's staging folder: write the model part here
    workdir: Path  # scratch, removed before the bundle is committed
    calibration: object = None  # CalibrationSet to calibrate on (int8 / fp8): the choose and check parts removed
    choose: object = None  # CalibrationSet the precision search / QAT comparison measures on (None: no choice)
    scorer: object = None  # the bundle's CellScorer, as the runtime will score
    gates: dict | None = None
    log: Callable[[str], None] = print
    #: how candidates are timed (``geosurge.export.onnxruntime.LatencyProbe``; None: measured on this machine)
    latency: Callable | None = None
    #: the FP32 torch model the choices are measured against (None: the exported model itself; a QAT checkpoint's
    #: teacher otherwise: its tuned FP32 weights are not the model the user trained)
    reference: object = None


@dataclass
class TargetOutput:
    """A target's contribution to the bundle."""

    model_file: str  # written into ``job.stage``
    model: ModelSection
    io: IOSection
    quantization: QuantizationSection
    provenance: dict = field(default_factory=dict)


class ExportTarget(ABC):
    """One export target. Subclasses set ``target`` and implement :meth:`export`."""

    target: ClassVar[Target]

    @abstractmethod
    def export(self, model, job: ExportJob) -> TargetOutput:
        """Write the model part for ``job.options.precision`` into ``job.stage`` and describe it. Raises
        GeosurgeError when the target cannot (its library missing, an unsupported graph, a failed search)."""


#: target -> its module's ExportTarget class (imported when asked for)
EXPORT_TARGETS = Registry("export target", {
    Target.ONNXRUNTIME.value: "geosurge.export.onnxruntime:OnnxRuntimeTarget",
    Target.TENSORRT.value: "geosurge.export.tensorrt:TensorRTTarget",
    Target.COREML.value: "geosurge.export.coreml:CoreMLTarget",
})


def get_target(target: Target | str) -> ExportTarget:
    return EXPORT_TARGETS.get(str(target))()
