"""``geosurge cells build|info``: the S2 cell hierarchy."""
from __future__ import annotations

import json
import time

from ..errors import GeosurgeError

INFO_COLUMNS = ["level", "cells", "photos", "tau_max", "s2_levels", "median_photos", "max_photos", "median_area_km2"]


def register(sub) -> None:
    p = sub.add_parser("cells", help="build and inspect the S2 cell hierarchy")
    csub = p.add_subparsers(dest="cells_command", metavar="SUBCOMMAND", required=True)

    b = csub.add_parser("build", help="build a hierarchy from photo coordinates")
    b.add_argument("--points", metavar="CSV", help="CSV with lat/lon columns (default: the 100K MP-16 sample "
                                                   "shipped in the geoclip package)")
    b.add_argument("--levels", type=int, default=7, help="number of levels (default 7)")
    b.add_argument("--tau-max", metavar="N,N,...", help="tau_max per level (default: paper values scaled)")
    b.add_argument("--tau-min", type=int, help="tau_min (default: paper value scaled)")
    b.add_argument("--max-s2-level", type=int, default=None, help="finest S2 level a cell may reach (default 20)")
    b.add_argument("-o", "--output", required=True, help="output .npz file")
    b.add_argument("--json", action="store_true", help="print the info as JSON instead of a table")
    b.set_defaults(func=cmd_build)

    i = csub.add_parser(
        "info", help="per-level table of a hierarchy file",
        description="Per level: cells; photos = the photo coordinates the hierarchy was built from that fall in its "
                    "cells (the default: the 100K MP-16 sample shipped in geoclip); tau_max = the split threshold "
                    "(a cell holding more photos is split, until the finest S2 level allowed, so max_photos can "
                    "exceed it); s2_levels = the S2 levels its cells span; median_photos / max_photos per cell; "
                    "median_area_km2 per cell.")
    i.add_argument("file", help="a hierarchy .npz (a bundle's is BUNDLE/cells.npz; a bundle folder is read too)")
    i.add_argument("--json", action="store_true", help='print {"levels": [...], ...} as JSON')
    i.set_defaults(func=cmd_info)


def _parse_tau_max(text, levels):
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GeosurgeError(f"--tau-max: expected comma-separated integers, got {text!r}") from None
    if len(vals) != levels:
        raise GeosurgeError(f"--tau-max has {len(vals)} values but --levels is {levels}")
    return vals


def print_info(info: dict, as_json: bool, title: str | None = None) -> None:
    from ..report import format_table

    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(format_table(info["levels"], INFO_COLUMNS, title=title))
    print(f"points {info['points']:,}  covered {info['covered']:,}  tau_min {info['tau_min']}  "
          f"digest {info['digest'][:16]}  structure {info['structure_digest'][:16]}  source {info['source']}")


def cmd_build(args) -> int:
    from ..geo import build_default_hierarchy

    if args.levels < 1:
        raise GeosurgeError("--levels must be >= 1")
    t0 = time.perf_counter()
    try:
        h = build_default_hierarchy(levels=args.levels, tau_max=_parse_tau_max(args.tau_max, args.levels),
                                    tau_min=args.tau_min, points_csv=args.points, max_s2_level=args.max_s2_level)
    except ValueError as e:
        raise GeosurgeError(str(e)) from None
    dt = time.perf_counter() - t0
    path = h.save(args.output)
    print_info(h.info(), args.json, title=f"cell hierarchy: {len(h):,} cells in {h.num_levels} levels, "
                                          f"built in {dt:.2f}s -> {path}")
    return 0


def cmd_info(args) -> int:
    from ..geo import load_hierarchy

    from pathlib import Path

    path = Path(args.file)
    if path.is_dir() and (path / "cells.npz").is_file():  # a bundle or checkpoint folder
        path = path / "cells.npz"
    h = load_hierarchy(path)
    print_info(h.info(), args.json, title=f"{path}: {len(h):,} cells in {h.num_levels} levels")
    return 0
