"""``geosurge model info``: parameters and GFLOPs per part for each config."""
from __future__ import annotations

import json


def register(sub) -> None:
    from ..models.config import CONFIGS

    p = sub.add_parser("model", help="inspect model configs")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    i = msub.add_parser("info", help="parameters and GFLOPs per part (backbone, segmenter, fusion, cell tables)")
    i.add_argument("--config", action="append", choices=list(CONFIGS),
                   help="config name (repeatable; default: all)")
    i.add_argument("--cells", help="hierarchy file (default: the default hierarchy)")
    i.add_argument("--checkpoint", action="append", default=[], help="a checkpoint: what it holds (repeatable)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from ..geo import build_default_hierarchy, load_hierarchy
    from ..models import CONFIGS, get_config
    from ..models.info import checkpoint_info, model_info
    from ..report import format_table

    h = load_hierarchy(args.cells) if args.cells else build_default_hierarchy()
    infos = [model_info(get_config(name), h) for name in (args.config or ([] if args.checkpoint else list(CONFIGS)))]
    infos += [checkpoint_info(c) for c in args.checkpoint]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    for inf in infos:
        print(format_table(inf["parts"], ["part", "params_M", "trainable_M", "GFLOPs"],
                           title=f"{inf['config']}: input {'x'.join(map(str, inf['input']))}, "
                                 f"{inf['embed_dim']}-d, cells per level {inf['cells']}"))
        print(format_table(inf["weights"], ["part", "source", "architecture"], title="weights"), end="\n\n")
    print("GFLOPs count 2 FLOPs per multiply-add (torch.utils.flop_counter), batch 1.")
    return 0
