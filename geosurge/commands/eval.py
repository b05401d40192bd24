"""``geosurge eval``: accuracy in kilometres of checkpoints (torch) and bundles (the runtime, any backend) on a
manifest or a folder of GPS-tagged photos: % within 1 / 25 / 200 / 750 / 2500 km, median and mean km, GeoScore,
per-source rows, several models side by side; a JSON report and two PNG plots."""
from __future__ import annotations


def register(sub) -> None:
    from ..formats import Backend

    p = sub.add_parser("eval", help="accuracy in km of checkpoints and bundles on a manifest or GPS-tagged photos")
    p.add_argument("source", help="manifest CSV (path,lat,lon | IMG_ID,LAT,LON | id,latitude,longitude; optional "
                                  "source column) or a folder of photos whose EXIF GPS is the truth")
    p.add_argument("-m", "--model", action="append", required=True, metavar="DIR",
                   help="a checkpoint folder (torch) or a bundle folder (runtime); repeat to compare side by side")
    p.add_argument("--label", action="append", help="display name for each --model, in order")
    p.add_argument("--images", metavar="DIR", help="folder holding the images an Im2GPS3k / YFCC4k / OSV-5M "
                                                   "manifest names (default: the manifest's folder)")
    p.add_argument("--backend", default=None, choices=[b.value for b in Backend],
                   help="runtime backend for bundles (default: the one the bundle's format implies)")
    p.add_argument("--tencrop", action="store_true", help="the paper's protocol: average 10 crops per image")
    p.add_argument("-o", "--output", default="runs/eval", help="folder for eval.json, eval.txt and the PNG plots "
                                                               "(default runs/eval)")
    p.add_argument("--no-plots", action="store_true", help="skip error_cdf.png and world_map.png")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json

    from .. import api

    rep = api.evaluate(args.model, args.source, output=args.output, images=args.images, backend=args.backend,
                       threads=args.threads, tencrop=args.tencrop, batch=args.batch, labels=args.label,
                       limit=args.limit, plots=not args.no_plots, progress=not args.no_progress,
                       log=None if args.json else print)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep.table)
        if rep.failures_text:
            print(rep.failures_text)
        print(f"report {args.output}/eval.json" + "".join(f", {p}" for p in rep.plots.values()))
    return 0 if any(r.predictions for r in rep.results) else 1
