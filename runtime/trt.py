"""TensorRT engines, built on the device from a bundle's TensorRT-bound ONNX (TensorRT 10 and 11), their JSON
sidecars, and the CUDA calls the backend needs (cuda-python; never torch).

Engines are not portable across TensorRT versions or GPUs: the plan is written as it comes out of
``build_serialized_network`` (no header inside it, so trtexec and Triton load it too) and a sidecar
``<plan>.json`` records the TensorRT version, the GPU name and compute capability, JetPack / L4T when present, the
builder settings and the sha256 of the ONNX it came from. The backend refuses a plan whose sidecar does not match.
"""
from __future__ import annotations

import json
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from geosurge.errors import GeosurgeError
from geosurge.formats import Format
from geosurge.manifest import ENGINE_FILE, QuantizationSection, sha256_file

from .backends import BackendUnavailable

SIDECAR_SCHEMA = "geosurge.trt-engine"


@dataclass
class BuildSettings:
    fp16: bool = False
    int8: bool = False  # QDQ (explicit) INT8 on TensorRT 10 weakly typed networks
    fp8: bool = False
    workspace_gb: float = 2.0
    dla_core: int | None = None
    timing_cache: str | None = None
    strongly_typed: bool | None = None  # None: TensorRT 11+ -> True, 10 -> False
    keep_fp32_layers: list[str] = field(default_factory=lambda: ["NORMALIZATION", "SOFTMAX"])
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed here: it comes with JetPack on a Jetson (TensorRT 10.3 on "
                                 "JetPack 6.x) or NVIDIA's pip index on an x86 GPU machine; PyPI's 'tensorrt' here is "
                                 "a stub") from None
    return trt


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


def settings_for_bundle(quantization: QuantizationSection | None, requested: BuildSettings) -> BuildSettings:
    """Builder flags from the bundle's quantization record (``manifest.quantization``): a QDQ INT8 / FP8 network
    needs the matching flag on TensorRT 10 (weakly typed), and FP16 for its float parts (modelopt writes them in
    fp16)."""
    s = BuildSettings(**asdict(requested))
    builder = quantization.builder if quantization is not None else None
    flags = builder.flags if builder is not None else []
    s.fp16 = s.fp16 or "FP16" in flags
    s.int8 = s.int8 or "INT8" in flags
    s.fp8 = s.fp8 or "FP8" in flags
    return s


def sidecar_path(plan_path: Path) -> Path:
    """``<plan>.json`` beside a plan (``model.plan.json`` for the bundle's own engine)."""
    plan_path = Path(plan_path)
    return plan_path.with_suffix(plan_path.suffix + ".json")


def device_facts() -> dict:
    """GPU name and compute capability (cuda-python), Jetson L4T / JetPack release when present."""
    facts: dict = {"machine": platform.machine()}
    try:
        cudart = _cudart()
        prop = _check(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
        facts.update(gpu=name.strip("\x00 "), compute_capability=f"{prop.major}.{prop.minor}")
    except BackendUnavailable as e:
        facts["gpu_error"] = str(e)
    rel = Path("/etc/nv_tegra_release")
    if rel.is_file():
        facts["l4t"] = rel.read_text().splitlines()[0].strip()
    return facts


def sidecar_for(plan_facts: dict, settings: BuildSettings, onnx_sha256: str, trt_version: str) -> dict:
    return {"schema": SIDECAR_SCHEMA, "tensorrt": trt_version, "device": plan_facts,
            "builder": asdict(settings), "onnx_sha256": onnx_sha256,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_sidecar(sidecar: dict, trt_version: str, device: dict, onnx_sha256: str) -> list[str]:
    """Why a plan must not be loaded here (empty when it may)."""
    problems = []
    if sidecar.get("schema") != SIDECAR_SCHEMA:
        problems.append("not a geosurge engine sidecar")
    if sidecar.get("tensorrt") != trt_version:
        problems.append(f"built with TensorRT {sidecar.get('tensorrt')}, running {trt_version}")
    built = sidecar.get("device", {})
    for key in ("gpu", "compute_capability"):
        if key in device and built.get(key) != device.get(key):
            problems.append(f"built for {key} {built.get(key)}, this device has {device.get(key)}")
    if sidecar.get("onnx_sha256") != onnx_sha256:
        problems.append("built from another model.onnx than this bundle's")
    return problems


def trtexec_command(onnx: Path, plan: Path, s: BuildSettings, input_name: str = "image",
                    shape: list[int] | None = None) -> str:
    """The trtexec line equivalent to :func:`build_engine` (for users who prefer it)."""
    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan}",
            f"--memPoolSize=workspace:{int(s.workspace_gb * 1024)}M"]
    if s.strongly_typed:
        args.append("--stronglyTyped")
    else:
        # (trtexec has no per-layer-type constraint; build_engine also pins LayerNorm / Softmax layers to FP32)
        args += [f for f, on in (("--fp16", s.fp16), ("--int8", s.int8), ("--fp8", s.fp8)) if on]
    if s.dla_core is not None:
        args += [f"--useDLACore={s.dla_core}", "--allowGPUFallback"]
    if s.timing_cache:
        args.append(f"--timingCacheFile={s.timing_cache}")
    if shape and s.max_batch > 1:
        dims = "x".join(str(d) for d in shape[1:])
        args += [f"--minShapes={input_name}:{s.min_batch}x{dims}", f"--optShapes={input_name}:{s.opt_batch}x{dims}",
                 f"--maxShapes={input_name}:{s.max_batch}x{dims}"]
    return " ".join(shlex.quote(a) for a in args)


def require_onnx(bundle) -> None:
    """TensorRT parses ONNX: refuse another format, naming it."""
    fmt = bundle.manifest.model.format
    if fmt != Format.ONNX:
        raise GeosurgeError(f"{bundle.root}: build-engine needs an ONNX bundle, not {fmt}")


def build_engine(bundle, settings: BuildSettings, plan_path: Path | None = None, log=print) -> Path:
    """Parse the bundle's ONNX and build a serialized engine on this device; writes the plan and its sidecar."""
    require_onnx(bundle)
    trt = import_tensorrt()
    onnx_path = bundle.path("model")
    plan_path = Path(plan_path or bundle.root / ENGINE_FILE)
    s = settings_for_bundle(bundle.manifest.quantization, settings)
    if s.strongly_typed is None:
        s.strongly_typed = trt_major(trt.__version__) >= 11
    if not s.strongly_typed and not hasattr(trt.BuilderFlag, "FP16"):
        raise GeosurgeError(f"TensorRT {trt.__version__} builds strongly typed networks only (weak typing and its "
                            "builder flags were removed in 11.x): drop --weakly-typed")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if s.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GeosurgeError(f"{onnx_path}: TensorRT could not parse the ONNX: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s.workspace_gb * (1 << 30)))
    if not s.strongly_typed:  # TensorRT 10 weakly typed: precision by builder flags + per-layer constraints
        if s.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if s.int8:
            config.set_flag(trt.BuilderFlag.INT8)
        if s.fp8:
            config.set_flag(trt.BuilderFlag.FP8)
        if s.keep_fp32_layers and (s.fp16 or s.int8 or s.fp8):
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            kinds = {getattr(trt.LayerType, k) for k in s.keep_fp32_layers if hasattr(trt.LayerType, k)}
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.type in kinds:
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
    if s.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(s.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for inp in dynamic:
            dims = tuple(inp.shape)[1:]
            profile.set_shape(inp.name, (s.min_batch, *dims), (s.opt_batch, *dims), (s.max_batch, *dims))
        config.add_optimization_profile(profile)
    cache = None
    if s.timing_cache:
        blob = Path(s.timing_cache).read_bytes() if Path(s.timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building a TensorRT {trt.__version__} engine ({'strongly typed' if s.strongly_typed else 'weakly typed'}"
        f", fp16={s.fp16} int8={s.int8} fp8={s.fp8}, workspace {s.workspace_gb} GB"
        + (f", DLA core {s.dla_core}" if s.dla_core is not None else "") + ") ...")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GeosurgeError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    from geosurge.fsutil import atomic_write_bytes

    atomic_write_bytes(plan_path, bytes(plan))
    if cache is not None:
        atomic_write_bytes(Path(s.timing_cache), bytes(config.get_timing_cache().serialize()))
    sidecar = sidecar_for(device_facts(), s, sha256_file(onnx_path), trt.__version__)
    sidecar["build_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_bytes(sidecar_path(plan_path), json.dumps(sidecar, indent=2).encode())
    log(f"engine: {plan_path} ({plan_path.stat().st_size / 1e6:.1f} MB) in {sidecar['build_seconds']}s")
    return plan_path


# ---- CUDA through cuda-python ----------------------------------------------------------------------------------
def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailable("the tensorrt backend needs cuda-python (pip install cuda-python) for device "
                                     "buffers and streams") from None
    return cudart


def _check(result, what: str):
    """cuda-python calls return (error, *values)."""
    cudart = _cudart()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailable(f"CUDA {what} failed: {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)
