"""``geosurge-run``: the on-device command line (torch-free): locate, verify, bench, build-engine. Thin: the work is
in ``localizer`` / ``stream`` (locate), ``verify``, ``bench`` and ``trt`` (build-engine)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from geosurge import __version__
from geosurge.errors import GeosurgeError, run_command
from geosurge.formats import Backend
from geosurge.manifest import ENGINE_FILE
from geosurge.privacy import ALLOW_ENV


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a one-line usage error, exit 2)."""
    return _number(text, int, 1, ">= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, 0, ">= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = _number(text, float, None, "> 0")
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return v


def _number(text: str, kind, low, rule: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if low is not None and v < low:
        raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geosurge-run", description="Run a geosurge bundle on this device (no torch).",
        epilog="exit codes: 0 ok; 1 when any input could not be located (each has its own ERROR line, the others "
               "are still located) or none was found, a stream is lost, or verify fails (a bundle verify cannot open "
               "included); 2 for a bad argument or a bundle locate / bench cannot open (one error line). "
               "No telemetry: ONNX Runtime's and OpenVINO's usage telemetry is off unless "
               f"{ALLOW_ENV}=1 (docs/runtime.md).")
    p.add_argument("--version", action="version", version=f"geosurge-run {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("bundle", help="bundle directory")
        sp.add_argument("--backend", default=None, choices=[b.value for b in Backend],
                        help="default: the one the bundle's format implies (geosurge.formats.FORMAT_BACKENDS)")
        sp.add_argument("--threads", type=int, default=None, help="inference threads (default: backend's)")
        sp.add_argument("--device", default=None, help="openvino: the device (CPU, GPU, GPU.1, NPU, AUTO; default CPU)")
        sp.add_argument("--precision-hint", default=None, choices=["f32", "bf16", "f16"],
                        help="openvino: INFERENCE_PRECISION_HINT (default: the device's own, e.g. bf16 on CPUs with "
                             "AMX / AVX512-BF16; recorded in the report)")

    lo = sub.add_parser("locate", help="locate images (files or folders), or frames of a camera / stream / video")
    common(lo)
    lo.add_argument("inputs", nargs="*", metavar="PATH", help="image files or folders")
    lo.add_argument("--source", help="a camera index (0), a video file, an RTSP URL, or an OpenCV GStreamer pipeline "
                                     "(anything with '!', e.g. nvarguscamerasrc ... ! appsink); see docs/tensorrt.md")
    lo.add_argument("--every", type=positive_int, default=1, help="--source: locate every Nth frame (default 1)")
    lo.add_argument("--max-frames", type=positive_int, default=None, help="--source: stop after N located frames")
    lo.add_argument("--fuse", type=positive_int, default=1, metavar="K",
                    help="--source: fuse evidence over the last K located frames (mean of their embeddings; "
                         "default 1)")
    lo.add_argument("--open-timeout", type=positive_float, default=10.0, metavar="S",
                    help="--source: seconds allowed to open / connect (RTSP handshake included; default 10)")
    lo.add_argument("--read-timeout", type=positive_float, default=5.0, metavar="S",
                    help="--source: seconds without a frame before a live source counts as stalled (default 5)")
    lo.add_argument("--reconnects", type=non_negative_int, default=5, metavar="N",
                    help="--source: reopen attempts per outage of a live source, with exponential backoff "
                         "(0: give up at once; default 5); when they fail: 'stream lost after N frames', exit 1")
    lo.add_argument("--backoff", type=positive_float, default=0.5, metavar="S",
                    help="--source: first reconnect wait; doubles per attempt up to 8 s (default 0.5)")
    lo.add_argument("--json", action="store_true", help="one JSON line per input")
    lo.add_argument("--geojson", metavar="FILE", help="also write a GeoJSON FeatureCollection")
    lo.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="cells listed per image (default 5)")
    lo.add_argument("--beam", type=positive_int, default=None, metavar="B",
                    help="beam width for the cell search (default: exact)")
    lo.set_defaults(func=cmd_locate)

    ve = sub.add_parser("verify", help="check every sha256 and replay the golden inputs against the FP32 reference")
    common(ve)
    ve.add_argument("--simulate-int8", action="store_true", default=None,
                    help="onnxruntime, INT8 bundle: replay as simulated INT8 (QDQ as float arithmetic: exact integer "
                         "accumulation, as ARM dot-product, VNNI / AMX and TensorRT kernels compute), not on this "
                         "CPU's kernels")
    ve.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ve.set_defaults(func=cmd_verify)

    cb = sub.add_parser("choose-backend", help="time every installed backend that reads the bundle (paced, "
                                               "interleaved) with golden parity; the fastest at parity becomes this "
                                               "machine's default for it (BUNDLE/backend.json)")
    cb.add_argument("bundle", help="the bundle folder")
    cb.add_argument("--threads", type=int, default=None, help="inference threads for every backend (default: each "
                                                               "library's own)")
    cb.add_argument("--min-speedup", type=float, default=1.0, metavar="X",
                    help="another backend must beat the default by more than X (default 1.0)")
    cb.add_argument("--iters", type=int, default=30, help="timed runs per backend, interleaved (default 30)")
    cb.add_argument("--pause-ms", type=float, default=100.0, help="pause before each timed call (a camera's pace)")
    cb.add_argument("--images", nargs="+", metavar="PATH",
                    help="the deployment's own images (files, folders, CSV manifests path,lat,lon): every backend is "
                         "also compared on them with the format's default backend under the km gates (recommended: "
                         "six golden probes are too few to judge a BF16 / FP16 backend)")
    cb.add_argument("--dry-run", action="store_true", help="measure and print; write nothing")
    cb.add_argument("--json", metavar="FILE", help="write the record (every row, the reason) as JSON")
    cb.set_defaults(func=cmd_choose_backend)

    be = sub.add_parser("bench", help="latency per stage, throughput and peak RSS")
    common(be)
    be.add_argument("--images", nargs="*", help="images to time (default: the bundle's golden photos)")
    be.add_argument("--iters", type=int, default=50)
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--pause-ms", type=float, default=0.0, help="pause before each call: paced, as a camera "
                    "(100 = 10 fps); default 0, back-to-back")
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


# ---- locate --------------------------------------------------------------------------------------------------
def cmd_locate(args) -> int:
    from .localizer import Localizer
    from .verify import export_check, export_check_line

    if not args.inputs and not args.source:
        raise GeosurgeError("locate: give image paths or --source")
    with Localizer(args.bundle, backend=args.backend, threads=args.threads, beam=args.beam,
                   options=runner_options(args)) as loc:
        refused = export_check_line(export_check(loc.bundle.manifest))
        if refused:
            print(f"geosurge-run: warning: {args.bundle}: {refused}", file=sys.stderr, flush=True)
        chosen = recorded_backend_line(loc, args.backend)
        if chosen:
            print(f"geosurge-run: {chosen}", file=sys.stderr, flush=True)
        if args.source is not None:
            return locate_stream(loc, args)
        return locate_files(loc, args)


def locate_files(loc, args) -> int:
    from geosurge.images import list_images

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
            msg = str(e).removeprefix(f"{path}: ")  # the message usually names the file already
            print(json.dumps(rec) if args.json else f"{path}: ERROR {msg}", flush=True)
            continue
        rec = {"input": str(path), **pred}
        features.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(f"{path}: {prediction_text(pred)}", flush=True)
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


def prediction_text(pred: dict) -> str:
    """``lat, lon  confidence C  ±R km  near PLACE`` for the human-readable lines (files and frames alike). The
    place's admin1 is shown when it is a name or a letter code (CA, NSW); GeoNames' numeric codes (02) say nothing
    to a reader and are left to the JSON."""
    place = pred.get("place")
    where = ""
    if place:
        admin = place.get("admin1") or ""
        where = "  near " + ", ".join(x for x in (place["name"], "" if admin.isdigit() else admin,
                                                  place["country"]) if x)
    return (f"{pred['lat']:.4f}, {pred['lon']:.4f}  confidence {pred['confidence']:.3f}  "
            f"±{pred['uncertainty_km']:,.0f} km{where}")


def locate_stream(loc, args) -> int:
    """One JSON line (or text line) per located frame of ``--source``. A live source that is lost (stalled or
    dropped, and not back after ``--reconnects`` attempts) ends with 'stream lost after N frames' on stderr and exit 1;
    the end of a video file is exit 0."""
    from .sources import SourceOptions, StreamLost
    from .stream import locate_frames

    import os

    # our own lines say what happened to the source; OpenCV's / FFmpeg's warnings about the same stall are noise here
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    options = SourceOptions(open_timeout_s=args.open_timeout, read_timeout_s=args.read_timeout,
                            reconnects=args.reconnects, backoff_s=args.backoff)
    located = 0
    try:
        for rec in locate_frames(loc, args.source, args.every, args.max_frames, args.fuse, args.top_k, options,
                                 log=lambda m: print(f"geosurge-run: {m}", file=sys.stderr, flush=True)):
            located += 1
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                print(f"frame {rec['frame']}: {prediction_text(rec)}", flush=True)
    except StreamLost as e:
        # the count of frames read is in the message; the located count only when --every made them differ
        extra = f" ({located} located)" if located != e.frames else ""
        print(f"geosurge-run: {e}{extra}", file=sys.stderr, flush=True)
        return 1
    if not located:
        print(f"geosurge-run: no frames read from {args.source}", file=sys.stderr)
        return 1
    return 0


# ---- build-engine ----------------------------------------------------------------------------------------------
def cmd_build_engine(args) -> int:
    from geosurge.formats import Target

    from .bundle import open_bundle
    from .trt import BuildSettings, build_engine, require_onnx, settings_for_bundle, trtexec_command

    bundle = open_bundle(args.bundle)
    require_onnx(bundle)
    m = bundle.manifest
    if m.model.target != Target.TENSORRT:
        print(f"note: {args.bundle} was exported for {m.model.target}; `geosurge export --target tensorrt` checks "
              "TensorRT readiness and writes the QDQ ONNX for INT8/FP8", file=sys.stderr)
    rep = m.quantization.readiness if m.quantization is not None else None
    if rep:
        print("TensorRT readiness (checked at export): " + ", ".join(f"{c['check']} {c['status']}"
                                                                     for c in rep["checks"]))
    s = settings_for_bundle(m.quantization, BuildSettings(
        fp16=args.fp16, int8=args.int8, fp8=args.fp8, workspace_gb=args.workspace, dla_core=args.dla_core,
        timing_cache=args.timing_cache, strongly_typed=args.strongly_typed, max_batch=args.max_batch))
    plan = args.output or str(bundle / ENGINE_FILE)
    shape = m.io.input.shape or []
    shown = BuildSettings(**{**s.__dict__, "strongly_typed": bool(s.strongly_typed)})
    print("trtexec equivalent (TensorRT " + ("11+" if s.strongly_typed else "10") + "):\n  "
          + trtexec_command(bundle.path("model"), plan, shown, input_name=m.io.input.name,
                            shape=[1 if isinstance(d, str) else d for d in shape]))
    build_engine(bundle, s, plan)
    return 0


def runner_options(args) -> dict:
    """The backend-specific options given on the command line (a backend that does not take one refuses it)."""
    return {k: v for k, v in (("device", getattr(args, "device", None)),
                              ("precision_hint", getattr(args, "precision_hint", None)),
                              ("simulate_int8", getattr(args, "simulate_int8", None))) if v is not None}


def describe_runner(backend: str, options: dict) -> str:
    """``openvino, CPU, INFERENCE_PRECISION_HINT bf16``: the backend and what changes its numerics."""
    extra = []
    if options.get("device"):
        extra.append(str(options["device"]))
    if options.get("INFERENCE_PRECISION_HINT"):
        extra.append(f"INFERENCE_PRECISION_HINT {options['INFERENCE_PRECISION_HINT']}")
    if options.get("simulate_int8"):
        extra.append("INT8 simulated: exact integer accumulation")
    return ", ".join([backend, *extra])


def recorded_backend_line(loc, asked: str | None) -> str | None:
    """A line naming the backend when none was asked and a recorded choice (``choose-backend``'s sidecar or the
    manifest's ``backend_choice``) picked another than the format's default; None otherwise."""
    from geosurge.formats import default_backend

    from .backends.choice import recorded_choice, sidecar_path

    used = loc.runner.name
    if asked or used == default_backend(loc.bundle.manifest.model.format):
        return None
    rec = recorded_choice(loc.bundle) or {}
    where = sidecar_path(loc.bundle) if sidecar_path(loc.bundle).is_file() else "the manifest's backend_choice"
    return (f"backend {describe_runner(used.value, getattr(loc.runner, 'options', {}) or {})}: this machine's "
            f"recorded choice ({where}: {rec.get('reason', 'measured faster at parity')}); --backend overrides")


# ---- verify --------------------------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    from geosurge.parity import failed_gates_text, format_parity
    from geosurge.report import format_table, write_json

    from .bundle import BundleError
    from .verify import export_check_line, measured_suffix, verify_bundle

    try:
        rep = verify_bundle(args.bundle, args.backend, args.threads, **runner_options(args))
    except BundleError as e:
        print(f"verify: FAIL: {e}", file=sys.stderr)
        if args.json:
            write_json(args.json, {"bundle": args.bundle, "passed": False, "error": str(e)})
        return 1
    print(format_table(rep["files"], title=f"{args.bundle}: {len(rep['files'])} files, sha256 ok"))
    print()
    print(format_parity(rep["metrics"], rep["gates"],
                        title=f"golden replay ({describe_runner(rep['backend'], rep['runner_options'])}) vs FP32 "
                              "torch reference stored in the bundle"))
    check = rep["export_check"]
    line = export_check_line(check)
    print(f"export's held-out parity check: {check['status']}" + (f" on {check['images']} image(s)"
                                                                 if check["images"] else "")
          + measured_suffix(check))
    if not rep["golden_passed"]:
        print(f"verify: FAIL: the golden replay on this machine fails {failed_gates_text(rep['gates'])}",
              file=sys.stderr)
    if line:
        print(f"verify: FAIL: {line}", file=sys.stderr)
    for note in rep["notes"]:
        print(f"verify: note: {note}", file=sys.stderr)
    print(f"verify: {'PASS' if rep['passed'] else 'FAIL'}")
    if args.json:
        write_json(args.json, rep)
    return 0 if rep["passed"] else 1


# ---- choose-backend ------------------------------------------------------------------------------------------
def cmd_choose_backend(args) -> int:
    from geosurge.report import format_table, write_json

    from .backends.choice import FEW_IMAGES, measure_backends, write_choice
    from .bundle import open_bundle

    bundle = open_bundle(args.bundle)
    try:
        rec = measure_backends(bundle, threads=args.threads, iters=args.iters, pause_ms=args.pause_ms,
                               min_speedup=args.min_speedup, images=args.images, log=lambda m: None)
    except GeosurgeError as e:
        print(f"choose-backend: {e}", file=sys.stderr)
        return 2
    on_images = "images" in rec
    for bad in rec["images"]["refused"] if on_images else []:
        print(f"choose-backend: refused {bad['error']}", file=sys.stderr)
    for other in rec["images"]["not_images"] if on_images else []:
        print(f"choose-backend: skipped {other['input']}: {other['reason']}", file=sys.stderr)
    if on_images and rec["images"]["n"] < FEW_IMAGES:
        print(f"choose-backend: note: {rec['images']['n']} image(s) of yours: too few to hold a backend to the km "
              f"gates (one image moves the agreement by 1/{rec['images']['n']}); a bf16 / f16 backend needs "
              f"{FEW_IMAGES}+ to be chosen, {FEW_IMAGES * 4}+ recommended",
              file=sys.stderr)

    def images_cols(r):
        if not on_images:
            return {}
        passed = r.get("images_parity_passed")
        return {"images": "" if passed is None else ("PASS" if passed else "FAIL"),
                "images_agreement": r.get("images_agreement"), "images_p95_km": r.get("images_p95_drift_km"),
                "images_cos": r.get("images_cosine_mean"),
                **({"images_dacc_pts": r.get("images_accuracy_delta_min_pts")}
                   if rec["images"]["ground_truth"] else {})}

    def verdict(passed):
        return "" if passed is None else ("PASS" if passed else "FAIL")

    rows = [{"backend": r["backend"], "hint": (r.get("options") or {}).get("INFERENCE_PRECISION_HINT", ""),
             "p50_ms": r.get("p50_ms"), "p95_ms": r.get("p95_ms"), "speedup": r.get("speedup"),
             "speedup_p10_p90": (f"{r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}" if r.get("speedup_p10") else ""),
             "golden": verdict(r.get("golden_parity_passed", r.get("parity_passed"))),
             "p95_drift_km": r.get("p95_drift_km"), "cosine_mean": r.get("cosine_mean"), **images_cols(r),
             **({"parity": verdict(r.get("parity_passed"))} if on_images else {}),
             "note": r.get("skipped") or (f"images fail {r['images_failed']}" if r.get("images_failed") else "")
             or ("not chosen: needs --images" if r.get("needs_images") else "")}
            for r in rec["measured"]]
    what = "speedup: onnxruntime's p50 over the backend's, speedup_p10_p90: its 10th-90th percentile round by " \
        "round; golden: replay of the bundle's golden probes under the manifest's gates" + (
        f"; images: {rec['images']['n']} image(s) of yours vs {rec['images']['reference']}; parity: both must pass"
        if on_images else " (add --images for your own)")
    print(format_table(rows, title=f"{args.bundle}: backends on this machine ({rec['machine']}), {args.iters} paced "
                                   f"interleaved runs; {what}"))
    print(f"choose-backend: {rec['reason']}")
    if not args.dry_run:
        print(f"choose-backend: default for this bundle on this machine -> {rec['backend']} "
              f"({write_choice(bundle, rec)})")
    else:
        print("choose-backend: --dry-run: nothing written (the bundle's default stays as it was)")
    if args.json:
        write_json(args.json, rec)
    return 0


# ---- bench ---------------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from geosurge.report import format_table, write_json

    from .bench import bench_bundle

    t0 = time.perf_counter()
    rep = bench_bundle(args.bundle, args.backend, args.threads, args.images, args.iters, args.warmup,
                       args.pause_ms)
    for line in rep["skipped"]:  # every input accounted for: timed, or named here
        print(f"geosurge-run: {line}", file=sys.stderr)
    for bad in rep["refused"]:
        msg = bad["error"].removeprefix(f"{bad['input']}: ")
        print(f"geosurge-run: refused {bad['input']}: {msg}", file=sys.stderr)
    paced = f", {args.pause_ms:g} ms pause before each" if args.pause_ms else ", back-to-back"
    print(format_table(rep["stages"], title=f"{args.bundle} ({rep['backend']}, {rep['precision']}, "
                                            f"{args.iters} runs{paced}, {time.perf_counter() - t0:.1f}s)",
                       decimals={"p50_ms": 2, "p95_ms": 2, "mean_ms": 2}))  # one precision for all the ms
    print(f"throughput {rep['throughput_img_s']:.1f} img/s   peak RSS {rep['peak_rss_mb']:.0f} MB   "
          f"model {rep['model_mb']:.1f} MB")
    if args.json:
        write_json(args.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
