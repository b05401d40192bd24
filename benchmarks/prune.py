"""What each cut of the default hierarchy costs (docs/benchmarks.md, "Pruning cuts"): cells and MB per cut (full, one country, keep-mass 0.9,
5 levels, int8 table, PCA-256) with the agreement against the unpruned FP32 bundle and the cell-search latency.

Agreement is measured on (a) the real sample photos through the edge model and (b) probe embeddings (finest-cell
embeddings drawn by photo count, plus noise; `geosurge.export.prune.probe_embeddings`) — the edge model is untrained,
so its photo predictions cluster in a few cells; probes spread over the world as a trained model's would.

    .venv/bin/python benchmarks/prune.py [--bundle DIR] [--country FR] [--probes 1000]
        [--json benchmarks/results/prune.json]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from geosurge.export.prune import Cut, evaluate_cut, probe_embeddings, prune_bundle
from geosurge.report import format_table, write_json
from geosurge.runtime import Localizer
from geosurge.samples import sample_photo_paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="an edge FP32 bundle (default: export one to a temp dir)")
    ap.add_argument("--country", default="FR")
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/prune.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="geosurge-prune-"))
    bundle = Path(args.bundle) if args.bundle else work / "edge-fp32"
    if not args.bundle:
        from geosurge.export.bundle import write_bundle
        from geosurge.export.source import load_model

        model, source = load_model("edge", seed=0)
        write_bundle(bundle, model, source, sample_photo_paths(), log=lambda m: None)
    src = Localizer(bundle, threads=args.threads)
    photos = src.embed(np.stack([src.preprocess(p) for p in sample_photo_paths()]))
    probes, probe_info = probe_embeddings(src.scorer, args.probes)
    cuts = {
        "full (fp16)": None,
        f"country {args.country}": Cut(countries=args.country),
        "keep-mass 0.9": Cut(keep_mass=0.9),
        "5 levels": Cut(levels=5),
        "int8 table": Cut(table="int8"),
        "PCA-256": Cut(dim=256),
        "PCA-256 + int8": Cut(dim=256, table="int8"),
    }
    rows = []
    for name, cut in cuts.items():
        path = bundle if cut is None else prune_bundle(bundle, work / name.replace(" ", "_"), cut,
                                                       log=lambda m: None)
        rp = evaluate_cut(src.scorer, path, probes, iters=3)
        ri = evaluate_cut(src.scorer, path, photos, iters=3)
        rows.append({"cut": name, "levels": rp["levels"], "cells": rp["cells"], "table_mb": rp["table_mb"],
                     "dim": rp["table_dim"], "search_ms": rp["search_ms"],
                     "probes_inside": rp["inside"], "outside_share": rp["outside_share"],
                     "outside_flagged": rp["outside_flagged"], "level_agree_min": rp["level_agreement_min"],
                     "level_agree_finest": rp["level_agreement"][-1],
                     "median_drift_km": rp["median_drift_km"], "p95_drift_km": rp["p95_drift_km"],
                     "photos_inside": ri["inside"], "photos_agree_min": ri["level_agreement_min"],
                     "photos_drift_km": ri["median_drift_km"]})
    print(format_table(rows, title=f"cuts of the default hierarchy ({bundle}); agreement vs the unpruned bundle on "
                                   f"{args.probes} probe embeddings (inside the cut) and {len(photos)} real photos"))
    write_json(args.json, {"bundle": str(bundle), "probes": probe_info, "photos": len(photos), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
