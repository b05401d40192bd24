"""``geosurge prune``: cut and compress a bundle's cell hierarchy for a device; ``--report`` measures the cost."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune / compress a bundle's cell hierarchy (region, prior mass, levels, "
                                     "int8, PCA) and report what the cut costs")
    p.add_argument("bundle", help="source bundle directory")
    p.add_argument("-o", "--output", required=True, help="pruned bundle directory")
    p.add_argument("--bbox", metavar="MINLON,MINLAT,MAXLON,MAXLAT", help="MINLON > MAXLON crosses the antimeridian; "
                   "write --bbox=-10,35,30,60 when MINLON is negative")
    p.add_argument("--geojson", metavar="FILE", help="a Polygon / MultiPolygon (Feature[Collection]) file")
    p.add_argument("--countries", metavar="ISO2[,ISO2...]", help="Natural Earth country polygons (e.g. FR,BE)")
    p.add_argument("--keep-mass", type=float, metavar="P", help="fewest finest cells carrying P of the photo counts")
    p.add_argument("--levels", type=int, metavar="N", help="keep the N coarsest levels")
    p.add_argument("--drop-levels", metavar="K[,K...]", help="drop these level indices")
    p.add_argument("--table", choices=["fp16", "int8", "fp32", "float16", "float32"],
                   help="table storage (default: the source's)")
    p.add_argument("--dim", type=int, metavar="K", help="PCA of the cell embeddings to K dimensions")
    p.add_argument("--report", action="store_true", help="measure the cut against the unpruned bundle")
    p.add_argument("--images", nargs="+", help="images for --report (default: the sample photos)")
    p.add_argument("--probes", type=int, default=512, help="--report also on N probe embeddings (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.set_defaults(func=cmd_prune)


def cut_from_args(args):
    from ..errors import GeosurgeError
    from ..export.prune import Cut

    drop = None
    if args.drop_levels:
        try:
            drop = [int(v) for v in args.drop_levels.split(",")]
        except ValueError:
            raise GeosurgeError(f"--drop-levels {args.drop_levels!r}: expected level indices like 1,3") from None
    from ..runtime.cells import TABLE_ALIASES

    return Cut(bbox=args.bbox, geojson=args.geojson, countries=args.countries, keep_mass=args.keep_mass,
               levels=args.levels, drop_levels=drop, table=TABLE_ALIASES.get(args.table, args.table), dim=args.dim)


def cmd_prune(args) -> int:
    from ..export.prune import evaluate_cut, probe_embeddings, prune_bundle
    from ..report import format_table, write_json

    out = prune_bundle(args.bundle, args.output, cut_from_args(args))
    if not args.report:
        return 0
    from ..runtime import Localizer
    from ..images import list_images
    from ..samples import sample_photo_paths

    src = Localizer(args.bundle, threads=args.threads)
    listing = list_images(args.images if args.images else sample_photo_paths())
    import numpy as np

    from ..errors import GeosurgeError

    xs, summary = [], listing.summary()
    for line in listing.skip_lines():
        print(f"  {line}")
    for pth in listing.paths:
        try:
            xs.append(src.preprocess(pth))
            summary.count(True)
        except GeosurgeError as e:  # an unreadable image is reported and skipped
            summary.count(False)
            print(f"  refused {e}")
    print(f"prune: {summary.line()}")
    sets = {}
    if xs:
        sets["images"] = src.embed(np.stack(xs))
    if args.probes:
        sets["probes"], _ = probe_embeddings(src.scorer, args.probes)
    rows = []
    for name, emb in sets.items():
        full = evaluate_cut(src.scorer, args.bundle, emb)
        rep = evaluate_cut(src.scorer, out, emb)
        rows += [{"on": name, "bundle": "unpruned", **_row(full, full)},
                 {"on": name, "bundle": "cut", **_row(rep, full)}]
    print(format_table(rows, title=f"\ncost of the cut ({rows[1]['cut'] if rows else ''}) vs the unpruned bundle"))
    if args.json:
        write_json(args.json, {"bundle": str(out), "rows": rows})
    return 0


def _row(r: dict, full: dict) -> dict:
    return {"cut": r["cut"], "cells": r["cells"], "levels": r["levels"], "table_mb": r["table_mb"],
            "search_ms": r["search_ms"], "n": r["n"], "outside_share": r["outside_share"],
            "outside_flagged": r["outside_flagged"], "inside_flagged": r["inside_flagged"],
            "level_agree_min": r["level_agreement_min"], "median_drift_km": r["median_drift_km"],
            "p95_drift_km": r["p95_drift_km"]}
