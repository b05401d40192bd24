"""Pruning and compressing a bundle's cell hierarchy for a device, and measuring what each cut costs.

A cut keeps cells by region (bbox / GeoJSON / countries: every cell intersecting the region at any level, plus
ancestors), by prior mass (the fewest finest cells carrying a share of the photo counts, plus ancestors) and by level
(only some levels; parents re-linked to the previous kept level), and compresses the table (fp16 / int8 per-row,
PCA to ``dim`` with the projection applied to the image embedding at run time). The model is untouched: the pruned
bundle carries the same ``model.onnx`` and golden FP32 references, its own hierarchy, table, places, manifest and
checksums.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.manifest import SCHEMA_VERSION, CellTableSection, HierarchySection, PruningSection
from geosurge.runtime.bundle import Bundle, open_bundle
from geosurge.runtime.cells import CellScorer, save_cell_table, table_dtype
from geosurge.runtime.places import LAYOUT, Places, save_places

from .writer import BundleWriter


@dataclass
class Cut:
    bbox: str | None = None
    geojson: str | None = None
    countries: str | None = None
    keep_mass: float | None = None
    levels: int | None = None
    drop_levels: list[int] | None = None
    table: str | None = None  # None: the source bundle's dtype
    dim: int | None = None

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v not in (None, [])]
        return ", ".join(parts) or "full (no cut)"

    def region(self):
        """The union of the region options as one shapely geometry, or None."""
        from geosurge.geo import regions

        geoms = []
        if self.bbox:
            geoms.append(regions.bbox_region(self.bbox))
        if self.geojson:
            geoms.append(regions.geojson_region(self.geojson))
        if self.countries:
            geoms.append(regions.country_region(self.countries))
        if not geoms:
            return None
        import shapely

        return shapely.union_all(geoms)


def plan(hierarchy, cut: Cut) -> dict:
    """Which cells and levels a cut keeps: ``masks`` (per original level), ``levels`` (kept level indices)."""
    masks = [np.ones(n, bool) for n in hierarchy.sizes]
    region = cut.region()
    if region is not None:
        from geosurge.geo.regions import cells_intersecting

        masks = [cells_intersecting(hierarchy.level(k).cell_id, region) for k in range(hierarchy.num_levels)]
        if not masks[-1].any() and not any(m.any() for m in masks):
            raise GeosurgeError(f"the region ({cut.describe()}) keeps no cell of the hierarchy")
        masks = hierarchy.close_ancestors(masks)
    if cut.keep_mass is not None:
        if not 0 < cut.keep_mass <= 1:
            raise GeosurgeError(f"--keep-mass must be in (0, 1], not {cut.keep_mass}")
        fin = hierarchy.level(-1)
        counts = np.where(masks[-1], fin.count, 0).astype(np.float64)
        order = np.argsort(-counts, kind="stable")
        cum = np.cumsum(counts[order])
        n = int(np.searchsorted(cum, cut.keep_mass * cum[-1] - 1e-9)) + 1
        keep_fin = np.zeros(len(fin), bool)
        keep_fin[order[:n]] = True
        new = [np.zeros(s, bool) for s in hierarchy.sizes]
        new[-1] = keep_fin
        masks = [m & c for m, c in zip(masks, hierarchy.close_ancestors(new))]
    levels = list(range(hierarchy.num_levels))
    if cut.levels is not None:
        if not 1 <= cut.levels <= hierarchy.num_levels:
            raise GeosurgeError(f"--levels must be in 1..{hierarchy.num_levels}")
        levels = levels[:cut.levels]
    if cut.drop_levels:
        bad = [k for k in cut.drop_levels if not 0 <= k < hierarchy.num_levels]
        if bad:
            raise GeosurgeError(f"--drop-levels: no level {bad} (levels are 0..{hierarchy.num_levels - 1})")
        levels = [k for k in levels if k not in set(cut.drop_levels)]
    if not levels:
        raise GeosurgeError("the cut keeps no level")
    if not masks[levels[-1]].any():
        raise GeosurgeError(f"the cut ({cut.describe()}) keeps no cell at the finest kept level")
    return {"masks": masks, "levels": levels, "region": region}


def pca(tables: list[np.ndarray], dim: int) -> np.ndarray:
    """(D, dim) orthonormal projection onto the top principal directions of all levels' cell embeddings
    (uncentred, so dot products with the image embedding are what is approximated)."""
    d = tables[0].shape[1]
    if not 1 <= dim < d:
        raise GeosurgeError(f"--dim must be in 1..{d - 1} (the embedding has {d} dimensions)")
    gram = sum(t.T.astype(np.float64) @ t.astype(np.float64) for t in tables)
    w, v = np.linalg.eigh(gram)
    return np.ascontiguousarray(v[:, np.argsort(-w)[:dim]], np.float32)


def prune_bundle(src_dir, out_dir, cut: Cut, log=print) -> Bundle:
    """Write the pruned bundle at ``out_dir`` (the one bundle writer: staged, checksummed, swapped into place) and
    return it. The model part and golden probes are copied unchanged; hierarchy, table, places and the manifest's
    hierarchy / cell table / places / pruning sections are the cut's."""
    t0 = time.perf_counter()
    src = open_bundle(src_dir)
    sm = src.manifest
    if sm.is_pruned:
        log("note: the source bundle is itself pruned; the cut applies to its hierarchy")
    full = CellScorer.load(src.path("cells"), src.path("cell_table"))
    if full.projection is not None and cut.dim:
        raise GeosurgeError(f"{src_dir}: the table is already PCA-projected; prune from the unprojected bundle")
    h = full.hierarchy
    p = plan(h, cut)
    masks, levels = p["masks"], p["levels"]
    sub = h.subset(masks).select_levels(levels) if len(levels) < h.num_levels else h.subset(masks)
    meta = dict(sub.meta)
    for key in ("tau_max",):
        if isinstance(meta.get(key), list) and len(meta[key]) == h.num_levels:
            meta[key] = [meta[key][k] for k in levels]
    sub.meta.update(meta)
    # the stored rows as float32, converted once (``CellScorer.tables`` converts on every access)
    full_tables = list(full.tables)
    tables = [full_tables[k][masks[k]] for k in levels]
    temps = full.temperatures[levels]
    first_dropped = full_tables[levels[0]][~masks[levels[0]]]
    proj, energy = None, None
    if cut.dim:
        proj = pca(full_tables, cut.dim)
        energy = float(sum(np.square(t @ proj).sum() for t in full_tables) / sum(np.square(t).sum()
                                                                                for t in full_tables))
        tables = [t @ proj for t in tables]
        first_dropped = first_dropped @ proj
    del full_tables
    dtype = table_dtype(cut.table or sm.cell_table.dtype)
    embed_dim = int(full.dim if proj is None else proj.shape[0])
    m = copy.deepcopy(sm)
    with BundleWriter(out_dir, log=log) as w:
        for role in ("model", "golden"):
            w.copy(role, src.path(role), sm.parts[role])
        sub.save(w.add("cells", sm.parts["cells"]))
        save_cell_table(w.add("cell_table", sm.parts["cell_table"]), tables, temps, dtype=dtype,
                        meta={"embed_dim": embed_dim, "table_dim": int(tables[0].shape[1]),
                              "hierarchy_digest": sub.digest()},
                        projection=proj, outside=first_dropped if first_dropped.size else None)
        if src.has("places"):
            pl = Places.load(src.path("places"))
            inside = sub.locate(pl.lat, pl.lon, strict=False)[:, 0] >= 0
            region = p["region"]
            if region is not None:
                from geosurge.geo.regions import contains_points

                inside &= contains_points(region, pl.lat, pl.lon)
            meta = {k: v for k, v in pl.meta.items() if k != "layout"}  # save_places writes its own
            save_places(w.add("places", sm.parts["places"]), pl.lat[inside], pl.lon[inside], pl.name[inside],
                        pl.admin1[inside], pl.country[inside], meta={**meta, "restricted_to": cut.describe()})
            m.places = (dataclasses.replace(sm.places, places=int(inside.sum()), layout=LAYOUT) if sm.places
                        else None)
        m.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        m.hierarchy = HierarchySection.of(sub, source_levels=levels)
        m.cell_table = CellTableSection(dtype=dtype, embed_dim=sm.cell_table.embed_dim,
                                        table_dim=int(tables[0].shape[1]), pca=proj is not None, pca_energy=energy,
                                        outside_probes=int(len(first_dropped)))
        m.pruning = PruningSection(
            cut={k: v for k, v in asdict(cut).items() if v not in (None, [])}, describe=cut.describe(),
            source_manifest_sha256=sm.manifest_sha256, source_hierarchy_digest=h.digest(), source_sizes=h.sizes,
            kept_per_source_level=[int(masks[k].sum()) if k in levels else 0 for k in range(h.num_levels)])
        m.schema_version, m.read_version, m.files, m.manifest_sha256 = SCHEMA_VERSION, SCHEMA_VERSION, {}, None
        out = w.commit(m)
    log(f"pruned bundle: {out.root} ({cut.describe()}): {sub.num_levels} levels, {len(sub):,} of {len(h):,} cells, "
        f"table {out.path('cell_table').stat().st_size / 1e6:.1f} MB ({dtype}, "
        f"{tables[0].shape[1]}-d) in {time.perf_counter() - t0:.1f}s")
    return out


# ---- what a cut costs ------------------------------------------------------------------------------------------
def probe_embeddings(scorer: CellScorer, n: int, seed: int = 0, noise: float = 0.6) -> tuple[np.ndarray, dict]:
    """Stand-ins for images from everywhere: the finest-level embedding of ``n`` cells drawn by photo count, plus
    Gaussian noise (``noise`` x the norm; cosine to the cell ~0.85). Not photos: a dense, prior-weighted sample of
    where a trained model's embeddings would fall, so a regional cut has enough samples inside it."""
    rng = np.random.default_rng(seed)
    fin = scorer.hierarchy.level(-1)
    p = fin.count / fin.count.sum()
    cells = rng.choice(len(fin), size=n, p=p)
    t = scorer.tables[-1][cells]
    if scorer.projection is not None:
        raise GeosurgeError("probe embeddings need the unprojected (full) table")
    z = t + rng.normal(size=t.shape).astype(np.float32) * noise / np.sqrt(t.shape[1])
    return z.astype(np.float32), {"kind": "probes", "n": n, "noise": noise, "seed": seed}


def evaluate_cut(full: CellScorer, cut_dir, embeddings: np.ndarray, iters: int = 1) -> dict:
    """A pruned bundle vs its unpruned source on the same embeddings: on embeddings whose unpruned top-1 finest
    cell the cut keeps, per-level top-1 agreement and drift (km) between predicted points; the share of unpruned
    predictions outside the cut, and how many of those the runtime flags; table size and the latency of the
    runtime's exact top-5 search (``search_ms``, ms per embedding)."""
    from geosurge.geo import haversine_km
    from geosurge.runtime.localizer import OUTSIDE_REGION_MASS

    b = open_bundle(cut_dir)
    cut = CellScorer.load(b.path("cells"), b.path("cell_table"))
    bm = b.manifest
    levels = bm.hierarchy.source_levels or list(range(full.num_levels))
    hf, hc = full.hierarchy, cut.hierarchy
    # map each source cell to its index in the cut (-1 = dropped), per kept level, via the S2 cell ids
    maps = []
    for pos, k in enumerate(levels):
        ids_full, ids_cut = hf.level(k).cell_id, hc.level(pos).cell_id
        idx = np.searchsorted(ids_cut, ids_full)
        idxc = np.minimum(idx, len(ids_cut) - 1)
        maps.append(np.where((idx < len(ids_cut)) & (ids_cut[idxc] == ids_full), idxc, -1))
    lf, lc = full.level_log_probs(embeddings), cut.level_log_probs(embeddings)
    sf, sc = full.hierarchical_scores(lf), cut.hierarchical_scores(lc)
    top_f, top_c = sf.argmax(1), sc.argmax(1)
    # the unpruned prediction is "inside" when the cut keeps its finest cell's ancestor at the cut's finest level
    anc = hf.ancestors()[top_f, levels[-1]]
    inside = maps[-1][anc] >= 0
    fin_c = hc.level(-1)
    drift = haversine_km(hf.level(-1).rep_lat[top_f], hf.level(-1).rep_lon[top_f], fin_c.rep_lat[top_c],
                         fin_c.rep_lon[top_c])
    per_level = []
    for pos, k in enumerate(levels):
        want = maps[pos][lf[k].argmax(1)]
        agree = want == lc[pos].argmax(1)
        per_level.append(float(agree[inside].mean()) if inside.any() else float("nan"))
    mass = cut.region_mass(embeddings)
    flagged = (mass < OUTSIDE_REGION_MASS) if mass is not None else np.zeros(len(embeddings), bool)
    cut.prepare_search()  # built once when a bundle opens (Localizer), not per search: left out of the timing
    t0 = time.perf_counter()
    for _ in range(iters):
        for z in embeddings[:64]:
            cut.topk(z, 5)  # the runtime's search: exact top-5
    search_ms = (time.perf_counter() - t0) * 1e3 / (iters * min(64, len(embeddings)))
    return {"bundle": str(cut_dir), "cut": bm.pruning.describe if bm.pruning else "full", "cells": int(len(hc)),
            "levels": hc.num_levels, "table_mb": b.path("cell_table").stat().st_size / 1e6,
            "table_dtype": bm.cell_table.dtype, "table_dim": bm.cell_table.dim,
            "n": int(len(embeddings)), "inside": int(inside.sum()), "outside_share": float(1 - inside.mean()),
            "outside_flagged": float(flagged[~inside].mean()) if (~inside).any() else float("nan"),
            "inside_flagged": float(flagged[inside].mean()) if inside.any() else float("nan"),
            "level_agreement": per_level,
            "level_agreement_min": float(np.nanmin(per_level)) if inside.any() else float("nan"),
            "median_drift_km": float(np.median(drift[inside])) if inside.any() else float("nan"),
            "p95_drift_km": float(np.percentile(drift[inside], 95)) if inside.any() else float("nan"),
            "search_ms": search_ms}
