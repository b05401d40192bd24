"""The GeoSURGE cell hierarchy: L levels of S2 cells built by adaptive splitting of photo locations.

numpy only (no torch): the torch side uses it for training labels and the torch-free runtime loads the same file.

Construction (per the paper, made exact here):
* level 0 starts from the 6 S2 faces; level k starts from the cells of level k-1;
* a cell holding more than ``tau_max[k]`` photos is split into its 4 S2 children, recursively, until no cell of the
  level exceeds ``tau_max[k]`` (a cell already at ``max_s2_level`` is never split: it may exceed tau_max);
* a cell holding fewer than ``tau_min`` photos is dropped, with its photos, for this and all finer levels;
* a photo is *covered* when its finest-level cell is kept; counts and representative points are computed over the
  covered photos, so each cell's count is the sum of its children's counts and every covered photo has a cell at
  every level. Coarse cells whose photos all fell out are dropped.

Cells of a level are sorted by S2 cell id (Hilbert order) and each records the index of its parent in the level
above. The representative point of a cell is the normalised mean of its photos' unit vectors.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..fsutil import atomic_write_bytes
from . import s2

SCHEMA = "geosurge.hierarchy"
SCHEMA_VERSION = 1

#: Photos in MP-16, on which the paper's tau values were set.
PAPER_N_PHOTOS = 4_720_000
#: tau_max per level in the paper: 25,000 down to 500 over 7 levels. The paper gives the two ends; we interpolate
#: geometrically (each level about 0.52x the one above), rounded.
PAPER_TAU_MAX = (25000, 13026, 6787, 3536, 1842, 960, 500)
#: tau_min on MP-16 scale (not published; PlaNet used 50 on 126M photos). 100 on 4.72M scales to 2 on 100K: a cell
#: needs at least two photos, so one-off locations do not get their own class.
PAPER_TAU_MIN = 100
DEFAULT_MAX_S2_LEVEL = 20


def scaled_taus(n_points: int, levels: int = 7) -> tuple[list[int], int]:
    """The paper's tau_max/tau_min scaled from MP-16's 4.72M photos to ``n_points``."""
    if levels < 1:
        raise ValueError("levels must be >= 1")
    paper = np.asarray(PAPER_TAU_MAX, dtype=np.float64)
    if levels != len(paper):  # keep both ends, interpolate geometrically in between
        paper = np.geomspace(PAPER_TAU_MAX[0], PAPER_TAU_MAX[-1], levels) if levels > 1 else paper[:1]
    scale = n_points / PAPER_N_PHOTOS
    tau_max = [max(2, int(round(t * scale))) for t in paper]
    tau_min = max(1, int(round(PAPER_TAU_MIN * scale)))
    return tau_max, tau_min


@dataclass
class CellLevel:
    """A read-only view of one level of the hierarchy."""

    index: int
    cell_id: np.ndarray  # uint64 S2 cell ids, sorted
    s2_level: np.ndarray  # int8
    parent: np.ndarray  # int32 index into the level above (-1 at level 0)
    count: np.ndarray  # int64 covered photos
    rep_lat: np.ndarray  # float64 degrees
    rep_lon: np.ndarray

    def __len__(self) -> int:
        return int(self.cell_id.size)

    @property
    def tokens(self) -> list[str]:
        return s2.to_token(self.cell_id)


class CellHierarchy:
    """L levels of S2 cells with parents, counts and representative points."""

    _ARRAYS = ("cell_id", "s2_level", "parent", "count", "rep_lat", "rep_lon")
    #: the arrays that say which cells there are (no float arithmetic goes into them)
    _STRUCTURE = ("cell_id", "s2_level", "parent", "count")

    def __init__(self, arrays: dict[str, np.ndarray], offsets: np.ndarray, meta: dict):
        self.cell_id = np.asarray(arrays["cell_id"], dtype=np.uint64)
        self.s2_level = np.asarray(arrays["s2_level"], dtype=np.int8)
        self.parent = np.asarray(arrays["parent"], dtype=np.int32)
        self.count = np.asarray(arrays["count"], dtype=np.int64)
        self.rep_lat = np.asarray(arrays["rep_lat"], dtype=np.float64)
        self.rep_lon = np.asarray(arrays["rep_lon"], dtype=np.float64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.meta = dict(meta)
        n = self.offsets[-1]
        for name in self._ARRAYS:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"hierarchy array {name!r} has shape {getattr(self, name).shape}, expected ({n},)")

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def sizes(self) -> list[int]:
        return [int(x) for x in np.diff(self.offsets)]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def level(self, k: int) -> CellLevel:
        if not -self.num_levels <= k < self.num_levels:
            raise IndexError(f"level {k} out of range for {self.num_levels} levels")
        k %= self.num_levels
        sl = slice(self.offsets[k], self.offsets[k + 1])
        return CellLevel(k, self.cell_id[sl], self.s2_level[sl], self.parent[sl], self.count[sl],
                         self.rep_lat[sl], self.rep_lon[sl])

    @property
    def levels(self) -> list[CellLevel]:
        return [self.level(k) for k in range(self.num_levels)]

    def ancestors(self) -> np.ndarray:
        """(n_finest, L) index of each finest cell's ancestor at every level (last column = the cell itself)."""
        L = self.num_levels
        out = np.empty((self.sizes[-1], L), dtype=np.int64)
        out[:, L - 1] = np.arange(self.sizes[-1])
        for k in range(L - 1, 0, -1):
            out[:, k - 1] = self.level(k).parent[out[:, k]]
        return out

    def prior_mode(self) -> tuple[float, float]:
        """(lat, lon) in degrees of the prior's most likely place: the representative point of the finest cell
        holding most photos (the "prior's most likely cell" baseline of the accuracy tables)."""
        fin = self.level(-1)
        i = int(np.argmax(fin.count))
        return float(fin.rep_lat[i]), float(fin.rep_lon[i])

    def digest(self) -> str:
        """sha256 over the offsets and every array, representative points included: identifies this copy of the
        hierarchy bit for bit (a saved checkpoint's or bundle's). A hierarchy *built again* on another machine may
        differ from it in the last bits of its representative points (see :meth:`structure_digest`)."""
        return self._sha256(self._ARRAYS)

    def structure_digest(self) -> str:
        """sha256 over which cells the hierarchy holds — offsets, S2 cell ids, S2 levels, parents, photo counts —
        without the representative points. Those are sums of sin / cos of the photo points, and numpy's
        trigonometry differs in the last bits between CPUs (its AVX-512 kernels vs its AVX2 ones: built on an
        AVX-512 machine, the default hierarchy's representative points differ from an AVX2 build's in 2,283 of
        46,156 latitudes and 3,021 longitudes, by at most 2.8e-14 degrees — :meth:`digest` differs, this does
        not). What records compare a freshly built hierarchy with (the reference model's shipped weights, caches
        keyed by the hierarchy)."""
        return self._sha256(self._STRUCTURE)

    def _sha256(self, names) -> str:
        h = hashlib.sha256()
        h.update(self.offsets.astype("<i8").tobytes())
        for name in names:
            arr = getattr(self, name)
            h.update(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return h.hexdigest()

    # ---- lookup ----------------------------------------------------------------------------------------------
    def locate(self, lat, lon, strict: bool = True) -> np.ndarray:
        """(N, L) int64 index of the cell containing each point at each level, -1 where none.

        ``strict`` (default): a point counts as located only where the finest level covers it, so each row is
        either complete (and consistent with the parent links) or all -1 — what training labels need. With
        ``strict=False`` each level is looked up on its own (a point may sit in a coarse cell but no fine one).
        """
        lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
        if lat.shape != lon.shape or lat.ndim != 1:
            raise ValueError("lat and lon must be 1-D arrays of the same length")
        leaf = s2.latlng_to_leaf(lat, lon)
        out = np.full((lat.size, self.num_levels), -1, dtype=np.int64)
        for k in range(self.num_levels):
            lv = self.level(k)
            for s2l in np.unique(lv.s2_level):
                cand = s2.parent(leaf, int(s2l))
                pos = np.searchsorted(lv.cell_id, cand)
                pos_c = np.minimum(pos, len(lv) - 1)
                hit = (pos < len(lv)) & (lv.cell_id[pos_c] == cand)
                out[hit, k] = pos_c[hit]
        if strict:
            out[(out < 0).any(axis=1)] = -1
        return out

    def cell_areas_km2(self, k: int) -> np.ndarray:
        return s2.cell_area_km2(self.level(k).cell_id)

    # ---- reporting -------------------------------------------------------------------------------------------
    def info(self) -> dict:
        rows = []
        for k in range(self.num_levels):
            lv = self.level(k)
            areas = self.cell_areas_km2(k)
            rows.append({
                "level": k,
                "cells": len(lv),
                "photos": int(lv.count.sum()),
                "tau_max": self.meta.get("tau_max", [None] * self.num_levels)[k],
                "s2_levels": [int(lv.s2_level.min()), int(lv.s2_level.max())] if len(lv) else [],
                "median_photos": float(np.median(lv.count)) if len(lv) else 0.0,
                "max_photos": int(lv.count.max()) if len(lv) else 0,
                "median_area_km2": float(np.median(areas)) if len(lv) else 0.0,
            })
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "digest": self.digest(),
            "structure_digest": self.structure_digest(),
            "points": self.meta.get("n_points"), "covered": self.meta.get("n_covered"),
            "tau_min": self.meta.get("tau_min"), "max_s2_level": self.meta.get("max_s2_level"),
            "source": self.meta.get("source"), "levels": rows,
        }

    # ---- persistence -----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = dict(self.meta, schema=SCHEMA, schema_version=SCHEMA_VERSION)
        buf = io.BytesIO()
        np.savez_compressed(
            buf, offsets=self.offsets, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
            **{name: getattr(self, name) for name in self._ARRAYS})
        return buf.getvalue()

    def save(self, path) -> Path:
        """Write atomically (temp file + rename) as one ``.npz`` holding the arrays and a JSON header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_bytes())
        return path

    def subset(self, keep_masks: list[np.ndarray], meta_update: dict | None = None) -> "CellHierarchy":
        """A hierarchy keeping, per level, the cells where ``keep_masks[k]`` is True (parents must be kept too)."""
        arrays = {name: [] for name in self._ARRAYS}
        sizes, remap_prev = [], None
        for k, keep in enumerate(keep_masks):
            lv = self.level(k)
            keep = np.asarray(keep, dtype=bool)
            par = lv.parent[keep].astype(np.int64)
            if k > 0:
                par = remap_prev[par]
                if (par < 0).any():
                    raise ValueError(f"level {k}: a kept cell's parent was dropped")
            remap_prev = np.full(len(lv), -1, dtype=np.int64)
            remap_prev[keep] = np.arange(int(keep.sum()))
            for name in self._ARRAYS:
                arrays[name].append(par if name == "parent" else getattr(lv, name)[keep])
            sizes.append(int(keep.sum()))
        merged = {name: np.concatenate(v) for name, v in arrays.items()}
        return CellHierarchy(merged, np.concatenate([[0], np.cumsum(sizes)]), {**self.meta, **(meta_update or {})})


    def close_ancestors(self, keep_masks: list[np.ndarray]) -> list[np.ndarray]:
        """``keep_masks`` plus every kept cell's ancestors (so :meth:`subset` accepts them)."""
        masks = [np.asarray(m, dtype=bool).copy() for m in keep_masks]
        for k in range(self.num_levels - 1, 0, -1):
            masks[k - 1][self.level(k).parent[masks[k]]] = True
        return masks

    def select_levels(self, levels: list[int], meta_update: dict | None = None) -> "CellHierarchy":
        """A hierarchy of only ``levels`` (ascending indices); each kept cell's parent becomes its ancestor at the
        previous kept level (the hierarchical product then runs over the kept levels)."""
        levels = sorted(set(int(k) for k in levels))
        if not levels or levels[0] < 0 or levels[-1] >= self.num_levels:
            raise ValueError(f"levels must be within 0..{self.num_levels - 1}")
        arrays = {name: [] for name in self._ARRAYS}
        for pos, k in enumerate(levels):
            lv = self.level(k)
            if pos == 0:
                par = np.full(len(lv), -1, dtype=np.int64)
            else:
                par = np.arange(len(lv))
                for j in range(k, levels[pos - 1], -1):  # walk up to the previous kept level
                    par = self.level(j).parent[par]
            for name in self._ARRAYS:
                arrays[name].append(par.astype(lv.parent.dtype) if name == "parent" else getattr(lv, name))
        sizes = [len(self.level(k)) for k in levels]
        merged = {name: np.concatenate(v) for name, v in arrays.items()}
        return CellHierarchy(merged, np.concatenate([[0], np.cumsum(sizes)]), {**self.meta, **(meta_update or {})})


def load_hierarchy(path) -> CellHierarchy:
    """Load a hierarchy file written by :meth:`CellHierarchy.save` (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: hierarchy file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {name: z[name] for name in CellHierarchy._ARRAYS}
            offsets = z["offsets"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path}: not a geosurge hierarchy file ({e})") from None
    if meta.get("schema") != SCHEMA:
        raise InputFileError(f"{path}: not a geosurge hierarchy file (schema {meta.get('schema')!r})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise InputFileError(f"{path}: hierarchy schema version {meta.get('schema_version')} is not supported "
                             f"(this geosurge reads version {SCHEMA_VERSION})")
    return CellHierarchy(arrays, offsets, meta)


def build_hierarchy(lat, lon, tau_max, tau_min: int, max_s2_level: int = DEFAULT_MAX_S2_LEVEL,
                    source: str | None = None) -> CellHierarchy:
    """Build the hierarchy from photo coordinates; see the module docstring for the rules."""
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    tau_max = [int(t) for t in tau_max]
    if lat.size == 0 or lat.shape != lon.shape:
        raise ValueError("build_hierarchy needs equal-length, non-empty lat/lon arrays")
    if tau_min < 1 or any(t < tau_min for t in tau_max):
        raise ValueError(f"need 1 <= tau_min <= every tau_max (tau_min={tau_min}, tau_max={tau_max})")
    if not 0 <= max_s2_level <= s2.MAX_LEVEL:
        raise ValueError("max_s2_level must be in 0..30")
    leaf = s2.latlng_to_leaf(lat, lon)
    order = np.argsort(leaf, kind="stable")
    leaf, xyz = leaf[order], s2.latlng_to_xyz(lat[order], lon[order])

    def counts(cells: np.ndarray, sorted_leaf: np.ndarray) -> np.ndarray:
        return (np.searchsorted(sorted_leaf, s2.range_max(cells), side="right")
                - np.searchsorted(sorted_leaf, s2.range_min(cells), side="left"))

    level_cells: list[np.ndarray] = []
    level_parent: list[np.ndarray] = []
    prev = s2.face_cells()
    for tmax in tau_max:
        frontier, front_parent = prev, np.arange(prev.size) if level_cells else np.full(prev.size, -1)
        kept, kept_parent = [], []
        while frontier.size:
            c = counts(frontier, leaf)
            split = (c > tmax) & (s2.level_of(frontier) < max_s2_level)
            keep = ~split & (c >= tau_min)
            kept.append(frontier[keep])
            kept_parent.append(front_parent[keep])
            frontier = s2.children(frontier[split]).ravel()
            front_parent = np.repeat(front_parent[split], 4)
        cells = np.concatenate(kept)
        par = np.concatenate(kept_parent)
        order = np.argsort(cells)
        level_cells.append(cells[order])
        level_parent.append(par[order])
        prev = level_cells[-1]
        if prev.size == 0:
            raise ValueError(f"no cell of level {len(level_cells) - 1} reaches tau_min={tau_min}")

    # covered photos: those inside a finest-level cell
    finest = level_cells[-1]
    pos = np.searchsorted(finest, leaf)  # finest cell ids are sorted and disjoint: test the range of the candidate
    lo_ok = np.zeros(leaf.size, dtype=bool)
    for cand in (pos - 1, pos):
        c = np.clip(cand, 0, finest.size - 1)
        lo_ok |= (s2.range_min(finest[c]) <= leaf) & (leaf <= s2.range_max(finest[c]))
    covered = leaf[lo_ok]
    csum = np.concatenate([np.zeros((1, 3)), np.cumsum(xyz[lo_ok], axis=0)])

    arrays = {name: [] for name in CellHierarchy._ARRAYS}
    sizes, remap_prev = [], None
    for k, (cells, par) in enumerate(zip(level_cells, level_parent)):
        a = np.searchsorted(covered, s2.range_min(cells), side="left")
        b = np.searchsorted(covered, s2.range_max(cells), side="right")
        cnt = b - a
        keep = cnt > 0
        if k > 0:
            par = remap_prev[par]
        remap_prev = np.full(cells.size, -1, dtype=np.int64)
        remap_prev[keep] = np.arange(int(keep.sum()))
        vec = csum[b[keep]] - csum[a[keep]]
        rlat, rlon = s2.xyz_to_latlng(vec / np.linalg.norm(vec, axis=1, keepdims=True))
        arrays["cell_id"].append(cells[keep])
        arrays["s2_level"].append(s2.level_of(cells[keep]))
        arrays["parent"].append(par[keep] if k > 0 else np.full(int(keep.sum()), -1))
        arrays["count"].append(cnt[keep])
        arrays["rep_lat"].append(rlat)
        arrays["rep_lon"].append(rlon)
        sizes.append(int(keep.sum()))
    merged = {name: np.concatenate(v) for name, v in arrays.items()}
    meta = {"tau_max": tau_max, "tau_min": int(tau_min), "max_s2_level": int(max_s2_level),
            "n_points": int(lat.size), "n_covered": int(covered.size), "source": source}
    return CellHierarchy(merged, np.concatenate([[0], np.cumsum(sizes)]), meta)
