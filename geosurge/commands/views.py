"""``geosurge views``: render downward views of a georeferenced raster, centred on the photo density, into an image
folder + manifest (path, lat, lon, source, heading_deg, footprint_km) that ``geosurge eval`` and ``train`` read."""
from __future__ import annotations


def register(sub) -> None:
    from .reference import _footprint

    p = sub.add_parser("views", help="render views of a georeferenced raster into an eval/train manifest")
    p.add_argument("-o", "--output", help="output folder (images + manifest.csv; replaced whole)")
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
    import numpy as np

    from ..data import SOURCES, load_raster, source_names
    from ..data.views import draw_centres, draw_view_specs, render_views, view_is_valid, write_view_manifest
    from ..errors import GeosurgeError

    if args.list_sources:
        have = set(source_names())
        for k, s in SOURCES.items():
            print(f"{k:14s} {'installed' if k in have else 'not installed':14s} {s.description}")
        return 0
    if not args.output:
        raise GeosurgeError("views: -o/--output is required")
    rasters = [load_raster(s) for s in (args.source or ["bmng"])]
    rng = np.random.default_rng(args.seed)
    specs = []
    for _ in range(50):
        lat, lon = draw_centres(args.count - len(specs), rng, raster=rasters[0], jitter_km=args.jitter_km)
        specs += [s for s in draw_view_specs(lat, lon, rng, args.footprint_km, args.size, rasters[0])
                  if s is not None and all(view_is_valid(r, s) for r in rasters[1:])]
        if len(specs) >= args.count:
            break
    if len(specs) < args.count:
        raise GeosurgeError(f"only {len(specs)} valid views could be drawn in {', '.join(r.name for r in rasters)}")
    groups = [(r.name, specs, render_views(r, specs, progress=True, desc=f"render {r.name}")) for r in rasters]
    path = write_view_manifest(args.output, groups, fmt=args.format)
    print(f"{len(specs)} view(s) x {len(rasters)} source(s) -> {path}")
    return 0
