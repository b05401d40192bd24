"""Runs nvidia-modelopt's ONNX PTQ in its own process: importing modelopt patches onnxruntime's quantization
internals process-wide (modelopt/onnx/quantization/ort_patching.py), which broke later onnxruntime static
quantizations in the same process. ``python -m geosurge.export.modelopt_worker JOB.json``."""
from __future__ import annotations

import json
import sys

import numpy as np


def main(argv=None) -> int:
    job = json.loads(open((argv or sys.argv[1:])[0]).read())
    from modelopt.onnx.quantization import quantize

    quantize(job["onnx_path"], quantize_mode=job["mode"],
             calibration_data={job["input_name"]: np.load(job["calibration_npy"])}, calibration_method=job["method"],
             calibration_eps=["cpu"], output_path=job["output_path"], nodes_to_exclude=job["nodes_to_exclude"] or None,
             disable_mha_qdq=True, high_precision_dtype="fp16", log_level="WARNING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
