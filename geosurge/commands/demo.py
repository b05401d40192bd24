"""``geosurge demo``: the main job on embedded defaults (README command 1).

The ``edge`` model from real pretrained parts (EfficientNet-Lite0 ImageNet weights, cell embeddings from GeoCLIP's
location encoder over the default hierarchy) -> FP32 ONNX bundle -> on-device verify -> workstation parity on real
photos -> the torch-free runtime locates the sample photos -> timings.
"""
from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the demo pipeline on the embedded defaults")
    p.add_argument("-o", "--output", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", default="edge", choices=["edge", "tiny"])
    p.add_argument("--checkpoint", help="a trained checkpoint (predictions are meaningful only with one)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from ..export.bundle import write_bundle
    from ..export.compare import time_torch_vs_runtime, torch_vs_bundle
    from ..export.source import load_model
    from ..geo import build_default_hierarchy
    from ..parity import format_parity
    from ..report import format_table, write_json
    from ..runtime.cli import bench_bundle, verify_bundle
    from ..runtime.localizer import Localizer
    from ..samples import copy_samples
    from .cells import print_info

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    t_all = time.perf_counter()
    print("== geosurge demo ==")
    if not args.checkpoint:
        print("NOTE: no trained checkpoint (--checkpoint): the model is built from real pretrained parts but its "
              "fusion layers are untrained,\n      so the predicted places below are NOT meaningful. The pipeline, "
              "parity and timings are real.")
    print("\n[1/6] cell hierarchy from the real MP-16 photo density (100K sample shipped in geoclip)")
    t0 = time.perf_counter()
    h = build_default_hierarchy()
    print_info(h.info(), False, title=f"      {len(h):,} cells in {h.num_levels} levels, built in "
                                      f"{time.perf_counter() - t0:.2f}s")

    print(f"\n[2/6] {args.checkpoint or args.model} model (EfficientNet-Lite0 ImageNet weights, GeoCLIP cell init)")
    model, source = load_model(args.model, args.checkpoint, seed=0, hierarchy=h)
    samples = copy_samples(out / "samples")
    print(f"      {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {len(samples)} sample photos "
          f"-> {out / 'samples'}")

    print("\n[3/6] export FP32 ONNX bundle")
    bundle = write_bundle(out / "bundle-fp32", model, source, samples, log=lambda m: print("      " + m))

    print("\n[4/6] on-device check: geosurge-run verify (checksums + golden replay)")
    ver = verify_bundle(bundle, threads=args.threads)
    print(format_parity(ver["metrics"], ver["gates"], title="      golden replay vs FP32 torch reference"))
    print(f"      verify: {'PASS' if ver['passed'] else 'FAIL'}")

    print("\n[5/6] workstation parity: FP32 torch vs the bundle on the sample photos")
    par = torch_vs_bundle(bundle, [out / "samples"], args.checkpoint, threads=args.threads,
                          log=lambda m: print("      " + m))
    print(format_parity(par["metrics"], par["gates"], title=f"      {par['metrics']['n']} photos"))
    print(f"      parity: {'PASS' if par['passed'] else 'FAIL'}")

    print("\n[6/6] the torch-free runtime locates the sample photos")
    loc = Localizer(bundle, threads=args.threads)
    rows = []
    for p in samples:
        pred = loc.locate(p, top_k=3)
        place = pred["place"] or {}
        rows.append({"photo": p.name, "lat": pred["lat"], "lon": pred["lon"], "confidence": pred["confidence"],
                     "radius_km": pred["uncertainty_km"], "nearest place": f"{place.get('name')}, "
                                                                          f"{place.get('country')}",
                     "ms": sum(pred["timing_ms"].values())})
    print(format_table(rows))

    # timings: torch eager FP32 vs onnxruntime, batch 1, same input, side by side
    timing = time_torch_vs_runtime(model, loc, np.load(bundle / "golden.npz")["inputs"][:1], iters=20)
    b = bench_bundle(bundle, threads=args.threads, iters=30, warmup=3)
    print(format_table(timing, title=f"\ninference latency, batch 1, {args.threads} threads (speed-up "
                                     f"{timing[0]['p50_ms'] / timing[1]['p50_ms']:.1f}x)"))
    print(format_table(b["stages"], title=f"\nruntime end to end per stage (throughput {b['throughput_img_s']:.1f} "
                                          f"img/s; peak RSS of this torch-loaded process {b['peak_rss_mb']:.0f} MB — `geosurge-run bench` measures the "
                                          "runtime alone)"))
    size = sum(f.stat().st_size for f in bundle.iterdir()) / 1e6
    summary = {"bundle": str(bundle), "bundle_mb": size, "verify": ver["passed"], "parity": par["passed"],
               "parity_metrics": par["metrics"], "latency_ms": timing, "runtime_stages": b["stages"],
               "peak_rss_mb": b["peak_rss_mb"], "predictions": rows, "checkpoint": args.checkpoint,
               "seconds": time.perf_counter() - t_all}
    write_json(out / "demo.json", summary)
    print(f"\ndone in {summary['seconds']:.0f}s: bundle {bundle} ({size:.1f} MB), verify "
          f"{'PASS' if ver['passed'] else 'FAIL'}, parity {'PASS' if par['passed'] else 'FAIL'}; report "
          f"{out / 'demo.json'}")
    return 0 if ver["passed"] and par["passed"] else 1
