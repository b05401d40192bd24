"""``geosurge export``: a GeoSURGE model -> a bundle (ONNX at fp32 / fp16 / int8 / int8-dynamic for onnxruntime, or
the TensorRT-bound ONNX with ``--target tensorrt``)."""
from __future__ import annotations


def register(sub) -> None:
    from ..export.coreml import COREML_PRECISIONS
    from ..export.quantize import CALIBRATION_METHODS, PRECISIONS
    from ..runtime.cells import TABLE_DTYPES

    p = sub.add_parser("export", help="export a model into a bundle")
    p.add_argument("--model", choices=["paper", "edge", "tiny", "nano"], help="config to build (with --seed) when no "
                   "--checkpoint is given; without a trained checkpoint predictions are not meaningful")
    p.add_argument("--checkpoint", help="a checkpoint directory (geosurge train / save_pretrained)")
    p.add_argument("--cells", help="hierarchy for --model (default: the default hierarchy)")
    p.add_argument("--seed", type=int, default=0, help="init seed for --model (recorded for parity)")
    p.add_argument("--format", default="onnx", choices=["onnx", "coreml"],
                   help="onnx (onnxruntime / TensorRT) or coreml (an .mlpackage for iOS 17+ / macOS 14+)")
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime (CPU path) or tensorrt (modelopt QDQ ONNX + readiness report; the engine is "
                        "built on the device)")
    p.add_argument("--precision", default=None, choices=list(dict.fromkeys(PRECISIONS + COREML_PRECISIONS)),
                   help=f"onnx: {', '.join(PRECISIONS)} (default fp32); coreml: {', '.join(COREML_PRECISIONS)} "
                        "(default fp16)")
    p.add_argument("--precision-search", choices=["auto"], help="int8: exclude the nodes with the worst measured "
                   "error, group by group, until the parity gates pass on held-out calibration images")
    p.add_argument("--calib", metavar="DIR|CSV", help="calibration images: a folder or a manifest (path,lat,lon; "
                   "stratified over the hierarchy). Default: augmented views of the sample photos")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--calib-method", default="minmax", choices=CALIBRATION_METHODS)
    p.add_argument("--calib-cache", metavar="DIR", default=None, help="cache preprocessed calibration sets here")
    p.add_argument("--exclude-nodes", nargs="+", default=[], metavar="NODE", help="ONNX node names kept in float")
    p.add_argument("--table", default="float16", choices=[*TABLE_DTYPES, "fp16", "fp32"], help="cell table storage")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (default static batch 1)")
    p.add_argument("--with-logits", action="store_true", help="also output per-level logits in-graph")
    p.add_argument("--golden", help="folder of photos for the golden probes (default: sample photos)")
    p.add_argument("-o", "--output", required=True, help="bundle directory")
    p.set_defaults(func=cmd_export)


def load_calibration(args, spec, hierarchy, log=print):
    from ..calibration import build_calibration_set, sample_views_set

    if args.calib:
        return build_calibration_set(args.calib, spec, size=args.calib_size, hierarchy=hierarchy,
                                     cache_dir=args.calib_cache, log=log)
    return sample_views_set(spec, size=args.calib_size, log=log)


def cmd_export(args) -> int:
    import json
    import sys

    import torch

    from ..export.bundle import write_bundle
    from ..export.quantize import QuantConfig
    from ..export.source import load_model
    from ..geo import load_hierarchy
    from ..images import list_images
    from ..samples import sample_photo_paths

    from ..errors import GeosurgeError
    from ..export.coreml import COREML_PRECISIONS

    torch.set_num_threads(args.threads)
    if args.format == "coreml":
        precision = args.precision or "fp16"
        if precision not in COREML_PRECISIONS:
            raise GeosurgeError(f"--format coreml takes --precision {', '.join(COREML_PRECISIONS)}, not {precision}")
        if args.target != "onnxruntime" or args.precision_search:
            raise GeosurgeError("--format coreml does not take --target / --precision-search")
        cfg = QuantConfig("fp32")
    else:
        precision = args.precision or "fp32"
        if precision in COREML_PRECISIONS and precision not in ("fp32", "fp16"):
            raise GeosurgeError(f"--precision {precision} is a Core ML precision (--format coreml)")
        cfg = QuantConfig(precision=precision, calibrate_method=args.calib_method,
                          nodes_to_exclude=list(args.exclude_nodes), search=args.precision_search)
    hierarchy = load_hierarchy(args.cells) if args.cells else None
    model, source = load_model(args.model, args.checkpoint, args.seed, hierarchy)
    if args.golden:
        listing = list_images([args.golden])
        for line in listing.skip_lines():
            print(f"golden: {line}")
        photos = listing.paths
    else:
        photos = sample_photo_paths()
    calib = load_calibration(args, model.config.preprocess, model.hierarchy) if cfg.needs_calibration else None
    out = write_bundle(args.output, model, source, photos, quant=cfg, calibration=calib, target=args.target,
                       table_dtype={"fp16": "float16", "fp32": "float32"}.get(args.table, args.table),
                       opset=args.opset, dynamic_batch=args.dynamic_batch,
                       with_logits=args.with_logits, threads=args.threads, fmt=args.format,
                       coreml_precision=precision)
    check = json.loads((out / "manifest.json").read_text()).get("quantization", {}).get("check")
    if check and not check["passed"]:
        failed = ", ".join(g["gate"] for g in check["gates"] if g["pass"] != "PASS")
        print(f"export: the {precision} model FAILS the parity gates on held-out images ({failed}); the "
              "bundle is written for inspection. Try --precision-search auto, --exclude-nodes or another precision.",
              file=sys.stderr)
        return 1
    return 0
