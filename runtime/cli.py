"""``geosurge-run``: the on-device command line (torch-free): locate, verify, bench."""
from __future__ import annotations

import argparse
import json
import sys
import time

from geosurge import __version__
from geosurge.errors import GeosurgeError, run_command

BACKENDS = ["onnxruntime", "tensorrt", "coreml"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geosurge-run", description="Run a geosurge bundle on this device (no torch).")
    p.add_argument("--version", action="version", version=f"geosurge-run {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("bundle", help="bundle directory")
        sp.add_argument("--backend", default=None, choices=BACKENDS,
                        help="default: coreml for a Core ML bundle, else onnxruntime")
        sp.add_argument("--threads", type=int, default=None, help="inference threads (default: backend's)")

    lo = sub.add_parser("locate", help="locate images (files or folders), or frames of a camera / stream / video")
    common(lo)
    lo.add_argument("inputs", nargs="*", metavar="PATH", help="image files or folders")
    lo.add_argument("--source", help="a camera index (0), a video file, an RTSP URL, or an OpenCV GStreamer pipeline "
                                     "(anything with '!', e.g. nvarguscamerasrc ... ! appsink); see docs/tensorrt.md")
    lo.add_argument("--every", type=int, default=1, help="--source: locate every Nth frame")
    lo.add_argument("--max-frames", type=int, default=None, help="--source: stop after N located frames")
    lo.add_argument("--fuse", type=int, default=1, metavar="K",
                    help="--source: fuse evidence over the last K located frames (mean of their embeddings)")
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

    en = sub.add_parser("build-engine", help="build the TensorRT engine for this device from the bundle's ONNX "
                                             "(TensorRT 10 / 11); writes BUNDLE/model.plan + model.plan.json")
    en.add_argument("bundle")
    en.add_argument("--fp16", action="store_true", help="allow FP16 kernels (TensorRT 10 weakly typed)")
    en.add_argument("--int8", action="store_true", help="INT8 for a QDQ network (set from the bundle if it is one)")
    en.add_argument("--fp8", action="store_true", help="FP8 for a QDQ network (set from the bundle if it is one)")
    en.add_argument("--workspace", type=float, default=2.0, metavar="GB")
    en.add_argument("--dla-core", type=int, default=None, metavar="N", help="Jetson DLA core (GPU fallback on)")
    en.add_argument("--timing-cache", metavar="FILE", help="read / update a timing cache (faster rebuilds)")
    typed = en.add_mutually_exclusive_group()
    typed.add_argument("--strongly-typed", dest="strongly_typed", action="store_true", default=None,
                       help="types from the ONNX (default on TensorRT 11+)")
    typed.add_argument("--weakly-typed", dest="strongly_typed", action="store_false",
                       help="builder flags + precision constraints (default on TensorRT 10)")
    en.add_argument("--max-batch", type=int, default=1, help="profile max batch for a dynamic-batch bundle")
    en.add_argument("-o", "--output", help="plan path (default BUNDLE/model.plan)")
    en.set_defaults(func=cmd_build_engine)
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), argv, "geosurge-run")


def default_backend(bundle_dir) -> str:
    """The backend a bundle's model format implies (the user's --backend wins)."""
    from .bundle import open_bundle

    return "coreml" if open_bundle(bundle_dir, verify=False).manifest["model"]["format"] == "coreml" else "onnxruntime"


def _resolve_backend(args) -> None:
    if getattr(args, "backend", "x") is None:
        args.backend = default_backend(args.bundle)


# ---- locate --------------------------------------------------------------------------------------------------
def cmd_locate(args) -> int:
    from geosurge.images import list_images

    from .localizer import Localizer

    if not args.inputs and not args.source:
        raise GeosurgeError("locate: give image paths or --source")
    _resolve_backend(args)
    loc = Localizer(args.bundle, backend=args.backend, threads=args.threads, beam=args.beam)
    if args.source is not None:
        return locate_stream(loc, args)
    features, failed = [], 0
    listing = list_images(args.inputs)
    summary = listing.summary()
    for line in listing.skip_lines():  # every file is accounted for: a record, an error line, or this line
        print(f"geosurge-run: {line}", file=sys.stderr, flush=True)
    for entry in listing:
        path = entry.path
        try:
            pred = loc.locate(path, top_k=args.top_k)
            summary.count(True)
        except GeosurgeError as e:
            failed += 1
            summary.count(False)
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
    print(f"geosurge-run: {summary.line('located')}", file=sys.stderr)
    if not features and not failed:
        print("geosurge-run: no images found in the given paths", file=sys.stderr)
        return 1
    return 1 if failed else 0


def open_source(source: str):
    """cv2.VideoCapture for a camera index, a file / URL, or a GStreamer pipeline (contains '!')."""
    import cv2

    if source.isdigit():
        cap = cv2.VideoCapture(int(source))
    elif "!" in source:
        cap = cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    else:
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        hint = " (is this OpenCV built with GStreamer? cv2.getBuildInformation())" if "!" in source else ""
        raise GeosurgeError(f"{source}: cannot open the video source{hint}")
    return cap


def locate_stream(loc, args) -> int:
    """Locate frames of a stream: one JSON line (or text line) per located frame; with --fuse K the prediction
    uses the mean embedding of the last K located frames."""
    import cv2
    import numpy as np

    from geosurge.preprocess import preprocess

    cap = open_source(args.source)
    window, n_frames, located = [], 0, 0
    try:
        while args.max_frames is None or located < args.max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            n_frames += 1
            if (n_frames - 1) % max(1, args.every):
                continue
            t0 = time.perf_counter()
            x = preprocess(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), loc.spec)[None]
            emb = loc.embed(x)[0]
            window = (window + [emb / np.linalg.norm(emb)])[-max(1, args.fuse):]
            pred = loc.predict_embedding(np.mean(window, axis=0), args.top_k)
            located += 1
            rec = {"frame": n_frames - 1, "fused_frames": len(window), **pred,
                   "ms": round((time.perf_counter() - t0) * 1e3, 2)}
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                print(f"frame {rec['frame']}: {pred['lat']:.4f}, {pred['lon']:.4f}  confidence "
                      f"{pred['confidence']:.3f}  ±{pred['uncertainty_km']:.0f} km", flush=True)
    finally:
        cap.release()
    if not located:
        print(f"geosurge-run: no frames read from {args.source}", file=sys.stderr)
        return 1
    return 0


# ---- build-engine ----------------------------------------------------------------------------------------------
def cmd_build_engine(args) -> int:
    from .bundle import open_bundle
    from .trt import BuildSettings, build_engine, settings_for_bundle, trtexec_command, PLAN

    bundle = open_bundle(args.bundle)
    if bundle.manifest["model"]["format"] != "onnx":
        raise GeosurgeError(f"{args.bundle}: build-engine needs an ONNX bundle")
    if bundle.manifest["model"].get("target") != "tensorrt":
        print(f"note: {args.bundle} was exported for {bundle.manifest['model'].get('target')}; "
              "`geosurge export --target tensorrt` checks TensorRT readiness and writes the QDQ ONNX for INT8/FP8",
              file=sys.stderr)
    rep = (bundle.manifest.get("quantization") or {}).get("readiness")
    if rep:
        print("TensorRT readiness (checked at export): " + ", ".join(f"{c['check']} {c['status']}"
                                                                     for c in rep["checks"]))
    s = settings_for_bundle(bundle.manifest, BuildSettings(
        fp16=args.fp16, int8=args.int8, fp8=args.fp8, workspace_gb=args.workspace, dla_core=args.dla_core,
        timing_cache=args.timing_cache, strongly_typed=args.strongly_typed, max_batch=args.max_batch))
    plan = args.output or str(bundle.root / PLAN)
    shape = bundle.manifest["io"]["inputs"][0]["shape"]
    shown = BuildSettings(**{**s.__dict__, "strongly_typed": bool(s.strongly_typed)})
    print("trtexec equivalent (TensorRT " + ("11+" if s.strongly_typed else "10") + "):\n  "
          + trtexec_command(bundle.path("model"), plan, shown, shape=[1 if isinstance(d, str) else d
                                                                     for d in shape]))
    build_engine(bundle, s, plan)
    return 0


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
        _resolve_backend(args)
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
    from geosurge.images import list_images

    from .localizer import Localizer

    loc = Localizer(bundle_dir, backend=backend, threads=threads)
    sources = [p.read_bytes() for p in list_images(images).paths if p.is_file()] if images else \
        golden_jpegs(loc.bundle)
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
    _resolve_backend(args)
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
