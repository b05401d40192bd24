"""``geosurge demo``: the main job on embedded defaults (README command 1)."""
from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the demo pipeline on the embedded defaults")
    p.add_argument("-o", "--output", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from pathlib import Path

    from ..geo import build_default_hierarchy
    from .cells import print_info

    out = Path(args.output)
    print("[1/1] cell hierarchy from the real MP-16 photo density (100K sample shipped in geoclip)")
    t0 = time.perf_counter()
    h = build_default_hierarchy()
    dt = time.perf_counter() - t0
    path = h.save(out / "cells.npz")
    print_info(h.info(), False, title=f"      {len(h):,} cells in {h.num_levels} levels, built in {dt:.2f}s -> {path}")
    return 0
