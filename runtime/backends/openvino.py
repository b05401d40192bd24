"""OpenVINO runner: an ONNX bundle read directly by OpenVINO Runtime (``pip install 'geosurge[openvino]'``), on x86
and ARM CPUs, and Intel GPUs / NPUs by ``device``.

Numerics depend on the precision hint. OpenVINO's CPU plugin picks ``INFERENCE_PRECISION_HINT`` by the CPU: f32 on
AVX2 / AVX-512 machines, **bf16** where the CPU has AVX512-BF16 or AMX (measured on such a machine: 2.06 ms at
embedding cosine 0.999 vs 3.8 ms at f32), f16 on some ARM cores; GPUs default to f16. The hint actually in force is
read back from the compiled model and recorded (:attr:`options`, the parity record's ``runner_options``), so a
bundle's parity is always reported together with the hint it was measured at; ``precision_hint="f32"`` pins FP32.
A QDQ (INT8) ONNX runs on OpenVINO's INT8 kernels (the quantize / dequantize pairs are folded into them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Backend
from geosurge.privacy import import_openvino

from . import BackendUnavailable, Runner

#: what ``precision_hint`` may be: OpenVINO's element types for ``INFERENCE_PRECISION_HINT`` (None: the device's
#: default, chosen by OpenVINO from the hardware)
PRECISION_HINTS = ("f32", "bf16", "f16")
DEFAULT_DEVICE = "CPU"


class OpenVINORunner(Runner):
    """OpenVINO ``CompiledModel`` with one infer request, ``PERFORMANCE_HINT=LATENCY`` (batch 1, one stream).
    ``threads`` sets ``INFERENCE_NUM_THREADS`` (CPU); ``device`` is an OpenVINO device name (``CPU``, ``GPU``,
    ``GPU.1``, ``NPU``, ``AUTO``); ``precision_hint`` one of :data:`PRECISION_HINTS` or None for the device's
    default; ``names``: the ONNX graph's (input names, output names) to call the ports by (from the manifest).
    Raises BackendUnavailable when OpenVINO is not installed, the device is not present or the model does not
    compile, naming which."""

    name = Backend.OPENVINO
    thread_option = "INFERENCE_NUM_THREADS"
    option_names = ("device", "precision_hint")

    def __init__(self, model_path: Path, threads: int | None = None, device: str = DEFAULT_DEVICE,
                 precision_hint: str | None = None, names: tuple[list[str], list[str]] | None = None):
        threads = self.check_threads(threads)
        try:  # imported here: the runtime imports openvino only when this backend is chosen
            ov = import_openvino()
        except ImportError:
            raise BackendUnavailable("the openvino backend needs OpenVINO (pip install 'geosurge[openvino]')") \
                from None
        if precision_hint is not None and precision_hint not in PRECISION_HINTS:
            raise GeosurgeError(f"--precision-hint must be one of {', '.join(PRECISION_HINTS)}, not "
                                f"{precision_hint!r}")
        core = ov.Core()
        device = str(device or DEFAULT_DEVICE)
        family = device.split(".")[0]
        available = list(core.available_devices)
        if family not in ("AUTO", "MULTI", "HETERO") and not any(d.split(".")[0] == family for d in available):
            raise BackendUnavailable(f"OpenVINO device {device!r} is not present here (available: "
                                     f"{', '.join(available) or 'none'})")
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            if family != "CPU":
                raise GeosurgeError(f"--threads sets OpenVINO's CPU threads; device {device} does not take it")
            config["INFERENCE_NUM_THREADS"] = str(threads)
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        try:
            self.compiled = core.compile_model(str(model_path), device, config)
        except RuntimeError as e:  # OpenVINO reports every compile failure as RuntimeError
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
            raise BackendUnavailable(f"{model_path}: OpenVINO {ov.__version__} cannot compile this model for "
                                     f"{device} ({(lines or ['unknown error'])[0]})") from None
        self.request = self.compiled.create_infer_request()
        # a port carries every name of its tensor (OpenVINO merges aliases such as a Cast's output into the graph
        # input's): name each by the ONNX graph's own input / output name (``names``, from the manifest)
        want_in, want_out = names or ([], [])
        self._inputs = {self._name(p, want_in): p for p in self.compiled.inputs}
        self._outputs = {self._name(p, want_out): p for p in self.compiled.outputs}
        self.input_names, self.output_names = list(self._inputs), list(self._outputs)
        self.version = ov.__version__
        self.device = device
        self.options = {"device": device, "INFERENCE_PRECISION_HINT": self._property("INFERENCE_PRECISION_HINT"),
                        "INFERENCE_NUM_THREADS": self._property("INFERENCE_NUM_THREADS"),
                        "PERFORMANCE_HINT": self._property("PERFORMANCE_HINT"),
                        "requested_precision_hint": precision_hint or "device default", "openvino": ov.__version__}

    @staticmethod
    def _name(port, wanted: list[str]) -> str:
        names = port.get_names()
        return next((n for n in wanted if n in names), port.get_any_name())

    def _property(self, key: str):
        try:
            value = self.compiled.get_property(key)
        except RuntimeError:  # a device that does not report this property
            return None
        text = str(value)
        # element types print as "<Type: 'float32'>": keep the name
        return text.split("'")[1] if text.startswith("<Type:") else (value if isinstance(value, int) else text)

    @classmethod
    def open(cls, bundle, threads: int | None = None, **options) -> "OpenVINORunner":
        io = bundle.manifest.io
        return cls(bundle.path("model"), threads=threads, names=([t.name for t in io.inputs],
                                                                 [t.name for t in io.outputs]),
                   **cls.check_options(options))

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        res = self.request.infer({self._inputs[k]: np.ascontiguousarray(v, dtype=np.float32)
                                  for k, v in feed.items()})
        return {n: np.asarray(res[p], np.float32) for n, p in self._outputs.items()}

    def _release(self) -> None:
        self.request = None
        self.compiled = None
