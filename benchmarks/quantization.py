"""Precisions and backends side by side on a trained model (docs/benchmarks.md): torch eager FP32 vs
onnxruntime FP32 / FP16 / INT8 (all-INT8 PTQ, the precision search's mix, QAT) vs OpenVINO (FP32 pinned, the
device's default precision hint, INT8), batch 1, in one process, interleaved call by call and paced (a pause before
each call, like a camera) so every contender sees the same machine state.

Per contender: inference p50 / p95 ms, speed-up vs onnxruntime FP32 and vs torch eager, model and bundle MB, task
parity against FP32 torch on held-out views with ground truth (tie-aware drift median / p95 km, top-1 agreement
where FP32 is confident, acc@1/25/200/750/2500 km deltas in points, cosine as a diagnostic) under the default gates,
and which contender wins (the fastest that passes) and why; each INT8 bundle's own export decision (what won on
speed / on parity on the machine that exported it). Figures are ratios within one run; on a shared machine they are
indicative.

    .venv/bin/python benchmarks/quantization.py --checkpoint CKPT --heldout HELDOUT.csv [--calib CALIB] \\
        [--heldout-source bmng] [--heldout-n 200] [--calib-size 256] [--threads 2] [--iters 30] [--pause-ms 100] \\
        [--qat-steps 100] [--out runs/bench-quant] [--reuse] [--only NAME ...] [--json FILE]

The images: the first ``--heldout-n`` rows of ``--heldout`` (of ``--heldout-source``) are the evaluation views;
without ``--calib``, the export calibrates (and chooses, and checks) on the *remaining* rows of the same source,
written to ``OUT/calib.csv`` with their coordinates. The evaluation views are never seen by any export (checked:
a ``--calib`` manifest that shares a file with them is refused).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from geosurge import api
from geosurge.export.compare import torch_embed
from geosurge.export.precision import PrecisionSearchFailed
from geosurge.images import load_image
from geosurge.manifest import MANIFEST_FILE
from geosurge.parity import DEFAULT_GATES, compare
from geosurge.preprocess import preprocess
from geosurge.report import format_table, write_json
from geosurge.runtime import open_bundle
from geosurge.runtime.backends import BackendUnavailable, embed_batches, get_runner
from geosurge.runtime.cells import CellScorer
from geosurge.timing import interleaved

#: bundle name -> geosurge.api.export keywords (every INT8 export keeps its default speed gate; a bundle that fails
#: it is still written and its decision recorded)
BUNDLES = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "int8-ptq": {"precision": "int8"},
    "int8-search": {"precision": "int8", "precision_search": "auto"},
    "int8-qat": {"precision": "int8", "qat": True},
}
#: contender -> (bundle, backend, runner options)
CONTENDERS = {
    "onnxruntime fp32": ("fp32", "onnxruntime", {}),
    "onnxruntime fp16": ("fp16", "onnxruntime", {}),
    "onnxruntime int8 all-INT8 PTQ": ("int8-ptq", "onnxruntime", {}),
    "onnxruntime int8 search mix": ("int8-search", "onnxruntime", {}),
    "onnxruntime int8 QAT": ("int8-qat", "onnxruntime", {}),
    "openvino fp32 (f32 hint)": ("fp32", "openvino", {"precision_hint": "f32"}),
    "openvino fp32 (default hint)": ("fp32", "openvino", {}),
    "openvino int8 all-INT8 PTQ": ("int8-ptq", "openvino", {}),
    "openvino int8 search mix": ("int8-search", "openvino", {}),
    "openvino int8 QAT": ("int8-qat", "openvino", {}),
}
#: each backend's FP32 contender: the speed-up of a contender is also given against FP32 on its own backend
FP32_OF = {"onnxruntime": "onnxruntime fp32", "openvino": "openvino fp32 (f32 hint)"}


def read_heldout(path: Path, source: str | None, n: int, calib_out: Path | None = None):
    """(paths, lat, lon) of the first ``n`` rows of a ``path,lat,lon[,source]`` manifest (of ``source`` only); with
    ``calib_out``, the remaining rows of that source are written there as a ``path,lat,lon`` manifest (absolute
    paths) for calibration."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if source is None or r.get("source") == source]
    if len(rows) <= n:
        raise SystemExit(f"{path}: {len(rows)} row(s) of source {source or 'any'}, need more than --heldout-n {n}")
    if calib_out is not None:
        calib_out.parent.mkdir(parents=True, exist_ok=True)
        with open(calib_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "lat", "lon"])
            w.writerows([str((path.parent / r["path"]).resolve()), r["lat"], r["lon"]] for r in rows[n:])
    rows = rows[:n]
    return ([path.parent / r["path"] for r in rows], np.array([float(r["lat"]) for r in rows]),
            np.array([float(r["lon"]) for r in rows]))


def check_disjoint(calib, heldout_paths) -> None:
    """Refuse a calibration manifest that shares a file with the evaluation views."""
    if calib is None or not str(calib).endswith(".csv"):
        return
    from geosurge.inputs import read_manifest

    shared = {p.resolve() for p in read_manifest(calib).paths} & {Path(p).resolve() for p in heldout_paths}
    if shared:
        raise SystemExit(f"{calib}: {len(shared)} calibration file(s) are evaluation views too "
                         f"(e.g. {sorted(shared)[0]}): give disjoint images")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the FP32 model (a trained checkpoint directory)")
    ap.add_argument("--calib", help="calibration images (folder or manifest; default: the --heldout rows of "
                    "--heldout-source after the first --heldout-n)")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--heldout", required=True, type=Path, help="held-out views with truth (path,lat,lon[,source])")
    ap.add_argument("--heldout-source", default=None, help="only rows of this source (e.g. bmng)")
    ap.add_argument("--heldout-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--out", default="runs/bench-quant")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already in --out")
    ap.add_argument("--only", nargs="*", help="only these bundles (names of BUNDLES)")
    ap.add_argument("--json", default="benchmarks/results/quantization.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    calib = args.calib or out / "calib.csv"
    paths, lat, lon = read_heldout(args.heldout, args.heldout_source, args.heldout_n,
                                   None if args.calib else Path(calib))
    check_disjoint(calib, paths)
    model, source = api.load_model(Path(args.checkpoint))
    names = [b for b in BUNDLES if not args.only or b in args.only or b == "fp32"]
    export_s, failed = {}, {}
    for name in names:
        path = out / name
        if args.reuse and (path / MANIFEST_FILE).is_file():
            continue
        print(f"== export {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            api.export(model, path, source=source, calibration=str(calib), calib_size=args.calib_size,
                       calib_cache=out / "calib-cache", threads=args.threads, qat_steps=args.qat_steps,
                       log=lambda m: print("  " + m, flush=True), **BUNDLES[name])
        except PrecisionSearchFailed as e:  # nothing written: a row of its own in the report
            failed[name] = str(e)
            print(f"  {name}: {e}", flush=True)
        export_s[name] = round(time.perf_counter() - t0, 1)
    bundles = {n: open_bundle(out / n) for n in names if n not in failed}
    spec = bundles["fp32"].preprocess

    x = np.stack([preprocess(load_image(p, spec), spec) for p in paths]).astype(np.float32)
    print(f"== FP32 torch on {len(x)} held-out views ==", flush=True)
    ref = torch_embed(model, x)
    scorer = CellScorer.load(bundles["fp32"].path("cells"), bundles["fp32"].path("cell_table"))

    runners, skipped = {}, {}
    for c, (b, backend, opts) in CONTENDERS.items():
        if b not in bundles:
            continue
        cls = get_runner(backend)
        try:
            runners[c] = cls.open(bundles[b], threads=args.threads, **opts)
        except BackendUnavailable as e:
            skipped[c] = str(e)
    parity = {}
    for c, r in runners.items():
        m = bundles[CONTENDERS[c][0]].manifest
        dep = embed_batches(r, x, m.io.input.name, m.io.embedding.name, m.io.static_batch)
        rep = compare(ref, dep, scorer, DEFAULT_GATES, truth=(lat, lon))
        parity[c] = rep
        print(f"  parity {c}: drift median {rep['metrics']['median_drift_km']:.0f} km, p95 "
              f"{rep['metrics']['p95_drift_km']:.0f} km, acc delta {rep['metrics']['accuracy_delta_min_pts']:+.1f} "
              f"pts, cos {rep['metrics']['cosine_mean']:.4f} -> {'PASS' if rep['passed'] else 'FAIL'}", flush=True)

    print(f"== timing: {args.iters} interleaved runs, paced {args.pause_ms:g} ms, batch 1, {args.threads} threads ==",
          flush=True)
    x1 = x[:1]
    xt = torch.from_numpy(x1)
    calls = {"torch eager fp32": lambda: model.embed(xt)}
    calls.update({c: (lambda r=r: r.infer({"image": x1})) for c, r in runners.items()})
    with torch.inference_mode():
        t = interleaved(calls, args.iters, warmup=3, pause_ms=args.pause_ms)
    for r in runners.values():
        r.close()

    p50 = {k: float(np.median(v)) for k, v in t.items()}
    base, eager = p50.get("onnxruntime fp32"), p50["torch eager fp32"]
    fp32_mb = bundles["fp32"].path("model").stat().st_size / 1e6
    rows = [{"contender": "torch eager fp32", "p50_ms": eager,
             "p95_ms": float(np.percentile(t["torch eager fp32"], 95)), "vs_ort_fp32": base / eager, "vs_eager": 1.0}]
    for c in runners:
        b = bundles[CONTENDERS[c][0]]
        mt = parity[c]["metrics"]
        acc = mt["accuracy"]["delta_pts"]
        own = p50.get(FP32_OF.get(CONTENDERS[c][1], ""))
        rows.append({"contender": c, "p50_ms": p50[c], "p95_ms": float(np.percentile(t[c], 95)),
                     "vs_ort_fp32": base / p50[c], "vs_backend_fp32": own / p50[c] if own else None,
                     "vs_eager": eager / p50[c],
                     "model_mb": b.path("model").stat().st_size / 1e6,
                     "bundle_mb": sum(f.bytes for f in b.manifest.files.values()) / 1e6,
                     "drift_med_km": mt["median_drift_km"], "drift_p95_km": mt["p95_drift_km"],
                     "agree_conf": mt["top1_agreement_confident"],
                     **{f"d_{k}": v for k, v in acc.items() if k != "acc@1km"},
                     "cos": mt["cosine_mean"], "parity": "PASS" if parity[c]["passed"] else "FAIL",
                     "hint": str((runners[c].options or {}).get("INFERENCE_PRECISION_HINT", "")) or "-"})
    cols = ["contender", "p50_ms", "p95_ms", "vs_ort_fp32", "vs_backend_fp32", "vs_eager", "model_mb",
            "drift_med_km", "drift_p95_km",
            "agree_conf", "d_acc@25km", "d_acc@200km", "d_acc@750km", "d_acc@2500km", "cos", "parity", "hint"]
    fp32_acc = parity["onnxruntime fp32"]["metrics"]["accuracy"]["fp32"]
    print(format_table(rows, cols, title=f"\n{len(x)} held-out views ({args.heldout_source or 'all sources'}), FP32 "
                                         f"acc@750/2500 km {fp32_acc['acc@750km']:.1f} / "
                                         f"{fp32_acc['acc@2500km']:.1f} %, median {fp32_acc['median_km']:.0f} km; "
                                         "parity vs FP32 torch under the default gates (indicative: a shared machine)"))
    passing = [r for r in rows[1:] if r["parity"] == "PASS" and r["contender"] != "onnxruntime fp32"]
    best = max(passing, key=lambda r: r["vs_ort_fp32"]) if passing else None
    fastest = max(rows[1:], key=lambda r: r["vs_ort_fp32"])
    if best and best["vs_ort_fp32"] > 1.0:
        why = (f"{best['contender']}: the fastest that passes every gate on the held-out views "
               f"(x{best['vs_ort_fp32']:.2f} onnxruntime FP32, x{best['vs_eager']:.2f} torch eager)")
    else:
        why = "onnxruntime fp32: nothing that passes the gates is faster"
    print(f"fastest: {fastest['contender']} (x{fastest['vs_ort_fp32']:.2f}, parity {fastest['parity']}); "
          f"winner: {why}")
    decisions = {}
    for n, b in bundles.items():
        d = (b.manifest.quantization.extra.get("decision") if b.manifest.quantization else None)
        if d:
            decisions[n] = {"passed": d["passed"], "winner": d["winner"], "why": d["why"], "on_speed": d["on_speed"],
                            "on_parity": d["on_parity"], "check_passed": b.manifest.check.passed,
                            "qat": (b.manifest.quantization.extra.get("qat") or {}).get("base")}
            print(f"export decision {n}: {d['why']}  (held-out check: "
                  f"{'PASS' if b.manifest.check.passed else 'FAIL'})")
    for c, why_skipped in skipped.items():
        print(f"skipped {c}: {why_skipped}")
    for n, why_failed in failed.items():
        print(f"export {n} wrote nothing: {why_failed}")
    write_json(args.json, {"settings": {**vars(args), "heldout": str(args.heldout), "calib": str(calib)},
                           "rows": rows, "winner": why, "fp32_accuracy": fp32_acc,
                           "decisions": decisions, "export_seconds": export_s, "skipped": skipped,
                           "export_failed": failed,
                           "parity": {c: {"passed": p["passed"], "gates": p["gates"],
                                          "metrics": {k: v for k, v in p["metrics"].items() if k != "levels"}}
                                      for c, p in parity.items()},
                           "note": "indicative: a shared 2-core machine; compare ratios within this run only"})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
