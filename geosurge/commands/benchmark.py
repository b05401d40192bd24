"""``geosurge benchmark``: bundles x every installed backend x torch anchors in one run (``geosurge.api.benchmark``);
tables, JSON and a PNG of latency vs parity."""
from __future__ import annotations


def register(sub) -> None:
    from ..formats import Backend

    p = sub.add_parser("benchmark", help="latency per stage, throughput, memory, size and parity of bundles on "
                                         "every installed backend, beside torch anchors")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE")
    p.add_argument("--backend", dest="backends", action="append", choices=[b.value for b in Backend],
                   help="only this backend (repeatable; default: every installed one that reads the bundle)")
    p.add_argument("--images", nargs="+", metavar="PATH", help="throughput folder: image files / folders "
                   "(default: phone-size JPEGs synthesised from the sample photos)")
    p.add_argument("--truth", metavar="CSV", help="ground truth (path, lat, lon) for task-level parity vs FP32")
    p.add_argument("--threads", type=int, default=None, help="inference threads, runtime and torch (default: "
                   "each library's own)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per row (default 30; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; --quick 1)")
    p.add_argument("--pause-ms", type=float, default=100.0, help="pause before each paced call (default 100: a "
                   "camera at 10 fps)")
    p.add_argument("--quick", action="store_true", help="a short run (fewer runs, a smaller folder)")
    p.add_argument("--anchors", nargs="*", default=["eager", "compile"], choices=["eager", "compile"],
                   help="torch anchors of the source model (default both; --anchors with nothing: none)")
    p.add_argument("--workers", type=int, default=2, help="decode workers for the folder throughput")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the runtime peak-RSS process")
    p.add_argument("--accuracy-km", type=float, default=25.0, help="with --truth: the acc@km in the summary and "
                   "the PNG")
    p.add_argument("--cache-dir", help="where the synthesised test JPEGs are cached (default ~/.cache/geosurge/"
                   "bench)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--png", metavar="FILE", help="latency vs parity plot (default: beside --json)")
    p.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args) -> int:
    from pathlib import Path

    from .. import api
    from ..export.benchmark import format_report

    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    rep = api.benchmark(args.bundles, images=args.images, truth=args.truth, backends=args.backends,
                        threads=args.threads, iters=args.iters, warmup=args.warmup, pause_ms=args.pause_ms,
                        quick=args.quick, anchors=args.anchors, workers=args.workers, rss=args.rss,
                        accuracy_km=args.accuracy_km, cache_dir=args.cache_dir, json=args.json, png=png)
    print()
    print(format_report(rep))
    wrote = [f for f in (args.json, rep.get("png")) if f]
    print(f"\nbenchmark: {len(rep['summary'])} bundle x backend row(s), {len(rep['skipped'])} skipped, "
          f"{rep['seconds']:.0f} s" + (f"; wrote {', '.join(wrote)}" if wrote else "; --json FILE for the report "
                                                                                 "and its PNG"))
    if rep["settings"]["quick"]:
        print("benchmark: --quick: few runs; use the full run for figures")
    return 0
