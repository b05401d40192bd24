"""Edge FP32: torch eager vs onnxruntime latency (batch 1, interleaved in one run), bundle size, runtime peak RSS
(measured in a separate torch-free process), and the parity table on the real sample photos.

    .venv/bin/python benchmarks/edge_fp32.py [--threads 2] [--bundle DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from geosurge.export.bundle import write_bundle
from geosurge.export.compare import time_torch_vs_runtime, torch_vs_bundle
from geosurge.export.source import load_model, load_source_model
from geosurge.parity import format_parity
from geosurge.report import format_table, write_json
from geosurge.runtime import Localizer
from geosurge.samples import sample_photo_paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--bundle", help="an existing edge FP32 bundle (default: export one to a temp dir)")
    ap.add_argument("--json", default="benchmarks/results/edge_fp32.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Path(args.bundle) if args.bundle else Path(tempfile.mkdtemp()) / "edge-fp32"
    if not args.bundle:
        model, source = load_model("edge", seed=0)
        write_bundle(bundle, model, source, sample_photo_paths(), log=lambda m: None)
    loc = Localizer(bundle, threads=args.threads)
    model = load_source_model(loc.bundle)
    x = np.stack([loc.preprocess(p) for p in sample_photo_paths()[:1]])
    rows = time_torch_vs_runtime(model, loc, x, iters=args.iters)
    bench = subprocess.run([str(Path(sys.executable).parent / "geosurge-run"), "bench", str(bundle), "--threads",
                            str(args.threads), "--iters", "30", "--json", str(bundle.parent / "bench.json")],
                           capture_output=True, text=True, check=True)
    rt = json.loads((bundle.parent / "bench.json").read_text())
    par = torch_vs_bundle(bundle, sample_photo_paths(), threads=args.threads, log=lambda m: None)
    size = {f.name: f.stat().st_size for f in bundle.iterdir()}
    print(format_table(rows, title=f"edge inference latency, batch 1, {args.threads} threads, {args.iters} runs "
                                   f"(onnxruntime {rows[0]['p50_ms'] / rows[1]['p50_ms']:.1f}x faster)"))
    print()
    print(bench.stdout.strip())
    print(f"\nbundle {sum(size.values()) / 1e6:.1f} MB: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in size.items()))
    print()
    print(format_parity(par["metrics"], par["gates"], title=f"parity on {par['metrics']['n']} real photos"))
    write_json(args.json, {"latency": rows, "runtime_bench": rt, "bundle_bytes": size, "parity": par})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
