"""``geosurge export``: a GeoSURGE model -> a bundle (``geosurge.api.export``). Targets, formats and precisions are
the rows of ``geosurge.formats.TARGETS``: ONNX for onnxruntime (fp32 / fp16 / int8 / int8-dynamic), the TensorRT-bound
ONNX (``--target tensorrt``: fp32 / fp16 / int8 / fp8), Core ML (``--format coreml``)."""
from __future__ import annotations


def register(sub) -> None:
    from ..export.precision.config import CALIBRATION_METHODS
    from ..formats import PRECISIONS, TARGETS, Format, Target
    from ..models.config import CONFIGS
    from ..runtime.cells import TABLE_CHOICES

    precision_help = "; ".join(f"{s.flag}: {', '.join(p.value for p in s.precisions)} (default {s.default_precision})"
                               for s in TARGETS.values())

    p = sub.add_parser("export", help="export a model into a bundle")
    p.add_argument("--model", choices=list(CONFIGS), help="config to build (with --seed) when no --checkpoint is "
                   "given; without a trained checkpoint predictions are not meaningful")
    p.add_argument("--checkpoint", help="a checkpoint directory (geosurge train / save_pretrained)")
    p.add_argument("--cells", help="hierarchy for --model (default: the default hierarchy)")
    p.add_argument("--seed", type=int, default=0, help="init seed for --model (recorded for parity)")
    p.add_argument("--format", default=None, choices=[f.value for f in Format],
                   help="onnx (default; onnxruntime / TensorRT) or coreml (an .mlpackage for iOS 17+ / macOS 14+)")
    p.add_argument("--target", default=None, choices=[t.value for t in Target if TARGETS[t].format == Format.ONNX],
                   help="with --format onnx: onnxruntime (default; the CPU path) or tensorrt (modelopt QDQ ONNX + "
                        "readiness report; the engine is built on the device)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=precision_help)
    p.add_argument("--precision-search", choices=["auto"], help="int8: exclude the nodes with the worst measured "
                   "error, group by group, until the parity gates pass on held-out calibration images")
    p.add_argument("--calib", metavar="DIR|CSV", help="calibration images: a folder or a manifest (path,lat,lon; "
                   "stratified over the hierarchy; its coordinates add accuracy deltas in km to the held-out check), "
                   "split into calibrate / choose / check parts. fp16 / int8-dynamic: the images parity is checked "
                   "on. Default: augmented views of the sample photos")
    p.add_argument("--qat", action="store_true", help="int8: when all-INT8 PTQ fails the parity gates, "
                   "quantization-aware distillation (the FP32 model teaches a fake-quantized copy on the calibration "
                   "images in onnxruntime's INT8 scheme, torch fake quantization; a GPU when torch sees one), then "
                   "onnxruntime's static INT8 of the tuned weights")
    p.add_argument("--qat-steps", type=int, default=200, metavar="N", help="QAT optimizer steps (default 200)")
    p.add_argument("--qat-lr", type=float, default=2e-5, metavar="LR",
                   help="QAT learning rate (AdamW, cosine decay over the steps; default 2e-5)")
    p.add_argument("--qat-rank-weight", type=float, default=0.0, metavar="W",
                   help="QAT: add W x a ranking loss on the finest cells (the student's score gaps between the "
                        "teacher's top-16 cells against the teacher's: what the parity gates' top-1 agreement and "
                        "drift measure) to the embedding cosine + per-level KL (default 0: off)")
    p.add_argument("--reference", metavar="CKPT", help="the FP32 checkpoint the golden outputs and the parity gates "
                   "measure against (default: the exported model; for a --qat-save checkpoint, the model its QAT "
                   "learned from, as recorded in it)")
    p.add_argument("--qat-save", metavar="DIR", help="keep QAT's tuned FP32 weights as a checkpoint in DIR (QAT is "
                   "training: export DIR with --precision int8 later for the same graph without training again)")
    p.add_argument("--qat-init", metavar="DIR", help="start QAT's student from this checkpoint of the same model "
                   "(a --qat-save of an earlier run: more steps without starting over); the teacher is still "
                   "--checkpoint")
    p.add_argument("--min-speedup", type=float, default=1.0, metavar="X",
                   help="int8 / int8-dynamic: the model must run more than X times faster than FP32 on this machine "
                        "(measured interleaved and paced) or FP32 wins and export exits 1 (default 1.0; 0: no gate)")
    p.add_argument("--reduce-range", action="store_true", help="int8: 7-bit weights (onnxruntime reduce_range), "
                   "which x86 CPUs without VNNI multiply without int16 saturation")
    p.add_argument("--simulate-int8", action="store_true", help="int8: choose and check the model as simulated "
                   "INT8 (QDQ as float arithmetic: exact integer accumulation, as ARM dot-product, VNNI / AMX and "
                   "TensorRT kernels compute) instead of on this CPU's kernels, which saturate on x86 without VNNI: "
                   "for a device unlike this machine (speed is still timed here)")
    p.add_argument("--recommend-backend", action="store_true", help="time every installed backend that reads the "
                   "bundle (onnxruntime, OpenVINO, ...) with golden parity, and record the fastest at parity in the "
                   "manifest: the runtime's default on machines like this one (golden probes only: on the device, "
                   "`geosurge-run choose-backend --images` judges on your images)")
    p.add_argument("--no-bias-correction", action="store_true", help="int8: leave the biases as trained (default: "
                   "each INT8-weight node's bias absorbs the mean error of its rounded weights, measured on the "
                   "calibration images; never for a QAT graph)")
    p.add_argument("--calib-size", type=int, default=256, metavar="N",
                   help="calibration images to draw (default 256), split into calibrate / choose / check parts")
    p.add_argument("--calib-method", default="minmax", choices=CALIBRATION_METHODS,
                   help="how activation ranges are calibrated (default minmax)")
    p.add_argument("--uncertainty-images", metavar="CSV",
                   help="held-out images with ground truth (path,lat,lon; 50+) to calibrate the prediction's "
                        "probabilities on (one temperature, fitted by likelihood; the export prints how often the "
                        "68%% radius, uncertainty_km, then covers the truth: 68%% when calibrated). The answer and "
                        "the top-k do not change. Default: uncalibrated (the model's own, usually overconfident)")
    p.add_argument("--calib-cache", metavar="DIR", default=None, help="cache preprocessed calibration sets here")
    p.add_argument("--exclude-nodes", nargs="+", default=[], metavar="NODE",
                   help="ONNX node names kept in float, e.g. /backbone/conv_stem/Conv (the graph onnxruntime "
                        "quantizes; an INT8 bundle exported with --precision-search auto lists the quantizable ones, "
                        "worst first, in its manifest's quantization.search.ranking; a name the graph lacks is an "
                        "error). With --qat: float in the student too, which trains for that mix")
    p.add_argument("--exclude-nodes-weights", choices=["fp32", "int8"], default="fp32",
                   help="weights of the --exclude-nodes nodes: fp32 (default; float compute on float weights) or "
                        "int8 (weight-only INT8: a quarter of their bytes, dequantized to float at every run, so "
                        "usually slower on onnxruntime)")
    p.add_argument("--table", default="float16", choices=TABLE_CHOICES, help="cell table storage")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for calibration, checks and the timing "
                   "(default 2; the speed gate is measured with them)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, the lowest with "
                   "LayerNormalization as one op)")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (default static batch 1)")
    p.add_argument("--with-logits", action="store_true", help="also output per-level logits in-graph")
    p.add_argument("--golden", help="folder of photos for the golden probes (default: sample photos)")
    p.add_argument("-o", "--output", required=True, help="bundle directory")
    p.set_defaults(func=cmd_export)


def parity_hints(args, manifest=None) -> str:
    """What to try when the model fails the parity gates: for int8 / int8-dynamic the options this run did not use
    (more QAT steps when QAT ran; QAT from the original model for a QAT checkpoint), else another precision."""
    precision = manifest.model.precision.value if manifest is not None else args.precision
    if precision not in ("int8", "int8-dynamic"):
        return "Try another precision (fp32 is the reference itself)."
    config = (manifest.quantization.extra.get("config") or {}) if manifest and manifest.quantization else {}
    tried = {"--precision-search auto": bool(args.precision_search), "--qat": args.qat or precision != "int8",
             "--exclude-nodes": bool(args.exclude_nodes)}
    hints = [k for k, done in tried.items() if not done] + ["another precision"]
    if config.get("from_qat_checkpoint"):  # more QAT goes from the original model, starting from these weights
        hints = [h for h in hints if h != "--qat"]
        hints.insert(0, f"more QAT (--checkpoint ORIGINAL --qat --qat-init {args.checkpoint} --qat-steps N)")
    if args.qat:  # QAT ran and did not reach the gates: more of it, kept this time
        hints.insert(0, f"more --qat-steps than {args.qat_steps} (with --qat-save DIR to keep the weights and "
                        "--qat-init DIR to go on from them; a GPU makes steps cheap)")
    return f"Try {', '.join(hints[:-1])} or {hints[-1]}." if len(hints) > 1 else f"Try {hints[0]}."


def cmd_export(args) -> int:
    import sys
    from pathlib import Path

    from .. import api
    from ..errors import GeosurgeError

    from ..formats import check_precision, resolve_target

    if not args.checkpoint and not args.model:
        raise GeosurgeError("give --model NAME or --checkpoint DIR")
    if args.checkpoint and args.model:
        raise GeosurgeError("give --model NAME or --checkpoint DIR, not both (a checkpoint carries its own config)")
    precision = check_precision(resolve_target(args.format, args.target), args.precision)
    if precision == "fp32" and (args.calib or args.calib_size != 256 or args.calib_method != "minmax"
                                or (args.calib_cache and not args.uncertainty_images)):
        print("note: --calib / --calib-size / --calib-method / --calib-cache choose the images a quantized model is "
              "calibrated and checked on; an FP32 export has none, they change nothing")
    if args.no_bias_correction and (args.precision != "int8" or args.target == "tensorrt"):
        print("note: --no-bias-correction applies to onnxruntime's static int8 only; it changes nothing here")
    if not args.qat and (args.qat_steps != 200 or args.qat_lr != 2e-5):
        print("note: --qat-steps / --qat-lr set how QAT trains; without --qat they change nothing")
    if args.exclude_nodes_weights != "fp32" and not args.exclude_nodes:
        print("note: --exclude-nodes-weights applies to the --exclude-nodes nodes; none are given")
    if args.exclude_nodes and args.precision not in ("int8", "int8-dynamic", "fp8"):
        print(f"note: --exclude-nodes keeps nodes out of a quantized precision; at {args.precision or 'the default'}"
              " precision it changes nothing")
    bundle = api.export(Path(args.checkpoint) if args.checkpoint else args.model, args.output, format=args.format, target=args.target,
                        precision=args.precision, calibration=args.calib, calib_size=args.calib_size,
                        calib_method=args.calib_method, calib_cache=args.calib_cache,
                        precision_search=args.precision_search, exclude_nodes=args.exclude_nodes,
                        exclude_nodes_weights=args.exclude_nodes_weights,
                        bias_correction=not args.no_bias_correction, table=args.table,
                        dynamic_batch=args.dynamic_batch, with_logits=args.with_logits, opset=args.opset,
                        threads=args.threads, golden=args.golden, cells=args.cells, seed=args.seed, qat=args.qat,
                        qat_steps=args.qat_steps, qat_lr=args.qat_lr,
                        qat_rank_weight=args.qat_rank_weight, qat_save=args.qat_save,
                        qat_init=args.qat_init, reference=args.reference,
                        min_speedup=args.min_speedup, reduce_range=args.reduce_range,
                        simulate_int8=args.simulate_int8,
                        recommend_backend=args.recommend_backend, uncertainty_images=args.uncertainty_images)
    m = bundle.manifest
    check = m.check
    decision = (m.quantization.extra.get("decision") if m.quantization is not None else None) or {}
    if m.backend_choice is not None:
        print(f"export: default backend on machines like this one: {m.backend_choice.reason}")
    rc = 0
    if check is not None and check.passed is False:
        print(f"export: the {m.model.precision} model FAILS the parity gates on held-out images "
              f"({', '.join(check.failed_gates())}); the bundle is written for inspection. {parity_hints(args, m)}",
              file=sys.stderr)
        rc = 1
    if decision and not decision.get("passed"):
        print(f"export: {m.model.precision} is not recommended on this machine: {decision['why']} (the bundle is "
              "written for inspection)", file=sys.stderr)
        rc = 1
    if check is not None and check.passed is None:
        print(f"export: note: held-out parity of the {m.model.precision} model was {check.skipped}; run "
              "`geosurge-run verify` where its backend runs", file=sys.stderr)
    return rc
