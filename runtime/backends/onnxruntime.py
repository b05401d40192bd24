"""ONNX Runtime backend (CPU by default; CUDA when onnxruntime-gpu is installed and asked for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


#: whether the model session's idle worker threads busy-wait for the next parallel section (ORT's
#: ``session.intra_op.allow_spinning``). Off: measured on 2 shared cores (benchmarks/cell_search.py), spinning
#: workers burnt ~60 ms of a core after each inference and made both the model and the work after it slower, paced
#: (10 fps) and back-to-back, p50 and p95. None keeps ONNX Runtime's default (on).
SPINNING: bool | None = False


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        spinning = SPINNING if spinning is None else spinning
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        avail = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__
        self.providers = self.session.get_providers()

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.output_names, outs))
