"""ONNX Runtime runner (CPU by default; CUDA when onnxruntime-gpu is installed and asked for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Backend, Precision
from geosurge.privacy import import_onnxruntime

from ..memory import release_freed_heap
from . import BackendUnavailable, Runner

#: whether the model session's idle worker threads busy-wait for the next parallel section (ORT's
#: ``session.intra_op.allow_spinning``). Off: measured on 2 shared cores (benchmarks/cell_search.py), spinning
#: workers burnt ~60 ms of a core after each inference and made both the model and the work after it slower, paced
#: (10 fps) and back-to-back, p50 and p95. Re-measured 2026-12-01 (onnxruntime 1.32, AVX-512 machine, 12 MP JPEG
#: through ``locate``, paced 100 ms, interleaved): spinning makes inference x1.1-1.2 faster (5.74 vs 6.80 ms p50) and
#: slows nothing after it, but doubles the CPU a paced call uses (59.5 vs 28 ms a call: a core kept busy ~30 ms after
#: each inference): off stays the default for battery- and thermally-bound devices. None keeps ONNX Runtime's default
#: (on).
SPINNING: bool | None = False
#: ONNX Runtime's memory pattern (``SessionOptions.enable_mem_pattern``: one pre-planned block for the activations
#: of each input shape, kept between calls). Off: measured on the edge FP32 bundle (docs/benchmarks.md, "Runtime
#: peak RSS"), ~2 MB less resident with no change of locate latency (A/B, interleaved). None keeps the default (on).
MEM_PATTERN: bool | None = False
#: onnxruntime graph transformers every session here runs without. ``WeightBiasQuantization`` (onnxruntime >= 1.21,
#: widened in 1.23 to ``DQ -> Conv -> activation -> Q``) gives each Conv / Gemm whose input comes from a
#: DequantizeLinear and whose output reaches a QuantizeLinear symmetric **per-tensor** INT8 weights, so it turns the
#: nodes a QDQ bundle keeps float on purpose (the precision search's, QAT's kept-float first block) into INT8 nodes
#: with a coarser weight grid than any the export chose. Measured on the reference model (64 views, onnxruntime
#: 1.32): the first depthwise Conv kept float, cosine to FP32 0.772 with it, 0.980 without — the same as
#: onnxruntime without graph optimisations (0.980) and OpenVINO (0.977), which keep the node float; on graphs with
#: no float Conv / Gemm between quantized tensors it changes nothing. Unknown names are ignored by onnxruntime.
DISABLED_OPTIMIZERS: tuple[str, ...] = ("WeightBiasQuantization",)


def int8_saturates() -> bool | None:
    """Whether onnxruntime's u8 x s8 kernels on this CPU sum pairs of products into int16 with saturation (x86 without
    VNNI / AMX-INT8: ``vpmaddubsw``; onnxruntime's quantization docs, "reduce_range"): True there; False on x86
    with AVX512-VNNI / AVX-VNNI / AMX-INT8 and on ARM (dot-product or widening multiplies accumulate exactly); None
    when the CPU's flags cannot be read (x86 off Linux)."""
    import platform

    from .choice import _cpu

    arch = platform.machine().lower()
    if arch in ("arm64", "aarch64") or arch.startswith("arm"):
        return False
    if arch not in ("x86_64", "amd64", "i386", "i686"):
        return None
    _, flags = _cpu()
    if not flags:
        return None
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


class OnnxRuntimeRunner(Runner):
    """onnxruntime InferenceSession; ``threads`` sets the intra-op thread count (one inter-op thread);
    ``spinning`` whether idle intra-op threads busy-wait (default :data:`SPINNING`).

    ``simulate_int8``: run a QDQ (INT8) graph with onnxruntime's graph optimisations off, so no QuantizeLinear /
    DequantizeLinear pair is fused into an integer kernel: each runs as float arithmetic around a float Conv /
    MatMul (simulated quantization). The result is the quantization grid with exact integer accumulation — what
    TensorRT, CPUs with VNNI / AMX and ARM dot-product kernels compute — rather than this CPU's kernels (x86
    without VNNI sums pairs of u8 x s8 products in int16 with saturation; docs/quantization.md). For accuracy
    only: it runs several times slower than the deployed graph (4.3x on the reference model, docs/quantization.md)."""

    name = Backend.ONNXRUNTIME
    thread_option = "intra_op_num_threads"
    option_names = ("simulate_int8",)

    def __init__(self, model_path: Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool | None = None, simulate_int8: bool = False):
        ort = import_onnxruntime()

        threads = self.check_threads(threads)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        spinning = SPINNING if spinning is None else spinning
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if MEM_PATTERN is not None:
            opts.enable_mem_pattern = MEM_PATTERN
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if simulate_int8
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        avail = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers,
                                                disabled_optimizers=set(DISABLED_OPTIMIZERS))
        except Exception as e:  # onnxruntime's own exception types (Fail, NotImplemented, InvalidGraph, ...)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackendUnavailable(f"{model_path}: onnxruntime {ort.__version__} cannot load this model "
                                     f"({reason})") from None
        release_freed_heap()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__
        self.providers = self.session.get_providers()
        self.options = {"providers": self.providers, "intra_op_num_threads": threads, "onnxruntime": ort.__version__,
                        "disabled_optimizers": list(DISABLED_OPTIMIZERS)}
        if simulate_int8:
            self.options["simulate_int8"] = True

    @classmethod
    def open(cls, bundle, threads: int | None = None, **options) -> "OnnxRuntimeRunner":
        """Raises GeosurgeError for ``simulate_int8`` on a bundle whose model is not INT8 QDQ."""
        options = cls.check_options(options)
        simulate = bool(options.get("simulate_int8"))
        precision = bundle.manifest.model.precision
        if simulate and precision is not Precision.INT8:
            raise GeosurgeError(f"{bundle.root}: simulated INT8 needs an INT8 (QDQ) bundle; this one is "
                                f"{precision.value}")
        return cls(bundle.path("model"), threads=threads, simulate_int8=simulate)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        outs = self.session.run(None, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feed.items()})
        return dict(zip(self.output_names, outs))

    def _release(self) -> None:
        self.session = None
