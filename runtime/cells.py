"""Cell scoring: per-level cosine logits / temperature, log-softmax, the hierarchical product over all levels, top-k
(exact search, brute force or beam), and an uncertainty radius from the finest-level distribution.

The table stays in its stored dtype (fp16, fp32, or int8 with per-row scales), memory-mapped from the bundle file
when it is stored uncompressed; nothing holds an FP32 copy of the whole table. The exact top-k search is in
:mod:`geosurge.runtime.cellsearch`.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zipfile
from collections.abc import Sequence

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.geo import CellHierarchy, haversine_km, load_hierarchy, s2, unit_vectors

from .cellsearch import BATCH_CHUNK, PathIndex, SearchResult, kernel_is_exact


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)))


TABLE_DTYPES = ("float32", "float16", "int8")
TABLE_ALIASES = {"fp32": "float32", "fp16": "float16"}
#: rows per chunk when a brute-force path converts stored rows to float32 (8,192 x 512 x 4 B = 16 MB)
CHUNK_ROWS = 8192
#: up to this many queries, small products use numpy's own loops (einsum) instead of BLAS, whose worker threads
#: would wake up and then spin against ONNX Runtime's
NO_BLAS_ROWS = 4
#: what a user may type (``--table``)
TABLE_CHOICES = (*TABLE_DTYPES, *TABLE_ALIASES)


def table_dtype(name: str) -> str:
    """A table storage name (``fp16``, ``float16``, ``int8``, ...) as its canonical dtype; GeosurgeError otherwise."""
    dtype = TABLE_ALIASES.get(name, name)
    if dtype not in TABLE_DTYPES:
        raise GeosurgeError(f"cell table dtype must be one of {', '.join(TABLE_DTYPES)}, not {name!r}")
    return dtype


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
    (default), float32, or int8 (per-row scales). ``projection`` (D, K): the rows are K-d PCA coordinates and the
    image embedding is projected the same way before scoring. ``outside``: embeddings of the first level's cells
    that a pruning dropped (the runtime's "outside the kept region" probes). Written uncompressed (``np.savez``)
    so the runtime can memory-map the rows."""
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


def _npz_member_spans(f, names: list[str]) -> dict[str, tuple[int, tuple, np.dtype]]:
    """For the members ``names`` of an uncompressed ``.npz`` open as ``f``: name -> (byte offset of the array data in
    the file, shape, dtype). Members that are compressed or not plain C-ordered numeric arrays are left out."""
    spans = {}
    with zipfile.ZipFile(f) as zf:
        for name in names:
            info = zf.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(info.header_offset)
            sig, *_, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", f.read(30))
            if sig != 0x04034B50:
                continue
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran or dtype.hasobject or dtype.kind not in "fiu":
                continue
            spans[name] = (f.tell(), shape, dtype)
    return spans


def _mapped_npz_members(path, names: list[str]) -> tuple[dict[str, np.ndarray], mmap.mmap | None, dict]:
    """Read-only arrays viewing the members ``names`` of an uncompressed ``.npz`` through one memory map of the
    file (pages are read on first touch and count in RSS only once touched), the map, and the members' spans
    (:func:`_npz_member_spans`). Members that are compressed or not plain numeric arrays are left out (the caller
    reads those normally)."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        spans = _npz_member_spans(f, names)
        if not spans:
            return out, None, spans
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)  # no read-around: touching a row maps that row's pages only
    for name, (offset, shape, dtype) in spans.items():
        count = int(np.prod(shape))
        if offset + count * dtype.itemsize > len(mm):
            raise ValueError(f"member {name} runs past the end of the file")
        out[name] = np.frombuffer(mm, dtype, count, offset).reshape(shape)
    return out, mm, spans


#: how the exact search reads the rows it re-scores from a file-backed table: ``"pread"`` (:class:`RowReader`:
#: copied, never mapped, so they never count in RSS) or ``"mmap"`` (through the memory map). Measured on the edge
#: bundle (docs/benchmarks.md, "Runtime memory"): pread keeps the table out of RSS (mmap: +19 MB after two images,
#: +43 MB after 50 different queries, as Linux maps whole page-cache folios) at ~0.1 ms more per search (p50) on the
#: trained reference model; an untrained (flat) head re-scores more cells, ~0.4 ms more. Reading through the map and
#: dropping its pages after each search (``madvise(MADV_DONTNEED)``) was measured too: 0.05-0.15 ms faster than
#: pread at p50 with caches evicted between searches, but +11 MB peak RSS (a search maps whole folios while it runs).
READ_ROWS = "pread"


_PREADV = hasattr(os, "preadv")


class RowReader:
    """Rows of the table's levels read from the bundle file with ``pread`` into the caller's buffer: nothing of the
    file is mapped into the process, so the rows the exact search re-scores never count in its RSS. (A memory map
    does: Linux maps whole page-cache folios on a fault, up to 2 MB each on recent kernels, so re-scoring ~50 rows
    mapped ~15 MB of the fp16 table on the first search and ~20 MB after a few.)

    ``spans``: level k -> (byte offset of its (n_k, dim) rows in the file, shape, dtype), all levels of one
    ``shape[1]`` and dtype. Safe to use from several threads (positional reads). Raises OSError when the file
    cannot be read (it was checksummed when the bundle was opened)."""

    def __init__(self, path, spans: list[tuple[int, tuple, np.dtype]]):
        self.path = str(path)
        self._file = open(path, "rb")  # closed with the reader (garbage collection)
        self._fd = self._file.fileno()
        self.offsets = np.array([o for o, _, _ in spans], np.int64)
        self.sizes = np.array([shape[0] for _, shape, _ in spans], np.int64)
        self.base = np.concatenate([[0], np.cumsum(self.sizes)])  # global row id of each level's first row
        self.dim, self.dtype = int(spans[0][1][1]), np.dtype(spans[0][2])
        self.row_bytes = self.dim * self.dtype.itemsize

    def close(self) -> None:
        self._file.close()

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """(L, m) int row indices, row ``[k, i]`` of level k -> (L, m, dim) rows in the stored dtype."""
        levels, m = rows.shape
        return self._read((rows + self.base[:levels, None]).ravel()).reshape(levels, m, self.dim)

    def take(self, k: int, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (int array) of level k -> (len(idx), dim) in the stored dtype."""
        return self._read(np.asarray(idx, np.int64) + self.base[k])

    def _read(self, gid: np.ndarray) -> np.ndarray:
        """Global row ids (level k's row r is ``base[k] + r``) -> their rows, each distinct row read once."""
        u, inv = sorted_unique(gid)
        return self.read_sorted(u)[inv]

    def read_sorted(self, u: np.ndarray) -> np.ndarray:
        """Sorted distinct global row ids -> (len(u), dim) rows in the stored dtype, a run of consecutive rows of
        one level in one ``preadv`` straight into the result (no intermediate copy)."""
        level = np.searchsorted(self.base, u, side="right") - 1
        at = self.offsets[level] + (u - self.base[level]) * self.row_bytes  # file offset of each row
        new = np.empty(u.size, bool)
        new[:1] = True
        np.not_equal(np.diff(at), self.row_bytes, out=new[1:])  # another read where the next row is not the next
        starts = np.flatnonzero(new)
        out = np.empty((u.size, self.dim), self.dtype)
        buf = memoryview(out).cast("B")
        ends = starts[1:].tolist() + [u.size]
        fd, rb, got = self._fd, self.row_bytes, 0
        for a, b, o in zip(starts.tolist(), ends, at[starts].tolist()):
            if _PREADV:
                got += os.preadv(fd, [buf[a * rb:b * rb]], o)
            else:  # an OS without preadv: read, then copy
                data = os.pread(fd, (b - a) * rb, o)
                buf[a * rb:a * rb + len(data)] = data
                got += len(data)
        if got != out.nbytes:
            raise OSError(f"{self.path}: short read of the cell table ({got} of {out.nbytes} bytes)")
        return out


def sorted_unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_inverse=True)`` for a small int array (flattened), in a few numpy calls: (sorted
    distinct values, the index of each element of ``a`` among them)."""
    flat = np.ravel(a)
    s = np.sort(flat)
    keep = np.empty(s.size, bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    u = s[keep]
    return u, np.searchsorted(u, flat)


class _Float32Levels(Sequence):
    """``CellScorer.tables``: level k's rows as a new float32 array on each access (int8 rows times their
    scales), for analysis and export code; the scorer itself never holds these."""

    def __init__(self, scorer: "CellScorer"):
        self._scorer = scorer

    def __len__(self) -> int:
        return self._scorer.num_levels

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return self._scorer._rows_f32(k)


class CellTokens(Sequence):
    """``CellScorer.tokens``: the S2 token of each finest cell, made from its uint64 cell id when asked
    (``geosurge.geo.s2.to_token``) instead of held as ~18k Python strings (~1.1 MB on the edge bundle).
    ``tokens[i]`` -> str; ``tokens[idx]`` (slice or int array) -> list of str; equal to ``CellLevel.tokens``."""

    def __init__(self, cell_id: np.ndarray):
        self._ids = cell_id

    def __len__(self) -> int:
        return int(self._ids.size)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"cell {i} out of range ({n})")
            return s2.to_token(self._ids[int(i)])[0]
        return s2.to_token(self._ids[i])


class CellScorer:
    """Scores embeddings against a bundle's cell table and hierarchy.

    ``tables``: per-level (n_k, dim) arrays in their stored dtype (float32 / float16 / int8; int8 needs
    ``scales``, per-level (n_k,) float32), kept as given. ``temperatures`` (L,). ``projection`` (D, dim): a PCA
    table (the query is projected first). ``outside`` (m, dim): dropped first-level cells of a pruned table.
    Raises GeosurgeError when the table and hierarchy disagree."""

    def __init__(self, hierarchy: CellHierarchy, tables: list[np.ndarray], temperatures: np.ndarray,
                 projection: np.ndarray | None = None, outside: np.ndarray | None = None,
                 scales: list[np.ndarray] | None = None):
        if len(tables) != hierarchy.num_levels:
            raise GeosurgeError(f"cell table has {len(tables)} levels, hierarchy {hierarchy.num_levels}")
        for k, (t, n) in enumerate(zip(tables, hierarchy.sizes)):
            if t.shape[0] != n:
                raise GeosurgeError(f"cell table level {k} has {t.shape[0]} rows, hierarchy {n} cells")
        self.hierarchy = hierarchy
        self._rows = [t if t.dtype in (np.float32, np.float16, np.int8) else np.asarray(t, np.float32)
                      for t in tables]
        dtypes = {t.dtype for t in self._rows}
        self._rows_dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)  # any mix casts exactly
        if any(t.dtype == np.int8 for t in self._rows) and scales is None:
            raise GeosurgeError("an int8 cell table needs its per-row scales")
        self._scales = None if scales is None else [np.asarray(s, np.float32) for s in scales]
        #: int8: every level's scales in float64, indexed by global row id (n_cells x 8 bytes)
        self._scales_flat = None if scales is None else np.concatenate(self._scales).astype(np.float64)
        self.temperatures = np.asarray(temperatures, np.float32)
        self._temps64 = self.temperatures.astype(np.float64)
        self.projection = None if projection is None else np.asarray(projection, np.float32)
        self.outside = None if outside is None else np.asarray(outside, np.float32)
        self.ancestors = hierarchy.ancestors()
        #: global row id of each level's first row (level k's row r is ``_base[k] + r``), and the total
        self._base = np.concatenate([[0], np.cumsum([len(t) for t in self._rows])]).astype(self.ancestors.dtype)
        fin = hierarchy.level(-1)
        self.rep_lat, self.rep_lon = fin.rep_lat, fin.rep_lon
        self.tokens = CellTokens(fin.cell_id)  # made when asked (the top-k's only)
        self._xyz = np.ascontiguousarray(unit_vectors(self.rep_lat, self.rep_lon).T)  # (3, n_finest)
        self._mmap = None
        self._reader: RowReader | None = None
        self._index: PathIndex | None = None
        self._extent_km: np.ndarray | None = None  # (n_finest,) float32, made on first use (cell_extent_km)
        # children lists (CSR) per level, for the beam search
        self._children = []
        for k in range(1, hierarchy.num_levels):
            par = hierarchy.level(k).parent
            order = np.argsort(par, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(par, minlength=hierarchy.sizes[k - 1]))])
            self._children.append((order, starts))

    @classmethod
    def load(cls, cells_path, table_path, mmap_rows: bool = True) -> "CellScorer":
        """The bundle's hierarchy (``cells.npz``) and cell table (``cell_table.npz``). With ``mmap_rows`` the
        table's rows are memory-mapped when the file stores them uncompressed, and the exact search reads the rows
        it re-scores with ``pread`` (:class:`RowReader`: never mapped, so they never count in RSS). Raises
        GeosurgeError naming the file when it is not a geosurge cell table."""
        h = load_hierarchy(cells_path)
        try:
            with np.load(table_path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                names = [f"emb_{k}" for k in range(meta["levels"])]
                mapped, mm, spans = _mapped_npz_members(table_path, names) if mmap_rows else ({}, None, {})
                tables = [mapped[n] if n in mapped else z[n] for n in names]
                scales = ([z[f"scale_{k}"] for k in range(meta["levels"])] if meta.get("dtype") == "int8" else None)
                temps = z["temperature"]
                proj = z["projection"] if "projection" in z.files else None
                outside = z["outside"] if "outside" in z.files else None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise GeosurgeError(f"{table_path}: not a geosurge cell table ({e})") from None
        sc = cls(h, tables, temps, proj, outside, scales)
        sc._mmap = mm
        if READ_ROWS == "pread" and hasattr(os, "pread") and len(spans) == len(names) and len({spans[n][2] for n in names}) == 1:
            sc._reader = RowReader(table_path, [spans[n] for n in names])
        return sc

    @classmethod
    def from_arrays(cls, hierarchy: CellHierarchy, tables: list[np.ndarray], temperatures: np.ndarray,
                    dtype: str = "float16", projection: np.ndarray | None = None,
                    outside: np.ndarray | None = None) -> "CellScorer":
        """The scorer :meth:`load` returns for a table saved with ``dtype`` by :func:`save_cell_table`, built from
        in-memory (n_k, dim) float32 arrays without a file: the rows are held in the stored dtype (float32 arrays as
        passed, float16 rounded, or int8 with per-row scales), never as a second FP32 copy. Raises GeosurgeError
        for an unknown ``dtype`` or a table that disagrees with ``hierarchy``."""
        dtype = table_dtype(dtype)
        scales = None
        if dtype == "int8":
            rows, scales = map(list, zip(*(quantize_rows(t) for t in tables)))
        else:
            rows = [np.asarray(t, dtype) for t in tables]
        return cls(hierarchy, rows, temperatures, projection,
                   None if outside is None else np.asarray(outside, np.float16), scales)

    # ---- the stored rows ---------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self._rows)

    @property
    def dim(self) -> int:
        return int(self._rows[0].shape[1])

    @property
    def table_dtype(self) -> str:
        return str(self._rows[0].dtype)

    @property
    def table_bytes(self) -> int:
        """Bytes of the stored rows (and int8 scales)."""
        return sum(t.nbytes for t in self._rows) + sum(s.nbytes for s in self._scales or [])

    @property
    def tables(self) -> Sequence[np.ndarray]:
        """Per-level rows as float32, converted on each access (see :class:`_Float32Levels`)."""
        return _Float32Levels(self)

    def _rows_f32(self, k: int, idx=None) -> np.ndarray:
        t = self._rows[k] if idx is None else self._rows[k][idx]
        if t.dtype == np.int8:
            s = self._scales[k] if idx is None else self._scales[k][idx]
            return t.astype(np.float32) * s[:, None]
        return np.array(t, np.float32)  # a copy, also of fp32 rows: callers may write to it

    def _rows_f64(self, k: int, idx) -> np.ndarray:
        """Level k's rows ``idx`` in float64, exactly the stored values (int8: q * scale, exact in float64)."""
        t = self._reader.take(k, idx) if self._reader is not None else self._rows[k][idx]
        out = t.astype(np.float64)
        if t.dtype == np.int8:
            out *= self._scales[k][idx].astype(np.float64)[:, None]
        return out

    def _logits_chunked(self, z: np.ndarray, k: int) -> np.ndarray:
        """(N, dim) float32 queries -> (N, n_k) float32 logits of level k, converting CHUNK_ROWS rows at a time."""
        n = self._rows[k].shape[0]
        out = np.empty((len(z), n), np.float32)
        for a in range(0, n, CHUNK_ROWS):
            out[:, a:a + CHUNK_ROWS] = _dot(z, self._rows_f32(k, slice(a, a + CHUNK_ROWS)))
        out /= self.temperatures[k]
        return out

    # ---- brute force (every cell; chunked) ---------------------------------------------------------------------
    def query(self, emb: np.ndarray) -> np.ndarray:
        """The image embedding as the table sees it: L2-normalised, then PCA-projected when the table is."""
        z = np.asarray(emb, np.float32)
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        return z if self.projection is None else _dot(z, self.projection.T)

    def _query64(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, dim) float64: the query of the exact search (normalised and projected in float64)."""
        z = np.atleast_2d(np.asarray(emb, np.float32)).astype(np.float64)
        norm = np.sqrt(np.einsum("ij,ij->i", z, z))
        if not (np.isfinite(norm).all() and (norm > 0).all()):
            bad = np.flatnonzero(~(np.isfinite(norm) & (norm > 0)))
            raise GeosurgeError(f"cell search: embedding(s) {bad[:5].tolist()} are all zeros or not finite")
        z /= norm[:, None]
        return z if self.projection is None else np.einsum("nd,dk->nk", z, self.projection.astype(np.float64))

    def level_logits(self, emb: np.ndarray) -> list[np.ndarray]:
        """Per level (N, n_k) float32 logits (cosine / temperature) for (N, D) embeddings."""
        z = np.atleast_2d(self.query(emb))
        return [self._logits_chunked(z, k) for k in range(self.num_levels)]

    def region_mass(self, emb: np.ndarray) -> np.ndarray | None:
        """For a pruned table: the share of the first level's probability on kept cells (vs the dropped cells kept
        as ``outside`` probes); None for an unpruned table. Low = the photo is probably outside the kept region."""
        if self.outside is None or self.outside.size == 0:
            return None
        z = self.query(emb)
        z2 = np.atleast_2d(z)
        kept = self._logits_chunked(z2, 0)
        out = _dot(z2, self.outside) / self.temperatures[0]
        lp = log_softmax(np.concatenate([kept, out], axis=-1))
        mass = np.exp(lp[..., :kept.shape[-1]]).sum(-1)
        return mass if z.ndim == 2 else mass[0]

    def level_log_probs(self, emb: np.ndarray) -> list[np.ndarray]:
        return [log_softmax(lg) for lg in self.level_logits(emb)]

    def hierarchical_scores(self, level_log_probs: list[np.ndarray]) -> np.ndarray:
        """(N, n_finest): each finest cell's log-prob plus its ancestors' (brute force over all finest cells)."""
        score = level_log_probs[-1].copy()
        for k in range(self.num_levels - 1):
            score += level_log_probs[k][:, self.ancestors[:, k]]
        return score

    # ---- exact search ------------------------------------------------------------------------------------------
    def prepare_search(self) -> PathIndex | None:
        """Build the approximate pass of :meth:`search` now (done on first use otherwise): the int8 path table
        (one row per finest cell) handed to ONNX Runtime. None where this CPU's int8 kernel failed its exactness
        check (the search then runs brute force)."""
        if self._index is None and kernel_is_exact():
            self._index = PathIndex(self._rows_f64, self.ancestors, self.temperatures, self.dim,
                                    after_chunk=None if self._reader is not None else self._release_mapped_rows)
        return self._index

    def _release_mapped_rows(self) -> None:
        """Unmap the pages of memory-mapped rows from this process (they stay in the OS page cache)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def _exact_sums(self, y: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """(len(cells),) float64: A(f) = sum_k <y, t_k[a_k(f)]> / T_k over the stored rows, in float64 (relative
        rounding ~1e-15: exact for ranking except between cells tied to that precision). Each distinct row of the
        cells' paths (candidates share most ancestors) is read and scored once, all levels in one buffer, so the
        work is a few numpy calls whatever the number of levels."""
        anc = self.ancestors[cells]  # (m, L)
        u, inv = sorted_unique(anc + self._base[:-1])  # distinct global row ids (level k's row r: base[k] + r)
        level = np.searchsorted(self._base, u, side="right") - 1
        if self._reader is not None:  # read from the file, not mapped (see RowReader)
            rows = self._reader.read_sorted(u)
        else:
            rows = np.empty((u.size, self.dim), self._rows_dtype)
            cut = np.searchsorted(u, self._base)
            for k in range(self.num_levels):
                if cut[k + 1] > cut[k]:  # (np.take would copy a whole unaligned memory-mapped level)
                    rows[cut[k]:cut[k + 1]] = self._rows[k][u[cut[k]:cut[k + 1]] - self._base[k]]
        vals = np.einsum("ud,d->u", rows.astype(np.float64), y)  # the cast of the stored values is exact
        if self._scales is not None:  # int8: <y, q * scale> = <y, q> * scale, each product of exact values
            vals *= self._scales_flat[u]
        vals /= self._temps64[level]
        return vals[inv].reshape(anc.shape).sum(1)

    def search(self, emb: np.ndarray, k: int = 5, with_scores: bool = False) -> SearchResult:
        """Exact top-k finest cells for (N, D) or (D,) embeddings (see :mod:`geosurge.runtime.cellsearch`).

        The indices and their order equal brute force over the stored table in exact arithmetic (ties to the
        lower index); ``log_probs`` are renormalised over the finest level and bounded by ``log_norm_error``.
        ``with_scores`` also returns every cell's (approximate) logit sum."""
        y = self._query64(emb)
        n = self.ancestors.shape[0]
        k = min(k, n)
        index = self.prepare_search()
        res = {f: [] for f in ("indices", "logit_sums", "log_probs", "log_norm", "log_norm_error", "candidates",
                               "bound", "scores")}
        for c0 in range(0, len(y), BATCH_CHUNK):
            yc = y[c0:c0 + BATCH_CHUNK]
            if index is not None and len(yc) > 1:
                acc, s, ry = index.products(yc)
            for i, yi in enumerate(yc):
                if index is not None:
                    part = (None, None, None) if len(yc) == 1 else (acc[2 * i:2 * i + 2], float(s[i]), float(ry[i]))
                    r = index.search_one(yi, k, lambda cells, yi=yi: self._exact_sums(yi, cells), with_scores,
                                         *part)
                    top, top_a, log_norm, err = r.indices, r.logit_sums, r.log_norm, r.log_norm_error
                    n_exact, emax, scores = r.rescored, r.bound, r.scores
                else:  # brute force: every cell is a candidate
                    exact = self._exact_sums(yi, np.arange(n))
                    m = exact.max()
                    log_norm, err, emax, n_exact = m + np.log(np.exp(exact - m).sum()), 0.0, 0.0, n
                    scores = exact.astype(np.float32)
                    order = np.lexsort((np.arange(n), -exact))[:k]
                    top, top_a = order, exact[order]
                res["indices"].append(top)
                res["logit_sums"].append(top_a)
                res["log_probs"].append(top_a - log_norm)
                res["log_norm"].append(log_norm)
                res["log_norm_error"].append(err)
                res["candidates"].append(n_exact)
                res["bound"].append(emax)
                if with_scores:
                    res["scores"].append(scores)
        out = {f: np.asarray(v) for f, v in res.items() if f != "scores"}
        return SearchResult(**out, scores=np.stack(res["scores"]) if with_scores else None)

    # ---- compatibility: candidates / topk ----------------------------------------------------------------------
    def candidates(self, emb: np.ndarray, beam: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For one embedding: (finest cell indices, their hierarchical log scores).

        Without ``beam`` every finest cell is scored (brute force, chunked). With ``beam``, only the ``beam`` best
        partial paths per level are kept and only their children scored, so the work is bounded by beam x
        branching instead of the table size. The ranking equals the brute-force one whenever the best paths survive
        each cut (always when ``beam`` >= the widest level). Each level's softmax is then taken over the cells
        scored at that level, so the scores are those of the searched sub-tree. For the top-k alone use
        :meth:`topk` / :meth:`search` (exact and much faster than brute force).
        """
        emb = np.asarray(emb, np.float32).reshape(1, -1)
        if beam is None:
            scores = self.hierarchical_scores(self.level_log_probs(emb))[0]
            return np.arange(scores.size), scores
        z = self.query(emb)[0]
        cand = np.arange(self._rows[0].shape[0])
        cum = np.zeros(cand.size)
        for lvl in range(self.num_levels):
            if lvl > 0:
                order, starts = self._children[lvl - 1]
                counts = starts[cand + 1] - starts[cand]
                cand = order[np.concatenate([np.arange(starts[c], starts[c + 1]) for c in cand])]
                cum = np.repeat(cum, counts)
            cum = cum + log_softmax(np.einsum("ij,j->i", self._rows_f32(lvl, cand), z) / self.temperatures[lvl])
            if lvl < self.num_levels - 1 and cand.size > beam:
                keep = np.argpartition(-cum, beam - 1)[:beam]
                cand, cum = cand[keep], cum[keep]
        return cand, cum

    def topk(self, emb: np.ndarray, k: int = 5, beam: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k finest cells for each embedding (N, D), best first: (indices (N, k) int64, log-probabilities
        (N, k) renormalised over the finest cells searched).

        Without ``beam``: :meth:`search` (exact indices and order; log-probabilities within
        ``SearchResult.log_norm_error``). With ``beam``: the beam's cells, renormalised over its finest level."""
        if beam is None:
            r = self.search(emb, k)
            return r.indices, r.log_probs
        out_idx, out_val = [], []
        for row in np.atleast_2d(np.asarray(emb, np.float32)):
            cand, score = self.candidates(row, beam)
            score = log_softmax(score)
            kk = min(k, score.size)
            best = np.argpartition(-score, kk - 1)[:kk]
            best = best[np.lexsort((cand[best], -score[best]))]
            out_idx.append(cand[best])
            out_val.append(score[best])
        return np.stack(out_idx), np.stack(out_val)

    def cell_extent_km(self, cell: int) -> float:
        """The farthest corner of finest cell ``cell`` from its representative point, km: how far a location in the
        cell can be from the point a prediction reports (S2 cell corners, great-circle distance). Every cell's is
        computed once, on first use (vectorised: ~8 ms and 4 bytes a cell for 18,204 cells)."""
        if self._extent_km is None:
            ids = self.hierarchy.level(-1).cell_id
            lat, lon = s2.xyz_to_latlng(s2.cell_vertices(ids).reshape(-1, 3))
            d = haversine_km(np.repeat(self.rep_lat, 4), np.repeat(self.rep_lon, 4), lat, lon)
            self._extent_km = np.asarray(d, np.float32).reshape(-1, 4).max(axis=1)
        return float(self._extent_km[cell])

    def uncertainty_km(self, probs: np.ndarray, lat: float, lon: float, cells: np.ndarray | None = None,
                       mass: float = 0.68) -> float:
        """Radius (km) around (lat, lon) holding ``mass`` of the finest-level probability ``probs`` over ``cells``
        (default: all finest cells), each cell at its representative point.

        Equal to sorting every cell by distance and accumulating, in O(n): cells are binned by the cosine of their
        angle to (lat, lon) (monotone in distance), the bin where the mass is reached is found from a weighted
        histogram, and only that bin is sorted."""
        p = np.asarray(probs, np.float64)
        xyz = self._xyz if cells is None else self._xyz[:, cells]
        u = unit_vectors(lat, lon)
        key = xyz[0] * -u[0]  # 1 - cos(angle to (lat, lon)): 0 (same point) .. 2 (antipode), monotone in km
        key -= xyz[1] * u[1]
        key -= xyz[2] * u[2]
        key += 1.0
        nb = 4096
        b = np.clip((key * (nb / 2)).astype(np.int64), 0, nb - 1)
        cum = np.cumsum(np.bincount(b, weights=p, minlength=nb))
        j = int(np.searchsorted(cum, mass))
        if j >= nb:  # the mass is never reached: the farthest cell
            pick = int(np.argmax(key))
        else:
            members = np.flatnonzero(b == j)
            members = members[np.argsort(key[members], kind="stable")]
            within = (cum[j - 1] if j > 0 else 0.0) + np.cumsum(p[members])
            pick = int(members[min(int(np.searchsorted(within, mass)), members.size - 1)])
        cell = pick if cells is None else cells[pick]
        return float(haversine_km(lat, lon, self.rep_lat[cell], self.rep_lon[cell]))


def _dot(z: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(N, d) x (m, d) -> (N, m) float32; a few queries take numpy's own loops, not BLAS (see NO_BLAS_ROWS)."""
    if z.ndim == 1:
        return np.einsum("md,d->m", rows, z)
    if len(z) <= NO_BLAS_ROWS:
        return np.einsum("nd,md->nm", z, rows)
    return z @ rows.T
