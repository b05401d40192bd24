"""``geosurge prune``: cut and compress a bundle's cell hierarchy for a device (``geosurge.api.prune``);
``--report`` measures the cost (``geosurge.api.prune_cost``)."""
from __future__ import annotations


def register(sub) -> None:
    from ..runtime.cells import TABLE_CHOICES

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
    p.add_argument("--table", choices=TABLE_CHOICES,
                   help="table storage (default: the source's)")
    p.add_argument("--dim", type=int, metavar="K", help="PCA of the cell embeddings to K dimensions")
    p.add_argument("--report", action="store_true", help="measure the cut against the unpruned bundle")
    p.add_argument("--images", nargs="+", help="images for --report (default: the sample photos)")
    p.add_argument("--probes", type=int, default=512, help="--report also on N probe embeddings (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.set_defaults(func=cmd_prune)


def _drop_levels(text):
    from ..errors import GeosurgeError

    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise GeosurgeError(f"--drop-levels {text!r}: expected level indices like 1,3") from None


def cmd_prune(args) -> int:
    from .. import api
    from ..report import format_table, write_json

    out = api.prune(args.bundle, args.output, bbox=args.bbox, geojson=args.geojson, countries=args.countries,
                    keep_mass=args.keep_mass, levels=args.levels, drop_levels=_drop_levels(args.drop_levels),
                    table=args.table, dim=args.dim)
    if not args.report:
        return 0
    rows = [_row(r) for r in api.prune_cost(args.bundle, out, images=args.images, probes=args.probes,
                                            threads=args.threads)]
    print(format_table(rows, title=f"\ncost of the cut ({rows[1]['cut'] if rows else ''}) vs the unpruned bundle"))
    if args.json:
        write_json(args.json, {"bundle": str(out), "rows": rows})
    return 0


def _row(r: dict) -> dict:
    return {"on": r["on"], "bundle": r["bundle"], **{k: r[k] for k in (
        "cut", "cells", "levels", "table_mb", "search_ms", "n", "outside_share", "outside_flagged", "inside_flagged")},
        "level_agree_min": r["level_agreement_min"], "median_drift_km": r["median_drift_km"],
        "p95_drift_km": r["p95_drift_km"]}
