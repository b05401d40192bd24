"""``geosurge-run``: the on-device command line (torch-free): locate, verify, bench."""
from __future__ import annotations

import argparse
import json
import sys
import time

from geosurge import __version__
from geosurge.errors import GeosurgeError, run_command

BACKENDS = ["onnxruntime"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geosurge-run", description="Run a geosurge bundle on this device (no torch).")
    p.add_argument("--version", action="version", version=f"geosurge-run {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("bundle", help="bundle directory")
        sp.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
        sp.add_argument("--threads", type=int, default=None, help="inference threads (default: backend's)")

    lo = sub.add_parser("locate", help="locate images (files or folders)")
    common(lo)
    lo.add_argument("inputs", nargs="+", metavar="PATH", help="image files or folders")
    lo.add_argument("--json", action="store_true", help="one JSON line per input")
    lo.add_argument("--geojson", metavar="FILE", help="also write a GeoJSON FeatureCollection")
    lo.add_argument("--top-k", type=int, default=5)
    lo.add_argument("--beam", type=int, default=None, help="beam width for the cell search (default: exact)")
    lo.set_defaults(func=cmd_locate)

    ve = sub.add_parser("verify", help="check every sha256 and replay the golden inputs against the FP32 reference")
    common(ve)
    ve.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ve.set_defaults(func=cmd_verify)

    be = sub.add_parser("bench", help="latency per stage, throughput and peak RSS")
    common(be)
    be.add_argument("--images", nargs="*", help="images to time (default: the bundle's golden photos)")
    be.add_argument("--iters", type=int, default=50)
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--json", metavar="FILE", help="write the report as JSON")
    be.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), argv, "geosurge-run")


# ---- locate --------------------------------------------------------------------------------------------------
def cmd_locate(args) -> int:
    from .localizer import Localizer, expand_inputs

    loc = Localizer(args.bundle, backend=args.backend, threads=args.threads, beam=args.beam)
    features, failed = [], 0
    for path in expand_inputs(args.inputs):
        try:
            pred = loc.locate(path, top_k=args.top_k)
        except GeosurgeError as e:
            failed += 1
            rec = {"input": str(path), "error": str(e)}
            print(json.dumps(rec) if args.json else f"{path}: ERROR {e}", flush=True)
            continue
        rec = {"input": str(path), **pred}
        features.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            place = pred["place"]
            where = f"near {place['name']}, {place['admin1']}, {place['country']}" if place else ""
            print(f"{path}: {pred['lat']:.4f}, {pred['lon']:.4f}  confidence {pred['confidence']:.3f}  "
                  f"±{pred['uncertainty_km']:.0f} km  {where}", flush=True)
    if args.geojson:
        from geosurge.report import write_json

        write_json(args.geojson, {"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [f["lon"], f["lat"]]},
             "properties": {k: v for k, v in f.items() if k not in ("lat", "lon")}} for f in features]})
    if not features and not failed:
        print("geosurge-run: no images found in the given paths", file=sys.stderr)
        return 1
    return 1 if failed else 0


# ---- verify --------------------------------------------------------------------------------------------------
def verify_bundle(bundle_dir, backend: str = "onnxruntime", threads: int | None = None) -> dict:
    """Checksums + golden replay under the bundle's parity gates. Raises BundleError for a tampered bundle."""
    import numpy as np

    from geosurge.parity import evaluate_gates, gates_passed, parity_metrics

    from .bundle import open_bundle
    from .localizer import Localizer

    bundle = open_bundle(bundle_dir, verify=False, backend=backend)
    files = bundle.verify_checksums()
    loc = Localizer(bundle_dir, backend=backend, threads=threads, verify=False)
    with np.load(bundle.path("golden"), allow_pickle=False) as z:
        inputs, ref = z["inputs"], z["embedding"]
    dep = loc.embed(inputs)
    metrics = parity_metrics(ref, dep, loc.scorer)
    gates = {k: tuple(v) for k, v in bundle.manifest.get("parity_gates", {}).items()} or None
    rows = evaluate_gates(metrics, gates)
    return {"bundle": str(bundle_dir), "backend": backend, "files": files, "metrics": metrics, "gates": rows,
            "passed": gates_passed(rows)}


def cmd_verify(args) -> int:
    from geosurge.parity import format_parity
    from geosurge.report import format_table, write_json

    from .bundle import BundleError

    try:
        rep = verify_bundle(args.bundle, args.backend, args.threads)
    except BundleError as e:
        print(f"verify: FAIL: {e}", file=sys.stderr)
        if args.json:
            write_json(args.json, {"bundle": args.bundle, "passed": False, "error": str(e)})
        return 1
    print(format_table(rep["files"], title=f"{args.bundle}: {len(rep['files'])} files, sha256 ok"))
    print()
    print(format_parity(rep["metrics"], rep["gates"],
                        title=f"golden replay ({args.backend}) vs FP32 torch reference stored in the bundle"))
    print(f"verify: {'PASS' if rep['passed'] else 'FAIL'}")
    if args.json:
        write_json(args.json, rep)
    return 0 if rep["passed"] else 1


# ---- bench ---------------------------------------------------------------------------------------------------
def _percentile(v, q):
    import numpy as np

    return float(np.percentile(np.asarray(v), q))


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM (getrusage's ru_maxrss survives exec, so a child started
    from a large parent would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    import sys as _sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if _sys.platform == "darwin" else peak / 1024.0


def golden_jpegs(bundle) -> list[bytes]:
    """The bundle's golden photos, de-normalised and JPEG-encoded, so the decode stage has real work."""
    import cv2
    import numpy as np

    spec = bundle.preprocess
    with np.load(bundle.path("golden"), allow_pickle=False) as z:
        inputs = z["inputs"]
    out = []
    for x in inputs:
        rgb = x.transpose(1, 2, 0) * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
        rgb = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
        if spec.channel_order == "BGR":
            rgb = rgb[..., ::-1]
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        out.append(buf.tobytes())
    return out


def bench_bundle(bundle_dir, backend="onnxruntime", threads=None, images=None, iters=50, warmup=5) -> dict:
    from .localizer import Localizer, expand_inputs

    loc = Localizer(bundle_dir, backend=backend, threads=threads)
    sources = [p.read_bytes() for p in expand_inputs(images)] if images else golden_jpegs(loc.bundle)
    if not sources:
        raise GeosurgeError("bench: no images")
    stages = {k: [] for k in ("decode", "preprocess", "inference", "cell_search", "total")}
    for i in range(warmup + iters):
        pred = loc.locate(sources[i % len(sources)])
        if i >= warmup:
            for k, v in pred["timing_ms"].items():
                stages[k].append(v)
            stages["total"].append(sum(pred["timing_ms"].values()))
    rows = [{"stage": k, "p50_ms": _percentile(v, 50), "p95_ms": _percentile(v, 95), "mean_ms": sum(v) / len(v)}
            for k, v in stages.items()]
    total_mean = rows[-1]["mean_ms"]
    return {"bundle": str(bundle_dir), "backend": backend, "threads": threads, "iters": iters, "stages": rows,
            "throughput_img_s": 1000.0 / total_mean, "peak_rss_mb": peak_rss_mb(),
            "precision": loc.bundle.manifest["model"]["precision"],
            "model_mb": loc.bundle.path("model").stat().st_size / 1e6}


def cmd_bench(args) -> int:
    from geosurge.report import format_table, write_json

    t0 = time.perf_counter()
    rep = bench_bundle(args.bundle, args.backend, args.threads, args.images, args.iters, args.warmup)
    print(format_table(rep["stages"], title=f"{args.bundle} ({rep['backend']}, {rep['precision']}, "
                                            f"{args.iters} runs, {time.perf_counter() - t0:.1f}s)"))
    print(f"throughput {rep['throughput_img_s']:.1f} img/s   peak RSS {rep['peak_rss_mb']:.0f} MB   "
          f"model {rep['model_mb']:.1f} MB")
    if args.json:
        write_json(args.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
