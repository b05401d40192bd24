"""Edge precisions side by side (issue 5): torch FP32 eager vs onnxruntime FP32 / FP16 / INT8 static / INT8 dynamic
bundles, batch 1, one process, runs interleaved engine by engine so all see the same machine state.

End to end = decode + preprocess + inference + cell search, with the same decode / preprocess / cell-search code
for every row (only the inference engine differs). Also: inference alone, model file and bundle size, the parity
table vs FP32 torch on the real sample photos, and each bundle's peak RSS from `geosurge-run bench` in its own
torch-free process.

    .venv/bin/python benchmarks/quantization.py [--threads 2] [--iters 40] [--out runs/bench-quant]
        [--reuse] [--json benchmarks/results/quantization.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from geosurge.calibration import sample_views_set
from geosurge.export.bundle import write_bundle
from geosurge.export.compare import torch_vs_bundle
from geosurge.export.precision import QuantConfig
from geosurge.export.source import load_model
from geosurge.images import load_image
from geosurge.manifest import MANIFEST_FILE
from geosurge.preprocess import preprocess
from geosurge.report import format_table, write_json
from geosurge.runtime import Localizer, open_bundle
from geosurge.samples import sample_photo_paths

PRECISIONS = {
    "fp32": QuantConfig("fp32"),
    "fp16": QuantConfig("fp16"),
    "int8": QuantConfig("int8", search="auto"),
    "int8-dynamic": QuantConfig("int8-dynamic", search="auto"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--out", default="runs/bench-quant")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already in --out")
    ap.add_argument("--json", default="benchmarks/results/quantization.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, source = load_model("edge", seed=0)
    photos = sample_photo_paths()
    calib = None
    export_s = {}
    for name, cfg in PRECISIONS.items():
        path = out / f"edge-{name}"
        if args.reuse and (path / MANIFEST_FILE).is_file():
            continue
        if cfg.needs_calibration and calib is None:
            calib = sample_views_set(model.config.preprocess, args.calib_size, log=print)
        print(f"== export edge {name} ==", flush=True)
        t0 = time.perf_counter()
        write_bundle(path, model, source, photos, quant=cfg, calibration=calib, threads=args.threads,
                     log=lambda m: print("  " + m, flush=True))
        export_s[name] = round(time.perf_counter() - t0, 1)

    locs = {name: Localizer(out / f"edge-{name}", threads=args.threads) for name in PRECISIONS}
    ref_loc = locs["fp32"]
    sources = [p.read_bytes() for p in photos]
    engines = ["torch eager fp32"] + [f"onnxruntime {n}" for n in PRECISIONS]
    e2e = {e: [] for e in engines}
    infer = {e: [] for e in engines}
    model.eval()

    def run_torch(data):
        t0 = time.perf_counter()
        x = preprocess(load_image(data, ref_loc.spec), ref_loc.spec)[None]
        t1 = time.perf_counter()
        with torch.inference_mode():
            emb = model.embed(torch.from_numpy(x)).numpy()
        t2 = time.perf_counter()
        ref_loc.predict_embedding(emb[0])
        t3 = time.perf_counter()
        return (t3 - t0) * 1e3, (t2 - t1) * 1e3

    print(f"\n== timing: {args.iters} runs per engine, interleaved, batch 1, {args.threads} threads ==", flush=True)
    for i in range(args.iters + 5):
        data = sources[i % len(sources)]
        total, inf = run_torch(data)
        rows = [("torch eager fp32", total, inf)]
        for name, loc in locs.items():
            t = loc.locate(data)["timing_ms"]
            rows.append((f"onnxruntime {name}", sum(t.values()), t["inference"]))
        if i >= 5:
            for e, total, inf in rows:
                e2e[e].append(total)
                infer[e].append(inf)

    torch_p50 = float(np.median(e2e["torch eager fp32"]))
    fp32_model = (out / "edge-fp32" / "model.onnx").stat().st_size
    table = []
    for e in engines:
        name = e.split()[-1] if e.startswith("onnxruntime") else None
        row = {"engine": e, "e2e_p50_ms": float(np.median(e2e[e])), "e2e_p95_ms": float(np.percentile(e2e[e], 95)),
               "infer_p50_ms": float(np.median(infer[e])), "infer_p95_ms": float(np.percentile(infer[e], 95)),
               "speedup_vs_torch": torch_p50 / float(np.median(e2e[e]))}
        if name:
            b = out / f"edge-{name}"
            row["model_mb"] = (b / "model.onnx").stat().st_size / 1e6
            row["model_vs_fp32"] = (b / "model.onnx").stat().st_size / fp32_model
            row["bundle_mb"] = sum(f.stat().st_size for f in b.iterdir()) / 1e6
        table.append(row)

    print("\n== parity vs FP32 torch on the real sample photos ==", flush=True)
    parity = {}
    for name in PRECISIONS:
        rep = torch_vs_bundle(out / f"edge-{name}", photos, threads=args.threads, log=lambda m: None)
        m = rep["metrics"]
        parity[name] = {"passed": rep["passed"], **{k: v for k, v in m.items() if k != "levels"},
                        "levels": m["levels"]}
    rss = {}
    for name in PRECISIONS:
        jf = out / f"bench-{name}.json"
        subprocess.run([str(Path(sys.executable).parent / "geosurge-run"), "bench", str(out / f"edge-{name}"),
                        "--threads", str(args.threads), "--iters", "20", "--json", str(jf)],
                       capture_output=True, text=True, check=True)
        rss[name] = json.loads(jf.read_text())["peak_rss_mb"]
    for row in table:
        name = row["engine"].split()[-1] if row["engine"].startswith("onnxruntime") else None
        if name:
            row["peak_rss_mb"] = rss[name]
            p = parity[name]
            row.update(cos_mean=p["cosine_mean"], cos_min=p["cosine_min"],
                       level_agree_min=p["level_top1_agreement_min"], top1_in_top5=p["top1_in_top5"],
                       parity="PASS" if p["passed"] else "FAIL")

    cols = ["engine", "e2e_p50_ms", "e2e_p95_ms", "infer_p50_ms", "infer_p95_ms", "speedup_vs_torch", "model_mb",
            "model_vs_fp32", "bundle_mb", "peak_rss_mb", "cos_mean", "cos_min", "level_agree_min", "top1_in_top5",
            "parity"]
    print(format_table(table, cols, title=f"edge, batch 1, {args.threads} threads, {args.iters} interleaved runs "
                                          f"(e2e = decode + preprocess + inference + cell search)"))
    sharp = parity["fp32"]
    print(f"FP32 head sharpness on these photos: mean top-1 prob {sharp['sharpness_top1_prob']:.3f}, margin "
          f"{sharp['sharpness_margin']:.3f}; samples counted for agreement per level: "
          f"{[lv['counted'] for lv in sharp['levels']]} of {sharp['n']}")
    int8 = next(r for r in table if r["engine"] == "onnxruntime int8")
    q = open_bundle(out / "edge-int8").manifest.quantization
    targets = {
        "int8 e2e >= 3x faster than torch fp32 eager": int8["speedup_vs_torch"] >= 3.0,
        "int8 model file <= 30% of fp32": int8["model_vs_fp32"] <= 0.30,
        "int8 cosine mean >= 0.995": int8["cos_mean"] >= 0.995,
        "int8 per-level top-1 agreement >= 95%": int8["level_agree_min"] >= 0.95,
    }
    print(format_table([{"target": k, "met": "yes" if v else "NO"} for k, v in targets.items()],
                       title="\nissue 5 targets"))
    search = q.extra.get("search") or {}
    print(f"int8 mix: {len(search.get('excluded_nodes', []))} node(s) out of INT8 compute "
          f"(weights {q.extra.get('excluded_weights')}), held-out check {q.check.metrics['cosine_mean']:.4f}")
    write_json(args.json, {"threads": args.threads, "iters": args.iters, "table": table, "parity": parity,
                           "targets": targets, "export_seconds": export_s, "int8_search": search,
                           "machine_note": "shared 2-core VM; compare ratios within this run only"})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
