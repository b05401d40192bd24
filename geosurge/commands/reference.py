"""``geosurge reference``: train the reference model on downward views of real georeferenced imagery (frozen
backbone, cached features; minutes on CPU) and report its held-out accuracy in km beside two baselines
(``geosurge.api.reference``). With ``--cache`` the shipped weights are used when they match the recipe."""
from __future__ import annotations


def _footprint(text: str) -> tuple[float, float]:
    from ..errors import GeosurgeError

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise GeosurgeError(f"--footprint-km: expected LO,HI in km, got {text!r}") from None
    return lo, hi


def register(sub) -> None:
    from ..training.reference import ReferenceRecipe

    d = ReferenceRecipe()
    p = sub.add_parser("reference", help="train the reference model on views of real georeferenced imagery")
    p.add_argument("-o", "--output", default="runs/reference", help="output folder: checkpoint/, report.json, "
                                                                    "report.txt, heldout/ (default runs/reference)")
    p.add_argument("--cache", metavar="DIR", help="keep the model in DIR and reuse it afterwards (keyed by a hash of "
                                                 "the recipe): assembled from the shipped weights when they match "
                                                 "the recipe, trained otherwise; -o is then ignored")
    p.add_argument("--retrain", action="store_true", help="with --cache: train even when shipped weights or a "
                                                          "cached model exist (replaces the cached one)")
    p.add_argument("--ship", metavar="DIR", help="also write the trained tensors + their record as shipped weights "
                                                 "into DIR (how geosurge/data/reference was made)")
    p.add_argument("--config", default=d.config, help=f"model config (default {d.config})")
    p.add_argument("--source", default=d.source, help=f"training raster: a named source or a path (GeoTIFF, or an "
                                                      f"equirectangular image) (default {d.source})")
    p.add_argument("--second-source", default=d.second_source, help="the held-out centres from another raster, "
                                                                    f"'none' to skip (default {d.second_source})")
    p.add_argument("--train-views", type=int, default=d.train_views)
    p.add_argument("--test-views", type=int, default=d.test_views)
    p.add_argument("--min-km", type=float, default=d.min_km, help="every held-out centre at least this far from "
                                                                  f"every training centre (default {d.min_km:g})")
    p.add_argument("--footprint-km", type=_footprint, default=d.footprint_km, metavar="LO,HI",
                   help="view ground width range, log-uniform (default %(default)s)")
    p.add_argument("--jitter-km", type=float, default=d.jitter_km)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--table-lr", type=float, default=d.table_lr, help="cell-table lr (default 0: the tables stay "
                                                                      "as initialised)")
    p.add_argument("--lr-decay", type=float, default=d.lr_decay)
    p.add_argument("--train-segmenter", action="store_true", help="train the segmenter head too (default: kept "
                                                                  "as initialised; see docs/reference.md)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--feature-cache", metavar="DIR", help="keep rendered-view backbone features here between runs")
    p.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "torch"],
                   help="runs the frozen backbone for the feature cache (default onnxruntime)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-views", action="store_true", help="do not write the held-out views (heldout/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reference)


def cmd_reference(args) -> int:
    import json

    from .. import api
    from ..training.reference import REPORT_FILE, ReferenceRecipe

    recipe = ReferenceRecipe(config=args.config, source=args.source,
                             second_source=None if str(args.second_source).lower() == "none" else args.second_source,
                             train_views=args.train_views, test_views=args.test_views, min_km=args.min_km,
                             footprint_km=args.footprint_km, jitter_km=args.jitter_km, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, table_lr=args.table_lr, lr_decay=args.lr_decay,
                             train_segmenter=args.train_segmenter, seed=args.seed)
    log = (lambda m: None) if args.json else print
    ref = api.reference(None if args.cache else args.output, recipe=recipe, cache_dir=args.cache or "~/.cache/geosurge",
                        retrain=args.retrain, feature_cache=args.feature_cache, engine=args.engine,
                        threads=args.threads, write_views=not args.no_views, ship_to=args.ship,
                        progress=not args.no_progress, log=log)
    if args.json:
        print(json.dumps(ref.report, indent=2))
    else:
        print(ref.table)
        print(f"checkpoint {ref.checkpoint}; report {ref.checkpoint.parent / REPORT_FILE}"
              + (f"; held-out views {ref.heldout_manifest}" if ref.heldout_manifest else ""))
    return 0
