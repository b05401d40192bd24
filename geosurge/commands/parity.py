"""``geosurge parity``: FP32 torch vs the deployed bundle on the same images (``geosurge.api.parity``); table + JSON;
exit 1 on a failed gate."""
from __future__ import annotations


def register(sub) -> None:
    from ..formats import Backend

    p = sub.add_parser("parity", help="FP32 torch model vs a bundle through the runtime")
    p.add_argument("bundle")
    p.add_argument("--images", nargs="+", help="image files / folders, or CSV manifests (path,lat,lon) whose "
                   "coordinates add the accuracy deltas in km (default: the sample photos)")
    p.add_argument("--checkpoint", help="the FP32 model (default: the manifest's source.reference, the model a QAT "
                   "checkpoint learned from, else its source)")
    p.add_argument("--backend", default=None, choices=[b.value for b in Backend],
                   help="default: the one the bundle's format implies")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default=None, help="openvino: the device (CPU, GPU, NPU, AUTO)")
    p.add_argument("--precision-hint", default=None, choices=["f32", "bf16", "f16"],
                   help="openvino: INFERENCE_PRECISION_HINT (default: the device's own)")
    p.add_argument("--simulate-int8", action="store_true", default=None,
                   help="onnxruntime, INT8 bundle: the QDQ graph unfused (quantize / dequantize as float arithmetic "
                   "around float Conv / MatMul): the grid with exact integer accumulation, as TensorRT, VNNI / AMX "
                   "and ARM dot-product kernels compute it, not this CPU's kernels; for accuracy only (slow)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=cmd_parity)


def cmd_parity(args) -> int:
    import sys

    from .. import api
    from ..parity import format_parity
    from ..report import write_json
    from ..runtime.cli import describe_runner, runner_options

    rep = api.parity(args.bundle, args.images, checkpoint=args.checkpoint, backend=args.backend,
                     threads=args.threads, **runner_options(args))
    runner = describe_runner(rep["backend"], rep["runner_options"])
    print(format_parity(rep["metrics"], rep["gates"], title=f"parity: FP32 torch ({rep['reference']}) vs {args.bundle} "
                                                            f"({rep['precision']}, {runner}), "
                                                            f"{rep['metrics']['n']} images"))
    for note in rep["notes"]:
        print(f"parity: note: {note}", file=sys.stderr)
    print(f"parity: {'PASS' if rep['passed'] else 'FAIL'}")
    if args.json:
        write_json(args.json, rep)
    return 0 if rep["passed"] else 1
