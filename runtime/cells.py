"""Cell scoring in numpy: per-level cosine logits / temperature, log-softmax, the hierarchical product over all
levels, top-k (brute force or beam), and an uncertainty radius from the finest-level distribution."""
from __future__ import annotations

import json

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.geo import CellHierarchy, haversine_km, load_hierarchy


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)))


TABLE_DTYPES = ("float32", "float16", "int8")
TABLE_ALIASES = {"fp32": "float32", "fp16": "float16"}
#: what a user may type (``--table``)
TABLE_CHOICES = (*TABLE_DTYPES, *TABLE_ALIASES)


def table_dtype(name: str) -> str:
    """A table storage name (``fp16``, ``float16``, ``int8``, ...) as its canonical dtype; GeosurgeError otherwise."""
    dtype = TABLE_ALIASES.get(name, name)
    if dtype not in TABLE_DTYPES:
        raise GeosurgeError(f"cell table dtype must be one of {', '.join(TABLE_DTYPES)}, not {name!r}")
    return dtype


def stored_rows(t: np.ndarray, dtype: str) -> np.ndarray:
    """What a table level reads back as after :func:`save_cell_table` with ``dtype`` (fp16 rounding, or per-row
    int8 with its scales), in float32."""
    if table_dtype(dtype) == "int8":
        q, scale = quantize_rows(t)
        return q.astype(np.float32) * scale[:, None]
    return np.asarray(t, dtype=table_dtype(dtype)).astype(np.float32)


def quantize_rows(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``t ~= q * scale[:, None]``."""
    t = np.asarray(t, np.float32)
    scale = np.abs(t).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(t / scale[:, None]), -127, 127).astype(np.int8), scale


def save_cell_table(path, tables: list[np.ndarray], temperatures: np.ndarray, dtype: str = "float16",
                    meta: dict | None = None, projection: np.ndarray | None = None,
                    outside: np.ndarray | None = None) -> None:
    """The bundle's cell table: per-level L2-normalised embeddings + per-level temperatures. ``dtype`` float16
    (default), float32, or int8 (per-row scales; scored in float32). ``projection`` (D, K): the rows are K-d PCA
    coordinates and the image embedding is projected the same way before scoring. ``outside``: embeddings of the
    first level's cells that a pruning dropped (the runtime's "outside the kept region" probes)."""
    dtype = table_dtype(dtype)
    arrays = {}
    for k, t in enumerate(tables):
        if dtype == "int8":
            arrays[f"emb_{k}"], arrays[f"scale_{k}"] = quantize_rows(t)
        else:
            arrays[f"emb_{k}"] = np.asarray(t, dtype=dtype)
    if projection is not None:
        arrays["projection"] = np.asarray(projection, np.float32)
    if outside is not None:
        arrays["outside"] = np.asarray(outside, np.float16)
    header = {"levels": len(tables), "dtype": dtype, **(meta or {})}
    np.savez(path, temperature=np.asarray(temperatures, np.float32),
             meta=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)


class CellScorer:
    """Scores embeddings against a bundle's cell table and hierarchy."""

    def __init__(self, hierarchy: CellHierarchy, tables: list[np.ndarray], temperatures: np.ndarray,
                 projection: np.ndarray | None = None, outside: np.ndarray | None = None):
        if len(tables) != hierarchy.num_levels:
            raise GeosurgeError(f"cell table has {len(tables)} levels, hierarchy {hierarchy.num_levels}")
        for k, (t, n) in enumerate(zip(tables, hierarchy.sizes)):
            if t.shape[0] != n:
                raise GeosurgeError(f"cell table level {k} has {t.shape[0]} rows, hierarchy {n} cells")
        self.hierarchy = hierarchy
        self.tables = [np.asarray(t, np.float32) for t in tables]  # fp32 accumulation
        self.temperatures = np.asarray(temperatures, np.float32)
        self.projection = None if projection is None else np.asarray(projection, np.float32)
        self.outside = None if outside is None else np.asarray(outside, np.float32)
        self.ancestors = hierarchy.ancestors()
        fin = hierarchy.level(-1)
        self.rep_lat, self.rep_lon = fin.rep_lat, fin.rep_lon
        self.tokens = fin.tokens
        # children lists (CSR) per level, for the beam search
        self._children = []
        for k in range(1, hierarchy.num_levels):
            par = hierarchy.level(k).parent
            order = np.argsort(par, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(par, minlength=hierarchy.sizes[k - 1]))])
            self._children.append((order, starts))

    @classmethod
    def load(cls, cells_path, table_path) -> "CellScorer":
        h = load_hierarchy(cells_path)
        try:
            with np.load(table_path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                tables = [z[f"emb_{k}"] for k in range(meta["levels"])]
                if meta.get("dtype") == "int8":
                    tables = [t.astype(np.float32) * z[f"scale_{k}"][:, None] for k, t in enumerate(tables)]
                temps = z["temperature"]
                proj = z["projection"] if "projection" in z.files else None
                outside = z["outside"] if "outside" in z.files else None
        except (OSError, KeyError, ValueError) as e:
            raise GeosurgeError(f"{table_path}: not a geosurge cell table ({e})") from None
        return cls(h, tables, temps, proj, outside)

    @classmethod
    def from_arrays(cls, hierarchy: CellHierarchy, tables: list[np.ndarray], temperatures: np.ndarray,
                    dtype: str = "float16", projection: np.ndarray | None = None,
                    outside: np.ndarray | None = None) -> "CellScorer":
        """The scorer :meth:`load` returns for a table saved with ``dtype`` by :func:`save_cell_table`, built from
        the in-memory arrays (same storage rounding, no file)."""
        return cls(hierarchy, [stored_rows(t, dtype) for t in tables], temperatures, projection,
                   None if outside is None else np.asarray(outside, np.float16))

    @property
    def num_levels(self) -> int:
        return len(self.tables)

    def query(self, emb: np.ndarray) -> np.ndarray:
        """The image embedding as the table sees it: L2-normalised, then PCA-projected when the table is."""
        z = np.asarray(emb, np.float32)
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        return z if self.projection is None else z @ self.projection

    def level_logits(self, emb: np.ndarray) -> list[np.ndarray]:
        z = self.query(emb)
        return [z @ t.T / self.temperatures[k] for k, t in enumerate(self.tables)]

    def region_mass(self, emb: np.ndarray) -> np.ndarray | None:
        """For a pruned table: the share of the first level's probability on kept cells (vs the dropped cells kept
        as ``outside`` probes); None for an unpruned table. Low = the photo is probably outside the kept region."""
        if self.outside is None or self.outside.size == 0:
            return None
        z = self.query(emb)
        kept = z @ self.tables[0].T / self.temperatures[0]
        out = z @ self.outside.T / self.temperatures[0]
        lp = log_softmax(np.concatenate([kept, out], axis=-1))
        return np.exp(lp[..., :kept.shape[-1]]).sum(-1)

    def level_log_probs(self, emb: np.ndarray) -> list[np.ndarray]:
        return [log_softmax(lg) for lg in self.level_logits(emb)]

    def hierarchical_scores(self, level_log_probs: list[np.ndarray]) -> np.ndarray:
        """(N, n_finest): each finest cell's log-prob plus its ancestors' (brute force over all finest cells)."""
        score = level_log_probs[-1].copy()
        for k in range(self.num_levels - 1):
            score += level_log_probs[k][:, self.ancestors[:, k]]
        return score

    def candidates(self, emb: np.ndarray, beam: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For one embedding: (finest cell indices, their hierarchical log scores).

        Without ``beam`` every finest cell is scored (brute force). With ``beam``, only the ``beam`` best partial
        paths per level are kept and only their children scored, so the work is bounded by beam x branching
        instead of the table size. The ranking equals the brute-force one whenever the best paths survive each
        cut (always when ``beam`` >= the widest level). Each level's softmax is then taken over the cells scored
        at that level, so the scores are those of the searched sub-tree.
        """
        emb = np.asarray(emb, np.float32).reshape(1, -1)
        if beam is None:
            scores = self.hierarchical_scores(self.level_log_probs(emb))[0]
            return np.arange(scores.size), scores
        z = self.query(emb)[0]
        cand = np.arange(self.tables[0].shape[0])
        cum = np.zeros(cand.size)
        for lvl in range(self.num_levels):
            if lvl > 0:
                order, starts = self._children[lvl - 1]
                counts = starts[cand + 1] - starts[cand]
                cand = order[np.concatenate([np.arange(starts[c], starts[c + 1]) for c in cand])]
                cum = np.repeat(cum, counts)
            cum = cum + log_softmax(self.tables[lvl][cand] @ z / self.temperatures[lvl])
            if lvl < self.num_levels - 1 and cand.size > beam:
                keep = np.argpartition(-cum, beam - 1)[:beam]
                cand, cum = cand[keep], cum[keep]
        return cand, cum

    def topk(self, emb: np.ndarray, k: int = 5, beam: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k finest cells (indices, log scores) for each embedding (N, D), best first."""
        out_idx, out_val = [], []
        for row in np.atleast_2d(np.asarray(emb, np.float32)):
            cand, score = self.candidates(row, beam)
            kk = min(k, score.size)
            best = np.argpartition(-score, kk - 1)[:kk]
            best = best[np.argsort(-score[best], kind="stable")]
            out_idx.append(cand[best])
            out_val.append(score[best])
        return np.stack(out_idx), np.stack(out_val)

    def uncertainty_km(self, probs: np.ndarray, lat: float, lon: float, cells: np.ndarray | None = None,
                       mass: float = 0.68) -> float:
        """Radius around (lat, lon) holding ``mass`` of the finest-level probability ``probs`` over ``cells``
        (default: all finest cells), each cell at its representative point."""
        cells = np.arange(self.rep_lat.size) if cells is None else cells
        d = haversine_km(lat, lon, self.rep_lat[cells], self.rep_lon[cells])
        order = np.argsort(d)
        cum = np.cumsum(probs[order])
        return float(d[order][min(np.searchsorted(cum, mass), d.size - 1)])
