"""``geosurge export``: a GeoSURGE model -> a bundle (ONNX FP32 for now)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model into a bundle")
    p.add_argument("--model", choices=["paper", "edge", "tiny"], help="config to build (with --seed) when no "
                   "--checkpoint is given; without a trained checkpoint predictions are not meaningful")
    p.add_argument("--checkpoint", help="a checkpoint directory (geosurge train / save_pretrained)")
    p.add_argument("--cells", help="hierarchy for --model (default: the default hierarchy)")
    p.add_argument("--seed", type=int, default=0, help="init seed for --model (recorded for parity)")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--precision", default="fp32", choices=["fp32"])
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (default static batch 1)")
    p.add_argument("--with-logits", action="store_true", help="also output per-level logits in-graph")
    p.add_argument("--golden", help="folder of photos for the golden probes (default: sample photos)")
    p.add_argument("-o", "--output", required=True, help="bundle directory")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export.bundle import write_bundle
    from ..export.source import load_model
    from ..geo import load_hierarchy
    from ..runtime.localizer import expand_inputs
    from ..samples import sample_photo_paths

    hierarchy = load_hierarchy(args.cells) if args.cells else None
    model, source = load_model(args.model, args.checkpoint, args.seed, hierarchy)
    photos = expand_inputs([args.golden]) if args.golden else sample_photo_paths()
    write_bundle(args.output, model, source, photos, precision=args.precision, opset=args.opset,
                 dynamic_batch=args.dynamic_batch, with_logits=args.with_logits)
    return 0
