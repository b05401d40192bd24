"""The bundle manifest as a typed contract (standard library + numpy-free; the device runtime reads it).

A bundle is one directory: ``manifest.json`` plus the parts it names. The manifest is written by one writer
(``geosurge.export.writer.BundleWriter``) and read through :class:`Manifest` by everything else — the runtime, the
TensorRT engine builder, workstation parity, pruning, the CLIs. Nobody reads ``manifest.json`` by raw keys.

Sections (JSON key: type):

==============  ============================  =====================================================================
key             type                          what
==============  ============================  =====================================================================
model           :class:`ModelSection`         format, target, precision, the model config, format facts (opset...)
quantization    :class:`QuantizationSection`  how the precision was made; ``check``: held-out parity vs FP32
calibration     :class:`CalibrationSummary`   the calibration set (int8 / fp8), else null
preprocess      ``PreprocessSpec``            the one preprocessing definition (``geosurge.preprocess``)
io              :class:`IOSection`            input / output names, shapes, dtypes
hierarchy       :class:`HierarchySection`     levels, sizes, digest of the cell hierarchy
cell_table      :class:`CellTableSection`     table storage dtype and dimensions
places          :class:`PlacesSection`        offline place names (optional part)
golden          :class:`GoldenSection`        golden probes with FP32 torch references
parity_gates    ``{gate: [op, threshold]}``   the gates ``verify`` and ``parity`` apply
source          :class:`SourceSection`        the FP32 model the bundle came from (checkpoint or config + seed)
provenance      ``{package: version}``        versions of the tools that wrote it
parts           ``{role: file}``              model, cells, cell_table, places, golden
files           ``{path: FileRecord}``        sha256 + bytes of every file (a folder part: each file inside)
pruning         :class:`PruningSection`       the cut, for a pruned bundle
backend_choice  :class:`BackendChoice`        the backend measured fastest at parity on the exporting machine
uncertainty     :class:`UncertaintySection`   the prediction's calibrated temperature (optional)
manifest_sha256 ``str``                       sha256 of the canonical JSON of everything else
==============  ============================  =====================================================================

Schema versions: 3 (this one) gates parity in kilometres (``parity_gates`` may name the task-level metrics of
``geosurge.parity``: tie-aware drift median / p95, top-1 agreement where FP32 is confident, accuracy deltas; a runtime
that reads only versions 1-2 would not know them, so it refuses the bundle by its version instead) and may record a
measured backend recommendation (``runtime``); 2 added output shapes to ``io`` and requires ``quantization.check`` for
every non-FP32 model; versions 1 and 2 are read (upgraded in memory: no output shapes, maybe no check; their gates
are evaluated as written); any other version is refused with a message naming it.
"""
from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, Union

from .errors import GeosurgeError
from .formats import TARGETS, Format, Precision, Target
from .preprocess import PreprocessSpec

SCHEMA = "geosurge.bundle"
SCHEMA_VERSION = 4
#: versions this code reads (older ones are upgraded in memory by :func:`upgrade`). 4: the places file's layout
#: is recorded (``places.layout``: the compact UTF-8 layout a schema-3 runtime cannot read); 3: km parity gates
READABLE_VERSIONS = (1, 2, 3, 4)

# ---- the bundle's file names (the only place they are spelled) ---------------------------------------------------
MANIFEST_FILE = "manifest.json"
MODEL_FILES = {Format.ONNX: "model.onnx", Format.COREML: "model.mlpackage"}
PART_FILES = {"cells": "cells.npz", "cell_table": "cell_table.npz", "places": "places.npz", "golden": "golden.npz"}
#: roles every bundle has (``places`` is optional)
REQUIRED_PARTS = ("model", "cells", "cell_table", "golden")
#: the TensorRT engine a device builds beside the bundle's ONNX (not a part: never shipped, never checksummed; its
#: JSON sidecar is ``geosurge.runtime.trt.sidecar_path``)
ENGINE_FILE = "model.plan"
#: a machine's measured backend recommendation beside a bundle (``geosurge.runtime.backends.choice``; not a part)
SIDECAR_FILE = "backend.json"


def parts_for(format: Format | str) -> dict[str, str]:
    """role -> file name of a bundle whose model part is ``format``."""
    return {"model": MODEL_FILES[Format(str(format))], **PART_FILES}


class BundleError(GeosurgeError):
    """A bundle that is missing, tampered with, or of another schema/backend; the message says which file."""


class ManifestError(BundleError):
    """A manifest that does not follow the schema; the message names the key (``model.precision: ...``)."""


# ---- typed sections ---------------------------------------------------------------------------------------------
class Section:
    """Base of the manifest's dataclasses: JSON keys are the field names. A field without a default is required
    (and always written, even when null); a field defaulting to None is left out of the JSON while None. Keys this
    version does not know are kept in ``extra`` and written back, so a round trip never loses data."""

    extra: dict

    @classmethod
    def from_dict(cls, d, where: str = ""):
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object, found {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs, known = {}, set()
        for f in fields(cls):
            if f.name == "extra":
                continue
            known.add(f.name)
            if f.name in d:
                kwargs[f.name] = _decode(hints[f.name], d[f.name], f"{where}.{f.name}")
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ManifestError(f"{where}.{f.name}: missing")
        obj = cls(**kwargs)
        obj.extra = {k: v for k, v in d.items() if k not in known}
        return obj

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            out[f.name] = _encode(v)
        out.update(getattr(self, "extra", None) or {})
        return out


def _decode(tp, value, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ManifestError(f"{where}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _decode(a, value, where)
            except ManifestError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, found {type(value).__name__}")
        (arg,) = typing.get_args(tp)
        return [_decode(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ManifestError(f"{where}: expected a list of {len(args)}")
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, found {type(value).__name__}")
        arg = typing.get_args(tp)[1] if origin is dict else Any
        return {str(k): _decode(arg, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp.from_dict(value, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ManifestError(f"{where}: {value!r} is not one of {', '.join(m.value for m in tp)}") from None
    if tp is PreprocessSpec:
        try:
            return PreprocessSpec.from_dict(value)
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{where}: not a preprocessing spec ({e})") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ManifestError(f"{where}: expected true/false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where}: expected an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ManifestError(f"{where}: expected a string, found {value!r}")
        return value
    raise TypeError(f"{where}: no decoder for {tp!r}")  # a programming error in a Section's annotations


def _encode(v):
    if isinstance(v, Section):
        return v.to_dict()
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, PreprocessSpec):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


@dataclass
class TensorInfo(Section):
    """One model input or output. ``shape``: ints, or a name for a dynamic axis (``"batch"``); None when unknown
    (schema 1 wrote no output shapes)."""

    name: str
    dtype: str | None = None
    shape: list[int | str] | None = None
    layout: str | None = None
    #: Core ML: the input is an image type, not a tensor (the normalisation is inside the model)
    type: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class IOSection(Section):
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def embedding(self) -> TensorInfo:
        """The L2-normalised embedding output (the first output)."""
        return self.outputs[0]

    @property
    def static_batch(self) -> int | None:
        """The input's fixed batch size, or None for a dynamic batch axis."""
        shape = self.input.shape or [None]
        return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None


@dataclass
class ModelSection(Section):
    format: Format
    precision: Precision
    target: Target
    #: ``GeoSurgeConfig.to_dict()`` of the exported model
    config: dict
    opset: int | None = None
    layernorm_ops: int | None = None
    #: Core ML package facts (``geosurge.export.coreml.inspect_mlpackage``)
    coreml: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class ParityRecord(Section):
    """Parity of the deployed model against its FP32 reference on images the quantizer did not calibrate on.
    ``passed`` is None when it could not be measured on the exporting machine (``skipped`` says why)."""

    passed: bool | None
    metrics: dict | None = None
    gates: list[dict] | None = None
    images: int | None = None
    #: what the deployed model was run with and compared to
    runner: str | None = None
    reference: str | None = None
    skipped: str | None = None
    #: the backend's run-time options that change numerics (OpenVINO's ``INFERENCE_PRECISION_HINT``, ...)
    runner_options: dict | None = None
    #: how the images were set aside: ``{"calibrate": n, "choose": n, "check": n, "ground_truth": bool}`` (disjoint)
    split: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def failed_gates(self) -> list[str]:
        """Gates that FAILed (a gate skipped for want of ground truth is not a failure)."""
        return [g["gate"] for g in self.gates or [] if g.get("pass") == "FAIL"]


@dataclass
class BackendChoice(Section):
    """Which backend runs this bundle fastest at parity, as measured on one machine (``geosurge.runtime.backends.
    choice``): the runtime's default backend follows it only on a machine with the same ``machine`` fingerprint and
    with that backend installed."""

    backend: str
    #: ``geosurge.runtime.backends.choice.machine_fingerprint()`` of the machine that measured
    machine: str
    reason: str
    #: one row per contender: backend, options, p50_ms, p95_ms, speedup vs onnxruntime, parity passed
    measured: list[dict] = field(default_factory=list)
    min_speedup: float | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class BuilderHints(Section):
    """TensorRT builder flags a QDQ / FP16 network needs on TensorRT 10 (weakly typed)."""

    flags: list[str]
    note: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class QuantizationSection(Section):
    """How the model part got its precision. Target-specific facts (quantizer, op types, the precision search,
    latency vs FP32, ...) are kept as further keys in ``extra``."""

    precision: Precision
    config: dict | None = None
    check: ParityRecord | None = None
    builder: BuilderHints | None = None
    readiness: dict | None = None
    calibration: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class CalibrationSummary(Section):
    size: int
    digest: str
    stratified: bool
    skipped_undecodable: int = 0
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class HierarchySection(Section):
    levels: int
    sizes: list[int]
    digest: str
    tau_max: Any = None
    tau_min: Any = None
    #: a pruned bundle: which levels of the source hierarchy the kept levels are
    source_levels: list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, hierarchy, source_levels: list[int] | None = None) -> "HierarchySection":
        """The summary of a ``geosurge.geo.CellHierarchy``."""
        return cls(levels=hierarchy.num_levels, sizes=list(hierarchy.sizes), digest=hierarchy.digest(),
                   tau_max=hierarchy.meta.get("tau_max"), tau_min=hierarchy.meta.get("tau_min"),
                   source_levels=source_levels)


@dataclass
class CellTableSection(Section):
    dtype: str
    embed_dim: int
    #: columns of the stored table when it is PCA-projected (``embed_dim`` otherwise)
    table_dim: int | None = None
    pca: bool | None = None
    pca_energy: float | None = None
    outside_probes: int | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return self.table_dim if self.table_dim is not None else self.embed_dim


@dataclass
class UncertaintySection(Section):
    """How the prediction's probabilities are calibrated (``geosurge.export.uncertainty``): ``p(f) ∝ exp(A(f) /
    temperature)`` over the finest cells, the temperature minimising the NLL of the true cell (``nll``;
    ``nll_before`` at 1) on ``images`` held-out images; ``coverage``: the share of them whose truth lay within the
    radius holding ``mass`` of the probability (``coverage_before`` at temperature 1)."""
    temperature: float
    mass: float
    images: int
    coverage: float
    coverage_before: float | None = None
    nll: float | None = None
    nll_before: float | None = None
    median_radius_km: float | None = None
    median_radius_km_before: float | None = None
    median_error_km: float | None = None
    #: the images it was fitted on (a manifest path, as given)
    source: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class PlacesSection(Section):
    places: int
    source: str
    #: the places file's layout (``geosurge.runtime.places.LAYOUTS``); None: written before layouts were recorded
    #: (numpy ``<U`` columns)
    layout: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class GoldenSection(Section):
    count: int
    names: list[str]
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class SourceSection(Section):
    """The FP32 torch model behind the bundle: a checkpoint directory, or a named config built from ``seed``."""

    checkpoint: str | None
    config: str | None
    seed: int | None
    #: the FP32 checkpoint the golden outputs and parity were measured against when it is not ``checkpoint``: the
    #: model a QAT checkpoint was distilled from (its tuned FP32 weights are not the user's model)
    reference: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class FileRecord(Section):
    sha256: str
    bytes: int
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class PruningSection(Section):
    cut: dict
    describe: str
    source_manifest_sha256: str
    source_hierarchy_digest: str
    source_sizes: list[int]
    kept_per_source_level: list[int]
    extra: dict = field(default_factory=dict, repr=False)


Gate = tuple[str, float]


@dataclass
class Manifest(Section):
    """The whole manifest. Build one with the sections, ``to_dict()`` it; read one with :meth:`from_dict` (which
    upgrades schema 1, then :meth:`validate`\\ s)."""

    model: ModelSection
    quantization: QuantizationSection | None
    calibration: CalibrationSummary | None
    preprocess: PreprocessSpec
    io: IOSection
    hierarchy: HierarchySection
    cell_table: CellTableSection
    golden: GoldenSection
    parity_gates: dict[str, Gate]
    source: SourceSection
    provenance: dict[str, Any]
    parts: dict[str, str]
    created: str
    places: PlacesSection | None = None
    pruning: PruningSection | None = None
    #: a measured backend recommendation (schema 3; optional)
    backend_choice: BackendChoice | None = None
    #: the prediction's calibrated temperature (optional; absent: probabilities at temperature 1)
    uncertainty: UncertaintySection | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    manifest_sha256: str | None = None
    extra: dict = field(default_factory=dict, repr=False)
    #: the version the JSON was written with (1 for an upgraded bundle); not written back
    read_version: int = field(default=SCHEMA_VERSION, repr=False, compare=False)

    # ---- reading and writing -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d, where: str = "manifest") -> "Manifest":
        check_schema(d, where)
        version = d["schema_version"]
        m = super().from_dict(upgrade(d), where)
        m.read_version = version
        m.validate(where)
        return m

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("read_version", None)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def digest(self) -> str:
        return manifest_digest(self.to_dict())

    def seal(self) -> "Manifest":
        """Set ``manifest_sha256`` over the rest (the files table included)."""
        self.manifest_sha256 = None
        self.manifest_sha256 = self.digest()
        return self

    def validate(self, where: str = "manifest") -> "Manifest":
        """Cross-section rules the types alone do not say; raises ManifestError naming the key."""
        if self.schema != SCHEMA:
            raise ManifestError(f"{where}: not a geosurge bundle manifest (schema {self.schema!r})")
        spec = TARGETS[self.model.target]
        if spec.format != self.model.format:
            raise ManifestError(f"{where}.model: target {self.model.target} writes {spec.format}, not "
                                f"{self.model.format}")
        if self.model.precision not in spec.precisions:
            raise ManifestError(f"{where}.model.precision: {self.model.precision} is not a precision of target "
                                f"{self.model.target} ({', '.join(p.value for p in spec.precisions)})")
        missing = [r for r in REQUIRED_PARTS if r not in self.parts]
        if missing:
            raise ManifestError(f"{where}.parts: no {', '.join(missing)}")
        if not self.io.inputs or not self.io.outputs:
            raise ManifestError(f"{where}.io: needs at least one input and one output")
        if len(self.hierarchy.sizes) != self.hierarchy.levels:
            raise ManifestError(f"{where}.hierarchy: {self.hierarchy.levels} levels but {len(self.hierarchy.sizes)} "
                                "sizes")
        if self.golden.count != len(self.golden.names):
            raise ManifestError(f"{where}.golden: count {self.golden.count} but {len(self.golden.names)} names")
        u = self.uncertainty
        if u is not None and not (0 < u.temperature < float("inf") and 0 < u.mass < 1):
            raise ManifestError(f"{where}.uncertainty: temperature must be > 0 and mass in (0, 1), not "
                                f"{u.temperature!r} / {u.mass!r}")
        bad = [k for k, (op, _) in self.parity_gates.items() if op not in (">=", "<=")]
        if bad:
            raise ManifestError(f"{where}.parity_gates: {bad[0]}: the operator must be >= or <=")
        if self.quantization is not None and self.quantization.precision != self.model.precision:
            raise ManifestError(f"{where}.quantization.precision: {self.quantization.precision} but the model is "
                                f"{self.model.precision}")
        if (self.read_version >= 2 and self.model.precision != Precision.FP32
                and (self.quantization is None or self.quantization.check is None)):
            raise ManifestError(f"{where}.quantization.check: a {self.model.precision} model must record its "
                                "held-out parity against FP32")
        if self.files:
            for role, name in self.parts.items():
                if name not in self.files and not any(f.startswith(name + "/") for f in self.files):
                    raise ManifestError(f"{where}.files: no checksum for the {role} part {name}")
        return self

    # ---- questions every reader asks -----------------------------------------------------------------------------
    def gates(self) -> dict[str, tuple[str, float]]:
        """The parity gates (``geosurge.parity.evaluate_gates`` form)."""
        return {k: (op, float(t)) for k, (op, t) in self.parity_gates.items()}

    def file_record(self, role: str) -> FileRecord:
        """The checksum record of a single-file part (``model`` of an ONNX bundle, ``cells``, ...)."""
        try:
            return self.files[self.parts[role]]
        except KeyError:
            raise BundleError(f"the manifest has no checksum for a {role!r} file") from None

    @property
    def check(self) -> ParityRecord | None:
        """The held-out parity record of the export (None for FP32)."""
        return self.quantization.check if self.quantization is not None else None

    @property
    def is_pruned(self) -> bool:
        return self.pruning is not None


def check_schema(d, where: str = "manifest") -> None:
    """Refuse what is not a geosurge manifest of a version this code reads, naming the version found."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        found = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise ManifestError(f"{where}: not a geosurge bundle manifest (schema {found!r})")
    v = d.get("schema_version")
    if v not in READABLE_VERSIONS:
        raise ManifestError(f"{where}: bundle schema version {v} is not supported by this runtime (reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}); re-export or upgrade geosurge")


def upgrade(d: dict) -> dict:
    """A schema-1, -2 or -3 manifest as the current schema (in memory; the JSON on disk and its checksum are untouched).
    Version 1 had no output shapes (read as unknown) and, for TensorRT-bound and Core ML models, no held-out parity
    record (read as not measured, saying why). Versions 1 and 2 keep the gates they were written with (embedding
    cosine, per-level agreement, median drift): ``geosurge.parity`` still computes every one of them."""
    if d.get("schema_version") == SCHEMA_VERSION:
        return d
    d = {**d, "schema_version": SCHEMA_VERSION}
    q = d.get("quantization")
    if isinstance(q, dict) and q.get("precision", "fp32") != "fp32" and "check" not in q:
        d["quantization"] = {**q, "check": {"passed": None, "skipped": "not recorded (a schema 1 bundle)"}}
    return d


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field: a changed byte anywhere in
    manifest.json is caught, as for every other file."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_entries(folder) -> set[str] | None:
    """The names of the entries of ``folder`` a bundle writer wrote there — ``manifest.json``, the folders and files
    its ``files`` list, a TensorRT engine built beside them, a backend recommendation — or None when ``folder`` holds
    no geosurge bundle manifest (for ``geosurge.fsutil.check_replaceable``)."""
    from pathlib import Path

    try:
        d = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA or not isinstance(d.get("files"), dict):
        return None
    return {MANIFEST_FILE, ENGINE_FILE, SIDECAR_FILE} | {str(name).split("/")[0] for name in d["files"]}
