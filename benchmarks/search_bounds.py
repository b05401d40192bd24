"""Whether the exact cell search's first pass could read fewer bytes: candidate counts under smaller tables
(docs/benchmarks.md, "Cell search: could the first pass be smaller?").

The exact search (``geosurge.runtime.cellsearch``) scores every finest cell approximately, ``Ã(f) = <y, Ŵ_f>``, with a
per-cell bound ``|A(f) - Ã(f)| <= E(f)`` from Cauchy-Schwarz, then re-scores exactly every cell that can still reach
the top-k. Its first pass reads the whole approximate table once per query (9.3 MB int8 for the default hierarchy at
512), which after an inference comes from DRAM and is the search's floor (``benchmarks/search_product.py``). A
smaller table reads fewer bytes but rounds more, so its bound is wider and more cells must be re-scored. This counts,
on real embeddings, how many for each layout (the counts depend only on values, not on the machine):

* ``int8 / row`` — the runtime's: ``W_f = s_f q_f + r_f``, ``E = ||y|| ||r_f||``;
* ``int8 / 32`` — int8 with a scale per block of 32 values (a finer grid, more scale bytes);
* ``int4 / row``, ``int4 / 32`` — 4-bit codes (|q| <= 7) per row or per block of 32 (onnxruntime's ``MatMulNBits``
  layout);
* ``PCA r + int8 / row`` — the path embeddings projected on their top r principal axes (the SVD of W, uncentred),
  int8 per row there, and the rest bounded apart: ``E = ||P y|| ||r_f|| + ||y - P^T P y|| ||W_f - P^T P W_f||``.

The query is taken exactly (the runtime's two-part 14-bit query adds ``||r_y|| ||Ŵ_f||``, about 1e-4 of these
bounds). Per layout: bytes read per query (codes plus float32 scales), candidates (cells whose upper bound
``Ã + E`` reaches ``tau``, the k-th largest lower bound ``Ã - E``: the set a search must consider;
``cellsearch.select_candidates``) and re-scored
(cells whose upper bound reaches the exact k-th score: the fewest any search with these bounds re-scores), p50 / p95 /
max over the queries, and the median bound in logits.

    .venv/bin/python benchmarks/search_bounds.py BUNDLE [--images DIR|CSV] [--limit 200] [--k 5] [--json FILE]

Queries: the bundle's model on ``--images`` (at most ``--limit``, evenly spaced), else its golden inputs.
Prints a table, writes JSON (default ``benchmarks/results/search_bounds.json``). Exit 1 on a bad bundle or images.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.report import format_table, write_json
from geosurge.runtime.cellsearch import path_embeddings, select_candidates
from geosurge.runtime.localizer import Localizer

SCALE_BYTES = 4  # a float32 scale per row or block


def quantize(w: np.ndarray, levels: int, block: int | None) -> np.ndarray:
    """Symmetric rounding of (n, d) rows to ``levels`` steps each side, one scale per row (``block`` None) or per
    ``block`` consecutive values (the last block may be shorter); returns the dequantized rows (n, d) float64."""
    n, d = w.shape
    block = block or d
    g = np.zeros((n, -(-d // block) * block))  # the last block zero-padded (zeros change no maximum, no product)
    g[:, :d] = w
    g = g.reshape(n, -1, block)
    s = np.abs(g).max(2, keepdims=True) / levels
    s[s == 0] = 1.0
    return (np.clip(np.rint(g / s), -levels, levels) * s).reshape(n, -1)[:, :d]


def layouts(w: np.ndarray, pca_dims: list[int]):
    """(name, bytes per row, dequantized rows (n, r), projection (d, r) or None) for each layout."""
    d = w.shape[1]
    for name, levels, block, bits in (("int8 / row", 127, None, 8), ("int8 / 32", 127, 32, 8),
                                      ("int4 / row", 7, None, 4), ("int4 / 32", 7, 32, 4)):
        yield name, d * bits / 8 + SCALE_BYTES * (-(-d // block) if block else 1), quantize(w, levels, block), None
    _, _, vt = np.linalg.svd(w, full_matrices=False)
    for r in pca_dims:
        p = vt[:r].T
        yield f"PCA {r} + int8 / row", r + SCALE_BYTES, quantize(w @ p, 127, None), p


def counts(w: np.ndarray, y: np.ndarray, approx_rows: np.ndarray, proj, k: int) -> dict:
    """Candidates and re-scored cells per query (see the module docstring) for one layout."""
    exact = y @ w.T
    if proj is None:
        approx = y @ approx_rows.T
        bound = np.linalg.norm(y, axis=1)[:, None] * np.linalg.norm(w - approx_rows, axis=1)[None]
    else:
        yp = y @ proj
        approx = yp @ approx_rows.T
        w_perp = np.linalg.norm(w - (w @ proj) @ proj.T, axis=1)
        y_perp = np.linalg.norm(y - yp @ proj.T, axis=1)
        bound = (np.linalg.norm(yp, axis=1)[:, None] * np.linalg.norm(w @ proj - approx_rows, axis=1)[None]
                 + y_perp[:, None] * w_perp[None])
    n = w.shape[0]
    kth = np.partition(exact, n - k, axis=1)[:, n - k]
    upper = approx + bound
    if not (upper >= exact - 1e-9).all() or not (approx - bound <= exact + 1e-9).all():
        raise AssertionError("a bound does not hold")  # the layouts' bounds are theorems; this guards the code
    cand = np.array([select_candidates(a, e, k).size for a, e in zip(approx, bound)])
    rescored = (upper >= kth[:, None]).sum(1)
    pct = lambda a: [float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.max())]  # noqa: E731
    return {"candidates_p50_p95_max": pct(cand), "rescored_p50_p95_max": pct(rescored),
            "bound_median_logits": float(np.median(bound))}


def queries(loc: Localizer, images: str | None, limit: int) -> tuple[np.ndarray, str]:
    """(N, dim) float64 search queries of the bundle's model and where they came from."""
    if images is None:
        with np.load(loc.bundle.path("golden")) as g:
            emb = loc.embed(g["inputs"])
        return loc.scorer._query64(emb), "golden inputs"
    from geosurge.inputs import list_image_source

    paths, _, _ = list_image_source(images, "--images")
    if not paths:
        raise GeosurgeError(f"{images}: no images")
    paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).astype(int))]
    emb = np.concatenate([loc.embed(loc.preprocess(p)[None]) for p in paths])
    return loc.scorer._query64(emb), f"{len(paths)} image(s) of {images}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--images", help="folder or CSV manifest (default: the bundle's golden inputs)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--pca", type=int, nargs="+", default=[128, 256, 384])
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "search_bounds.json"))
    a = ap.parse_args()
    try:
        loc = Localizer(a.bundle, threads=2)
        sc = loc.scorer
        y, source = queries(loc, a.images, a.limit)
    except (GeosurgeError, OSError) as e:
        print(f"search_bounds: {e}", file=sys.stderr)
        return 1
    w = path_embeddings(sc._rows_f64, sc.ancestors, 1.0 / np.asarray(sc.temperatures, np.float64), sc.dim)
    print(f"path table {w.shape[0]:,} finest cells x {w.shape[1]}; {len(y)} queries ({source}); top-{a.k}",
          flush=True)
    rows, out = [], []
    for name, row_bytes, approx_rows, proj in layouts(w, [r for r in a.pca if r < sc.dim]):
        c = counts(w, y, approx_rows, proj, a.k)
        mb = w.shape[0] * row_bytes / 1e6
        out.append({"layout": name, "mb_per_query": round(mb, 2), **c})
        (c50, c95, cmax), (r50, r95, rmax) = c["candidates_p50_p95_max"], c["rescored_p50_p95_max"]
        rows.append({"layout": name, "MB read": mb, "candidates p50": c50, "cand. p95": c95, "cand. max": cmax,
                     "re-scored p50": r50, "re-sc. p95": r95, "re-sc. max": rmax,
                     "bound median": c["bound_median_logits"]})
    print(format_table(rows, decimals={"MB read": 2, "bound median": 2, "candidates p50": 0, "cand. p95": 0,
                                       "cand. max": 0, "re-scored p50": 0, "re-sc. p95": 0, "re-sc. max": 0}))
    write_json(a.json, {"bundle": str(a.bundle), "queries": source, "n_queries": int(len(y)), "k": a.k,
                        "finest_cells": int(w.shape[0]), "dim": int(w.shape[1]), "machine": platform.machine(),
                        "layouts": out})
    print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
