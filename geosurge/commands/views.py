"""``geosurge views``: render downward views of a georeferenced raster, centred on the photo density, into an image
folder + manifest (path, lat, lon, source, heading_deg, footprint_km) that ``geosurge eval`` and ``train`` read
(``geosurge.api.views``)."""
from __future__ import annotations


def register(sub) -> None:
    from .reference import _footprint

    p = sub.add_parser("views", help="render views of a georeferenced raster into an eval/train manifest")
    p.add_argument("-o", "--output", help="output folder, required unless --list-sources (images + manifest.csv; an "
                   "existing view set is replaced whole, a folder of anything else is refused)")
    p.add_argument("--source", action="append", help="named source (bmng, shadedrelief, ...) or a raster path; "
                                                     "repeat for the same views from several sources "
                                                     "(default bmng)")
    p.add_argument("-n", "--count", type=int, default=100, help="number of views (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--footprint-km", type=_footprint, default=(600.0, 1600.0), metavar="LO,HI")
    p.add_argument("--size", type=int, default=256, help="output pixels (default 256)")
    p.add_argument("--jitter-km", type=float, default=25.0)
    p.add_argument("--format", default="jpg", choices=["jpg", "png"])
    p.add_argument("--list-sources", action="store_true", help="list the named sources and exit")
    p.set_defaults(func=cmd_views)


def cmd_views(args) -> int:
    from .. import api
    from ..data import SOURCES, source_names
    from ..errors import GeosurgeError

    if args.list_sources:
        have = set(source_names())
        for k, s in SOURCES.items():
            print(f"{k:14s} {'installed' if k in have else 'not installed':14s} {s.description}")
        return 0
    if not args.output:
        raise GeosurgeError("views: -o/--output is required")
    sources = args.source or ["bmng"]
    path = api.views(args.output, sources=sources, count=args.count, seed=args.seed, footprint_km=args.footprint_km,
                     size=args.size, jitter_km=args.jitter_km, fmt=args.format, log=print)
    print(f"{args.count} view(s) x {len(sources)} source(s) -> {path}")
    return 0
