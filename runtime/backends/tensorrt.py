"""TensorRT runner (TensorRT 10 / 11 name-based I/O: ``set_tensor_address`` + ``execute_async_v3``), device buffers,
pinned host memory and a stream through cuda-python. Loads the plan built on this device by
``geosurge-run build-engine`` and refuses one whose sidecar does not match the running TensorRT / GPU / ONNX."""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from geosurge.formats import Backend
from geosurge.manifest import ENGINE_FILE

from . import BackendUnavailable, Runner


class TensorRTRunner(Runner):
    """A TensorRT engine on the GPU, through one CUDA stream."""

    name = Backend.TENSORRT
    no_threads_reason = "inference runs on the GPU (one CUDA stream); CPU threads do not apply"

    def __init__(self, plan_path: Path, onnx_sha256: str, threads: int | None = None):
        from ..trt import _check, _cudart, check_sidecar, device_facts, import_tensorrt, sidecar_path

        self.check_threads(threads)
        trt = import_tensorrt()  # first: where TensorRT cannot be installed, that is the reason, not a missing engine
        plan_path = Path(plan_path)
        sidecar_file = sidecar_path(plan_path)
        if not plan_path.is_file() or not sidecar_file.is_file():
            raise BackendUnavailable(f"{plan_path}: no engine here; build it on this device first: "
                                     f"geosurge-run build-engine {plan_path.parent}")
        sidecar = json.loads(sidecar_file.read_text())
        problems = check_sidecar(sidecar, trt.__version__, device_facts(), onnx_sha256)
        if problems:
            raise BackendUnavailable(f"{plan_path}: " + "; ".join(problems) + " — engines are not portable: rebuild "
                                     f"it here with geosurge-run build-engine {plan_path.parent}")
        self.cudart = cudart = _cudart()
        self._check = _check
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{plan_path}: TensorRT could not deserialize the engine; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.trt = trt
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self._buffers: dict[str, tuple] = {}  # name -> (device ptr, pinned host array, nbytes, host ptr)
        self.input_names, self.output_names = list(self.inputs), list(self.outputs)

    @classmethod
    def open(cls, bundle, threads: int | None = None, **options) -> "TensorRTRunner":
        cls.check_options(options)
        return cls(bundle.root / ENGINE_FILE, bundle.manifest.file_record("model").sha256, threads=threads)

    def _buffer(self, name: str, shape: tuple, dtype) -> tuple:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = self._buffers.get(name)
        if buf is None or buf[2] < nbytes:
            if buf is not None:
                self.cudart.cudaFree(buf[0])
                self.cudart.cudaFreeHost(buf[3])
            dptr = self._check(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
            hptr = self._check(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost")  # pinned host memory
            host = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(int(hptr)))
            buf = (dptr, host, nbytes, hptr)
            self._buffers[name] = buf
        host = buf[1][:nbytes].view(dtype).reshape(shape)
        return buf[0], host, nbytes

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        cudart, check, trt = self.cudart, self._check, self.trt
        (name, x), = feed.items()
        x = np.ascontiguousarray(x, np.float32)
        if -1 in tuple(self.engine.get_tensor_shape(name)):
            self.context.set_input_shape(name, x.shape)
        dptr, host, nbytes = self._buffer(name, x.shape, np.float32)
        host[...] = x
        check(cudart.cudaMemcpyAsync(dptr, host.ctypes.data, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                     self.stream), "cudaMemcpyAsync H2D")
        self.context.set_tensor_address(name, int(dptr))
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            dtype = trt.nptype(self.engine.get_tensor_dtype(out))
            optr, ohost, onbytes = self._buffer(out, shape, dtype)
            self.context.set_tensor_address(out, int(optr))
            outs[out] = (optr, ohost, onbytes)
        if not self.context.execute_async_v3(stream_handle=int(self.stream)):
            raise BackendUnavailable("TensorRT execute_async_v3 failed")
        for optr, ohost, onbytes in outs.values():
            check(cudart.cudaMemcpyAsync(ohost.ctypes.data, optr, onbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                  "cudaMemcpyAsync D2H")
        check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {k: np.array(v[1], dtype=np.float32, copy=True) for k, v in outs.items()}

    def _release(self) -> None:  # pragma: no cover - needs a GPU
        for dptr, _, _, hptr in self._buffers.values():
            self.cudart.cudaFree(dptr)
            self.cudart.cudaFreeHost(hptr)
        self._buffers.clear()
        self.cudart.cudaStreamDestroy(self.stream)
        self.context = self.engine = self.runtime = None
