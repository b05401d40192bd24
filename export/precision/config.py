"""The quantization settings (``QuantConfig``) and the policy of which ONNX ops are quantized and which stay float.

What stays in float by default: only Conv / MatMul / Gemm are ever quantized, so LayerNormalization, Softmax, the
residual Adds and GELU (Erf) keep float; nodes of the cell head (``/head/...``, present with ``--with-logits``) are
always excluded (measured on a ViT + fusion model: quantizing the cell table, or its softmax, dropped top-1
retrieval to 5%).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from geosurge.errors import GeosurgeError
from geosurge.fsutil import check_replaceable
from geosurge.formats import Precision

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: the compute ops quantized (ranked, and excluded, by the precision search) ...
COMPUTE_OP_TYPES = ("Conv", "MatMul", "Gemm")
#: ... and the clamps that follow them (folded into the producer's output range; they follow its choice). Everything
#: else (LayerNorm, Softmax, Add, Erf/GELU, ...) stays float.
FOLLOWER_OP_TYPES = ("Clip", "Relu")
STATIC_OP_TYPES = COMPUTE_OP_TYPES + FOLLOWER_OP_TYPES
#: MatMul/Gemm outputs are left unquantized: in the transformer parts they feed Softmax, GELU, residual Adds and
#: LayerNorm, which must see float (onnxruntime then runs DQ->MatMul as MatMulIntegerToFloat). Conv outputs stay
#: quantized so conv chains run as QLinearConv.
FLOAT_OUTPUT_OP_TYPES = ("MatMul", "Gemm")
#: ops that must read exact float inputs even when their producer's output is quantized (a Conv feeding the
#: segmentation softmax): their inputs are rewired around the Q/DQ pair after quantization
FLOAT_INPUT_OP_TYPES = ("LayerNormalization", "Softmax", "Erf", "Gelu", "ReduceL2")
#: a node kept out of INT8 compute keeps INT8 weights (weight-only) only if that alone costs at most this much
#: embedding cosine (measured per node by the search); else its weights stay float
WEIGHT_ONLY_MAX_ERROR = 1e-4
#: dynamic: MatMul and Gemm (onnxruntime's dynamic quantizer rewrites a Gemm into ``<name>_MatMul`` + Add first,
#: so exclusions name both). It runs on the unfused export. Dynamic Conv (ConvInteger) is slow on CPU.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
#: ONNX node-name prefixes that are never quantized (the cell head: scoring against the table is retrieval)
ALWAYS_FLOAT_PREFIXES = ("/head/",)
#: MatMuls of two activations (attention: queries x keys, softmax probabilities x values) are never quantized: no
#: weight, a few MFLOP against the convolutions' hundreds, and their uint8 grid rounds attention probabilities to
#: steps of 1/255 that QAT's student (which fake-quantizes Conv / Linear only) cannot train for. Measured on the
#: reference model's QAT weights: docs/quantization.md "What stays in float by default"
FLOAT_ACTIVATION_MATMULS = True
QUANT_TYPES = ("uint8", "int8")


@dataclass
class QuantConfig:
    """How an ONNX model part is quantized. ``precision`` is any precision of ``geosurge.formats.Precision``;
    which ones a target takes is checked once, by ``geosurge.formats.check_precision``."""

    precision: str = "int8"
    calibrate_method: str = "minmax"
    per_channel: bool = True
    #: U8 activations / S8 weights: the fast pairing on x86 VNNI CPUs (measured on EfficientNet-Lite0, batch 1, 2
    #: threads: 2.4 ms, where S8 activations ran 8.6 ms, slower than FP32's 3.9)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    nodes_to_exclude: list[str] = field(default_factory=list)
    search: str | None = None  # None or "auto"
    #: weights of the nodes kept out of INT8 compute: "int8" = weight-only INT8 (per-channel, dequantized to float
    #: for the compute: a quarter of the bytes, far smaller error than activation quantization), "fp32" = float
    excluded_weights: str = "int8"
    #: nodes kept out of INT8 whose weights stay float whatever ``excluded_weights`` says: the ones a QAT student
    #: trained float (weight-only INT8 rounds weights it never saw rounded: on the reference model with its first
    #: block kept float, cosine 0.974 with them rounded, 0.993 float, on 200 views QAT never saw)
    float_weight_nodes: list[str] = field(default_factory=list)
    #: weights of the nodes kept out by hand (``nodes_to_exclude``): "fp32" = float compute on float weights,
    #: "int8" = weight-only INT8 (a quarter of the bytes). Not measured per node as the search's are, so float by
    #: default: on the reference model (onnxruntime 1.32, AVX-512 VNNI) 12 hand-excluded nodes ran x1.15 FP32 with
    #: weight-only INT8 (a DequantizeLinear of their weights at every run) and x1.58 with float weights, and the
    #: worst node's weight-only error alone was 2.4e-2 (1 - cosine)
    exclude_nodes_weights: str = "fp32"
    #: static int8: subtract each INT8-weight node's mean output error (its rounded weights times the FP32 mean
    #: input, over the calibration images) from its bias (:mod:`.bias_correction`); never for a QAT graph
    bias_correction: bool = True
    #: why it is off when something other than ``--no-bias-correction`` turned it off (a QAT graph), for the record
    #: (``quantization.bias_correction.why``)
    bias_correction_off: str | None = None
    #: the exported weights are a QAT checkpoint's (:meth:`for_qat_checkpoint`): its INT8 graph is named for them
    from_qat_checkpoint: bool = False
    #: the share of the calibration set kept for the parity check (never calibrated on, never chosen on) ...
    holdout: float = 0.25
    #: ... and the share the precision search / QAT comparison chooses the mix on (when there is a choice)
    choose: float = 0.25
    seed: int = 0
    #: an int8 / int8-dynamic model must run faster than FP32 by more than this ratio on the exporting machine
    #: (measured interleaved and paced); 0 turns the speed gate off
    min_speedup: float = 1.0
    #: quantization-aware distillation when all-INT8 PTQ fails the gates (static int8; ``geosurge.export.precision.qat``)
    qat: bool = False
    qat_steps: int = 200
    qat_lr: float = 2e-5
    #: weight of QAT's ranking loss on the finest cells (``QATConfig.rank_weight``; 0: embedding cosine + per-level
    #: KL only)
    qat_rank_weight: float = 0.0
    #: a folder to save QAT's tuned FP32 weights in as a geosurge checkpoint (None: not kept). Exporting that
    #: checkpoint with ``--precision int8`` (and the same ``--reduce-range``) gives the QAT graph without training
    #: again
    qat_save: str | None = None
    #: a checkpoint of the same model to start the student from (a ``qat_save`` of an earlier run): more steps
    #: without starting over; the teacher is still the exported model (None: the student starts as the teacher)
    qat_init: str | None = None
    #: the checkpoint of the model QAT learns from (the exported one; None: not from a checkpoint), recorded with
    #: ``qat_save`` so that an export of that checkpoint measures parity against it, not against the tuned weights
    qat_teacher: str | None = None
    #: onnxruntime's ``reduce_range``: 7-bit weights, which x86 CPUs without VNNI multiply without int16 saturation
    reduce_range: bool = False
    #: choose and check the INT8 model as simulated INT8 (QDQ as float arithmetic: exact integer accumulation, as
    #: ARM dot-product, VNNI / AMX and TensorRT kernels compute), not on this CPU's kernels (which saturate on x86
    #: without VNNI): for a deployment device unlike the exporting machine. Speed is still timed on this CPU
    simulate_int8: bool = False

    def __post_init__(self):
        try:
            self.precision = Precision(str(self.precision)).value
        except ValueError:
            raise GeosurgeError(f"unknown precision {self.precision!r}; choose from "
                                f"{', '.join(p.value for p in Precision)}") from None
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise GeosurgeError(f"unknown calibration method {self.calibrate_method!r}; choose from "
                                f"{', '.join(CALIBRATION_METHODS)}")
        if self.activation_type not in QUANT_TYPES or self.weight_type not in QUANT_TYPES:
            raise GeosurgeError(f"activation/weight types must be one of {QUANT_TYPES}")
        if self.excluded_weights not in ("int8", "fp32"):
            raise GeosurgeError("excluded_weights must be int8 or fp32")
        if self.exclude_nodes_weights not in ("int8", "fp32"):
            raise GeosurgeError(f"--exclude-nodes-weights must be fp32 or int8, not {self.exclude_nodes_weights!r}")
        if self.search not in (None, "auto"):
            raise GeosurgeError(f"unknown precision search {self.search!r} (use 'auto')")
        if self.search and self.precision not in ("int8", "int8-dynamic"):
            raise GeosurgeError("--precision-search auto applies to --precision int8 and int8-dynamic")
        if self.qat and self.precision != "int8":
            raise GeosurgeError("--qat applies to --precision int8 (static QDQ)")
        if self.simulate_int8 and self.precision != "int8":
            raise GeosurgeError("--simulate-int8 applies to --precision int8 (static QDQ)")
        if self.qat_save is not None and not self.qat:
            raise GeosurgeError("--qat-save needs --qat")
        if self.qat_save is not None:  # before QAT trains for minutes: never a user's folder or file
            from geosurge.models.geosurge import checkpoint_entries

            check_replaceable(self.qat_save, "geosurge checkpoint", checkpoint_entries)
        if self.qat_init is not None and not self.qat:
            raise GeosurgeError("--qat-init needs --qat")
        if self.qat_init is not None and not (Path(self.qat_init) / "config.json").is_file():
            raise GeosurgeError(f"{self.qat_init}: --qat-init is not a geosurge checkpoint (no config.json)")
        if self.qat_steps < 1 or not self.qat_lr > 0:
            raise GeosurgeError("--qat-steps must be >= 1 and the QAT learning rate > 0")
        if self.qat_rank_weight < 0:
            raise GeosurgeError(f"--qat-rank-weight must be >= 0, not {self.qat_rank_weight}")
        if self.qat_rank_weight and not self.qat:
            raise GeosurgeError("--qat-rank-weight needs --qat")
        if self.min_speedup < 0:
            raise GeosurgeError(f"--min-speedup must be >= 0 (0: no speed gate), not {self.min_speedup}")
        if not (0 < self.holdout < 1 and 0 <= self.choose < 1 and self.holdout + self.choose < 1):
            raise GeosurgeError("the check and choose shares must be in (0, 1) and leave images to calibrate on")

    @property
    def chooses(self) -> bool:
        """Whether a choice is made on measured parity (the precision search, or QAT vs PTQ)."""
        return bool(self.search or self.qat)

    @property
    def speed_gated(self) -> bool:
        """int8 / int8-dynamic exist for CPU speed: they must beat FP32 (fp16 on a CPU target is for GPUs)."""
        return self.precision in ("int8", "int8-dynamic") and self.min_speedup > 0

    @property
    def needs_calibration(self) -> bool:
        return Precision(self.precision).needs_calibration

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self, target: str = "onnxruntime") -> dict:
        """The settings this precision's export on ``target`` read, for the manifest (``quantization.config``):
        FP32 / FP16 / Core ML's weight compressions record their precision only; a calibrated precision (int8,
        fp8) its calibration method, check share and split seed; ``choose`` where a choice was made (the search,
        QAT); the hand exclusions (``nodes_to_exclude``) where a precision takes them, ``exclude_nodes_weights``
        only with hand exclusions and ``excluded_weights`` only with the search (the weights of the nodes each kept
        out); QAT's settings only when QAT ran; the onnxruntime quantizer's settings on onnxruntime only.
        ``to_dict`` has every field."""
        p = Precision(self.precision)
        keep = {"precision"}
        if p in (Precision.INT8, Precision.FP8) or (p == Precision.INT8_DYNAMIC and target == "onnxruntime"):
            keep.add("nodes_to_exclude")
        if p.needs_calibration:
            keep |= {"calibrate_method", "holdout", "seed"}
        if self.chooses:
            keep |= {"choose", "seed"}
        if target == "onnxruntime" and p in (Precision.INT8, Precision.INT8_DYNAMIC):
            keep |= {"per_channel", "search", "min_speedup"}
            keep |= {"excluded_weights"} if self.search else set()
            keep |= {"exclude_nodes_weights"} if self.nodes_to_exclude else set()
            keep |= {"float_weight_nodes"} if self.float_weight_nodes else set()
            if p == Precision.INT8:
                keep |= {"activation_type", "weight_type", "bias_correction", "reduce_range", "simulate_int8", "qat"}
                keep |= {"bias_correction_off"} if self.bias_correction_off else set()
                keep |= {"from_qat_checkpoint"} if self.from_qat_checkpoint else set()
                if self.qat:
                    keep |= {"qat_steps", "qat_lr", "qat_rank_weight", "qat_save", "qat_init", "qat_teacher"}
        return {k: v for k, v in asdict(self).items() if k in keep}

    def for_qat_checkpoint(self, qat: dict | None, log=print) -> "QuantConfig":
        """This config for exporting a checkpoint that QAT saved (``--qat-save``; ``qat``: the ``"qat"`` record of its
        ``config.json``, None for any other checkpoint — then the config comes back unchanged, as it does for
        ``--qat`` or a precision other than int8). The nodes its student trained float (``kept_float_nodes``) stay
        out of INT8 with float weights when no ``--exclude-nodes`` is given; a log line names what differs when
        the given nodes, or the weight bits (``--reduce-range``: 7), are not what it trained for. No bias
        correction: the student's biases already absorbed its rounded weights' mean error."""
        if not qat or self.precision != "int8" or self.qat:
            return self
        kept = list(qat.get("kept_float_nodes") or [])
        nodes = list(self.nodes_to_exclude)
        if not nodes and kept:
            nodes = kept
            log(f"a QAT checkpoint: its {len(kept)} node(s) trained float stay out of INT8, with float weights "
                "(--exclude-nodes overrides)")
        elif set(nodes) != set(kept):
            log(f"warning: this QAT checkpoint trained with {len(kept)} node(s) float; --exclude-nodes gives "
                f"{len(set(nodes) - set(kept))} other(s) and leaves out {len(set(kept) - set(nodes))} of them: "
                "those nodes deploy in a precision the student never trained for")
        bits = qat.get("weight_bits")
        if bits in (7, 8) and (bits == 7) != self.reduce_range:
            log(f"warning: this QAT checkpoint trained for {bits}-bit weights; "
                f"{'add' if bits == 7 else 'drop'} --reduce-range to deploy what it trained for")
        if self.bias_correction:
            log("a QAT checkpoint: no bias correction (its student trained under the rounded weights)")
        return replace(self, nodes_to_exclude=nodes, float_weight_nodes=[n for n in nodes if n in kept],
                       bias_correction=False, from_qat_checkpoint=True,
                       bias_correction_off="a QAT checkpoint (its student trained under the rounded weights)")
