"""Exact top-k cell search over the hierarchical product, fast and small.

The hierarchical log score of a finest cell f is ``sum_k logit_k(a_k(f)) - sum_k logsumexp_k`` where ``a_k(f)`` is
its level-k ancestor and ``logit_k(c) = <y, t_k[c]> / T_k`` (``y`` the normalised, possibly PCA-projected query,
``t_k`` the stored rows, ``T_k`` the temperatures). The logsumexp terms are the same for every finest cell, so the
ranking depends only on the *logit sum* ``A(f) = <y, W_f>`` with the *path embedding*
``W_f = sum_k t_k[a_k(f)] / T_k``: one vector per finest cell.

1. **Approximate pass** (ONNX Runtime, one ``MatMulInteger``): ``W`` is quantized at load to int8 with a per-row
   scale (``W_f = s_f q_f + r_f``; ``||r_f||`` and ``||s_f q_f||`` kept), the query to two 7-bit parts
   (``y = s (126 p_1 + p_2) + r_y``, ``|p_i| <= 63``). The integer products are exact (int32 accumulation,
   operands <= 127 so no int16 pair saturates on AVX2), so ``Ã(f) = s_f s (126 <p_1,q_f> + <p_2,q_f>)`` is the
   exact value of ``<ŷ, Ŵ_f>`` and, by Cauchy-Schwarz,

       |A(f) - Ã(f)| <= E(f) = ||y|| ||r_f|| + ||r_y|| ||s_f q_f||        (+ a 1e-9 relative float64 margin)

2. **Candidates**: ``tau`` = the smallest lower bound ``Ã - E`` of the k cells of largest ``Ã`` (k cells reach it
   for certain); every cell with ``Ã + E >= tau`` may be in the top-k (a cell outside that set is beaten by k
   cells for certain). :func:`select_candidates` is the textbook form (``tau`` = the k-th largest lower bound).
3. **Exact re-scoring** of the candidates in float64 over the stored rows (fp32 / fp16 exactly, int8 as
   ``q * scale``), lazily, in decreasing order of ``Ã + E`` until the next upper bound is below the k-th exact
   score found, so the returned indices and their order are those of brute force over the stored table in
   exact arithmetic (float64 rounding, ~1e-12, can only swap cells tied to that precision; ties go to the lower
   index).

The normaliser ``logsumexp_f A(f)`` (for probabilities renormalised over the finest level) is not exact: it is
estimated with the exact ``A`` of the re-scored cells and ``Ã`` of the rest, and bounded by shifting every other cell
by its bound (``log_norm_error``).

Memory: the int8 path table (n_finest x dim bytes) lives only inside ONNX Runtime (packed); the stored rows stay in
their stored dtype. The scoring session runs on the calling thread (``intra_op_num_threads=1``: no thread pool, so
nothing spins), and no BLAS call is on the hot path (no OpenBLAS worker wakes up). One query's pass writes into
per-thread preallocated buffers through an ONNX Runtime I/O binding (no n-sized allocation per call).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from geosurge.privacy import import_onnxruntime

from . import onnxgraph
from .memory import release_freed_heap

#: query parts are 7-bit (|p| <= 63, shifted by 64 into 1..127 as uint8) so that u8 x s8 pairs cannot saturate
#: int16 in AVX2's vpmaddubsw: 2 * 127 * 127 = 32258 < 32767
QUERY_LEVELS = 63
QUERY_ZERO_POINT = 64
#: relative and absolute safety margins on the bound (float64 rounding in W, the norms and the bound itself is
#: < 1e-13 relative; these are orders of magnitude above it)
BOUND_REL, BOUND_ABS = 1e-9, 1e-9
#: queries per ONNX Runtime call (the int32 output is 2 x n_finest x 4 bytes per query)
BATCH_CHUNK = 64


@dataclass
class SearchResult:
    """Top-k of the exact search for N queries.

    ``indices`` (N, k) int64: finest cells, best first (exact). ``logit_sums`` (N, k) float64: their exact
    ``A(f)``. ``log_probs`` (N, k) float64: log-probability renormalised over the finest level,
    ``A(f) - log_norm``, within ``log_norm_error`` (N,) of the exact value. ``candidates`` (N,): cells re-scored
    exactly. ``scores`` (N, n_finest) float32 or None: every cell's logit sum (exact for candidates, else within
    ``bound`` (N,) = max E(f) of it), for statistics over the whole distribution (uncertainty radius)."""
    indices: np.ndarray
    logit_sums: np.ndarray
    log_probs: np.ndarray
    log_norm: np.ndarray
    log_norm_error: np.ndarray
    candidates: np.ndarray
    bound: np.ndarray
    scores: np.ndarray | None = None


def quantize_query(y: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, D) float64 -> (uint8 (2B, D): rows p_1 + 64, p_2 + 64 per query; s (B,); ||r_y|| (B,)).

    ``y = s (126 p_1 + p_2) + r_y`` with ``s = max|y| / (63 * 126)``, ``|p_1|, |p_2| <= 63`` and
    ``|r_y| <= s / 2`` elementwise (the integer ``126 p_1 + p_2`` is ``rint(y / s)``). ``out``: a (2B, D) uint8
    array to write the parts into (returned)."""
    y = np.asarray(y, np.float64)
    s = np.abs(y).max(1) / (QUERY_LEVELS * 2 * QUERY_LEVELS)
    s[s == 0] = 1.0
    whole = np.rint(y / s[:, None])
    p1 = np.rint(whole / (2 * QUERY_LEVELS))
    a = np.empty((2 * len(y), y.shape[1]), np.uint8) if out is None else out
    np.add(p1, QUERY_ZERO_POINT, out=a[0::2], casting="unsafe")  # integers in 1..127: the cast is exact
    whole -= 2 * QUERY_LEVELS * p1
    np.add(whole, QUERY_ZERO_POINT, out=a[1::2], casting="unsafe")
    whole += 2 * QUERY_LEVELS * p1  # back to rint(y / s), exactly (integers < 2^53)
    ry = y - whole * s[:, None]
    return a, s, np.sqrt(np.einsum("ij,ij->i", ry, ry))


def _matmul_integer_graph(d: int, n: int) -> bytes:
    nodes = [onnxgraph.node("MatMulInteger", ["query", "table", "zero_point"], ["acc"])]
    inits = [onnxgraph.external_tensor("table", np.int8, [d, n]),
             onnxgraph.tensor("zero_point", np.array(QUERY_ZERO_POINT, np.uint8))]
    return onnxgraph.model(nodes, [onnxgraph.value_info("query", np.uint8, ["rows", d])],
                           [onnxgraph.value_info("acc", np.int32, ["rows", n])], inits, name="cell_path_scores")


def _session(model: bytes, table: np.ndarray, threads: int = 1):
    """An ONNX Runtime session whose ``table`` initializer is copied from ``table`` (ORT then packs it for its int8
    GEMM; the caller may free its array). The runtime's is single-threaded: it runs on the calling thread, no pool,
    nothing spinning between calls; ``threads`` > 1 (benchmarks) gets a pool that does not spin."""
    ort = import_onnxruntime()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_external_initializers(["table"], [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(table))])
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


_KERNEL_EXACT: bool | None = None


def kernel_is_exact() -> bool:
    """Whether this CPU's ONNX Runtime ``MatMulInteger`` returns exact int32 products for our operand ranges,
    checked once per process on probes built to saturate 16-bit intermediates (all-127 queries against all-+-127
    tables, alternating signs, random rows). The bound relies on it; where it fails the search falls back to
    brute force."""
    global _KERNEL_EXACT
    if _KERNEL_EXACT is None:
        rng = np.random.default_rng(0)
        d, n = 64, 48
        b = rng.integers(-127, 128, size=(d, n), dtype=np.int8)
        b[:, 0], b[:, 1] = 127, -127
        b[:, 2] = np.where(np.arange(d) % 2 == 0, 127, -127)
        a = rng.integers(QUERY_ZERO_POINT - QUERY_LEVELS, QUERY_ZERO_POINT + QUERY_LEVELS + 1, size=(6, d))
        a[0], a[1] = QUERY_ZERO_POINT + QUERY_LEVELS, QUERY_ZERO_POINT - QUERY_LEVELS
        a = a.astype(np.uint8)
        try:
            got = _session(_matmul_integer_graph(d, n), b).run(None, {"query": a})[0]
            want = (a.astype(np.int64) - QUERY_ZERO_POINT) @ b.astype(np.int64)
            _KERNEL_EXACT = bool(np.array_equal(got, want))
        except Exception:  # noqa: BLE001 - any failure to build or run the kernel means: do not rely on it
            _KERNEL_EXACT = False
    return _KERNEL_EXACT


def path_embeddings(rows, ancestors: np.ndarray, inv_t: np.ndarray, dim: int) -> np.ndarray:
    """(m, dim) float64 path embeddings ``W_f = sum_k t_k[a_k(f)] / T_k`` of the m finest cells whose ancestors
    (m, L) are given. ``rows(k, idx)`` -> level k's stored rows ``idx`` in float64 (exactly); ``inv_t`` (L,) float64
    = 1 / T_k. Each distinct ancestor row is read once."""
    w = np.zeros((len(ancestors), dim), np.float64)
    for k in range(ancestors.shape[1]):
        u, inv = np.unique(ancestors[:, k], return_inverse=True)
        w += rows(k, u)[inv.ravel()] * inv_t[k]
    return w


class PathIndex:
    """The approximate pass: the int8 path table inside an ONNX Runtime session, and the per-cell bound terms.

    ``rows(k, idx)`` -> float64 (len(idx), dim): the stored rows of level k, exactly. ``ancestors`` (n_finest, L)
    int; ``temperatures`` (L,) float32. Built in chunks of ``chunk`` finest cells (peak extra memory about
    ``chunk x dim x 8 x 6`` bytes besides the int8 table; each cell's row is computed alone, so the result does
    not depend on ``chunk``); ``after_chunk()`` runs after each (the scorer drops the memory-mapped rows it read
    from the process there). The freed chunk buffers are handed back to the OS before ONNX Runtime builds its
    session (:func:`~geosurge.runtime.memory.release_freed_heap`). Measured on the edge bundle (18,204 x 512):
    the build peaks ~17 MB lower with ``chunk`` 128 and that trim than with 512 and none, ~10% more build time."""

    def __init__(self, rows, ancestors: np.ndarray, temperatures: np.ndarray, dim: int, chunk: int = 128,
                 after_chunk=None):
        n = ancestors.shape[0]
        inv_t = 1.0 / np.asarray(temperatures, np.float64)
        table = np.empty((dim, n), np.int8)  # MatMulInteger's B: (dim, n_finest)
        self.scale = np.empty(n, np.float32)  # float32 values (exactly; see below), half the bytes per pass
        self.resid_norm = np.empty(n, np.float64)
        self.quant_norm = np.empty(n, np.float64)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            w = path_embeddings(rows, ancestors[c0:c1], inv_t, dim)
            s = (np.abs(w).max(1) / 127.0).astype(np.float32).astype(np.float64)
            s = np.where(s > 0, s, 1.0)
            q = np.clip(np.rint(w / s[:, None]), -127, 127)
            r = w - q * s[:, None]
            table[:, c0:c1] = q.T
            self.scale[c0:c1] = s
            self.resid_norm[c0:c1] = np.sqrt(np.einsum("ij,ij->i", r, r))
            self.quant_norm[c0:c1] = np.sqrt(np.einsum("ij,ij->i", q, q)) * s
            del w, q, r
            if after_chunk is not None:
                after_chunk()
        self.resid_norm = self.resid_norm * (1 + BOUND_REL) + BOUND_ABS
        self.quant_norm = self.quant_norm * (1 + BOUND_REL) + BOUND_ABS
        self.quant_norm_max = float(self.quant_norm.max())
        self.resid_norm_max = float(self.resid_norm.max())
        self.n, self.dim = n, dim
        self.table_bytes = table.nbytes
        release_freed_heap()  # the chunks' float64 temporaries: not kept beside what the session build allocates
        self.session = _session(_matmul_integer_graph(dim, n), table)
        self._local = threading.local()

    def products(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, dim) float64 queries -> (int32 (2B, n): the integer products of each query's two parts with every
        row, s (B,), ||r_y|| (B,)) (see :func:`quantize_query`)."""
        a, s, ry = quantize_query(y)
        return self.session.run(None, {"query": a})[0], s, ry

    def approx(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, dim) float64 queries -> (Ã (B, n) float64, ||y|| (B,), ||r_y|| (B,)); ``|A - Ã| <= E`` with
        ``E = ||y|| resid_norm + ||r_y|| quant_norm`` (see :meth:`bound`)."""
        acc, s, ry = self.products(y)
        approx = acc[0::2].astype(np.float64)
        approx *= 2 * QUERY_LEVELS
        approx += acc[1::2]  # = <126 p_1 + p_2, q_f>, exact (|.| < 2^31)
        approx *= self.scale
        approx *= s[:, None]
        return approx, np.sqrt(np.einsum("ij,ij->i", y, y)), ry

    def bound(self, ynorm: float, ry: float) -> tuple[np.ndarray, float]:
        """(E(f) (n,) float64, max_f E(f)) for one query."""
        c = ry * self.quant_norm_max * (1 + BOUND_REL) + BOUND_ABS
        e = self.resid_norm * (ynorm * (1 + BOUND_REL))
        e += c
        return e, self.resid_norm_max * ynorm * (1 + BOUND_REL) + c

    def _work(self) -> "_Work":
        """This thread's preallocated buffers and ONNX Runtime I/O binding (one set per thread: searches on
        several threads never share them)."""
        w = getattr(self._local, "work", None)
        if w is None:
            w = self._local.work = _Work(self.session, self.n, self.dim)
        return w

    def search_one(self, y: np.ndarray, k: int, exact, with_scores: bool = False,
                   acc: np.ndarray | None = None, s: float | None = None, ry: float | None = None,
                   marks: list | None = None) -> TopK:
        """Exact top-k for one (dim,) float64 query ``y``. ``exact(cells)`` -> the exact ``A`` (float64) of an
        int64 array of finest cells. ``acc`` (2, n) int32, ``s``, ``ry``: this query's approximate pass when the
        caller ran it for a batch (otherwise it runs here, into this thread's preallocated buffers).

        Steps 2-3 of the module docstring, with few passes over the n cells: ``tau`` = the smallest lower bound
        ``Ã - E`` of the k cells of largest ``Ã`` (k cells reach it for certain); the candidates ``Ã + E >= tau``
        are then re-scored in decreasing order of ``Ã + E``, RESCORE_STEP at a time, until the next one's upper
        bound falls below the k-th best exact ``A`` found so far (no cell left can enter the top-k, not even by a
        tie: its ``A`` is below the k-th). ``marks``: a list to append ``time.perf_counter_ns()`` to after each
        stage (:data:`STAGES`; for a benchmark). Raises nothing for finite input."""
        n = self.n
        k = min(k, n)
        w = self._work()
        mark = marks.append if marks is not None else (lambda t: None)
        clock = time.perf_counter_ns if marks is not None else (lambda: 0)
        if acc is None:
            _, s_, ry_ = quantize_query(y[None], out=w.query)
            s, ry = float(s_[0]), float(ry_[0])
            mark(clock())
            self.session.run_with_iobinding(w.io)
            acc = w.acc
        mark(clock())
        ynorm = float(np.sqrt(np.einsum("i,i->", y, y)))
        t, v = w.t, w.v
        np.multiply(acc[0], 2 * QUERY_LEVELS, out=t)
        np.add(t, acc[1], out=t)  # <126 p_1 + p_2, q_f>, exact in int32 (|.| <= 127 * 63 * 127 * dim < 2^31)
        np.multiply(t, self.scale, out=v)  # v = Ã / s (one float64 rounding)
        mark(clock())
        # the bound in the same units: E(f) / s = ys resid_f + cs (as in bound())
        ys = ynorm * (1 + BOUND_REL) / s
        cs = (ry * self.quant_norm_max * (1 + BOUND_REL) + BOUND_ABS) / s
        emax_s = self.resid_norm_max * ys + cs
        # the k cells of largest Ã: among those within 3 max E of the best (few), else over every cell
        vmax = float(v.max())
        pre = np.flatnonzero(v >= vmax - 3 * emax_s)
        if pre.size < k:
            pre = np.argpartition(v, n - k)[n - k:]
        first = pre if pre.size == k else pre[np.argpartition(v[pre], pre.size - k)[pre.size - k:]]
        tau = float((v[first] - (self.resid_norm[first] * ys + cs)).min())
        # candidates: Ã + E >= tau (every one has Ã >= tau - max E: within pre when that reaches so low)
        lo = tau - emax_s
        cand = pre[v[pre] >= lo] if lo >= vmax - 3 * emax_s else np.flatnonzero(v >= lo)
        upper = v[cand] + (self.resid_norm[cand] * ys + cs)
        keep = upper >= tau
        cand, upper = cand[keep], upper[keep]
        order = np.argsort(-upper, kind="stable")
        cand, upper = cand[order], upper[order]
        mark(clock())
        cells, vals = [], []
        top_c = top_v = np.empty(0)
        p0, kth = 0, -np.inf
        while p0 < cand.size and not upper[p0] < kth / s:  # upper is sorted: no cell left can reach the k-th
            step = cand[p0:p0 + max(RESCORE_STEP, k - p0)]
            cells.append(step)
            vals.append(exact(step))
            top_c, top_v = np.concatenate([top_c, step]), np.concatenate([top_v, vals[-1]])
            order = np.lexsort((top_c, -top_v))[:k]
            top_c, top_v = top_c[order].astype(np.int64), top_v[order]
            p0 += step.size
            if top_c.size == k:
                kth = float(top_v[-1])
        cells, vals = np.concatenate(cells), np.concatenate(vals)
        mark(clock())
        # the normaliser over every cell: exact A of the re-scored cells, Ã of the others (float32)
        scores = w.scores
        np.multiply(v, s, out=scores, casting="same_kind")
        log_norm, err, scores = log_norm_bounds(scores, emax_s * s, cells, vals, keep=with_scores,
                                                bound_abs=(ynorm + ry) * self.quant_norm_max + emax_s * s)
        mark(clock())
        return TopK(top_c, top_v, log_norm, err, cells.size, emax_s * s, scores if with_scores else None)


#: what :meth:`PathIndex.search_one` marks the end of (``marks``), in order, when it runs its own first pass
STAGES = ("quantize the query", "int8 product (ONNX Runtime)", "approximate scores", "candidates",
          "exact re-scoring", "normaliser")
#: re-scored cells per step of the lazy exact re-scoring (after the first k)
RESCORE_STEP = 8


@dataclass
class TopK:
    """One query's exact top-k (see :meth:`PathIndex.search_one`): ``indices`` (k,) int64, best first (ties to the
    lower index); ``logit_sums`` (k,) float64 exact; ``log_norm`` and its bound ``log_norm_error``; ``rescored``
    cells scored exactly; ``bound`` max_f E(f); ``scores`` (n,) float32 or None (exact for the re-scored cells)."""
    indices: np.ndarray
    logit_sums: np.ndarray
    log_norm: float
    log_norm_error: float
    rescored: int
    bound: float
    scores: np.ndarray | None


class _Work:
    """Per-thread buffers of :meth:`PathIndex.search_one` and an I/O binding that has ONNX Runtime read the query
    from ``query`` and write its int32 products into ``acc`` (no allocation per call)."""

    def __init__(self, session, n: int, dim: int):
        ort = import_onnxruntime()

        self.query = np.empty((2, dim), np.uint8)
        self.acc = np.empty((2, n), np.int32)
        self.t = np.empty(n, np.int32)
        self.v = np.empty(n, np.float64)
        self.u = np.empty(n, np.float64)
        self.scores = np.empty(n, np.float32)
        self._query_value = ort.OrtValue.ortvalue_from_numpy(self.query)  # shares the buffer's memory
        self.io = session.io_binding()
        self.io.bind_ortvalue_input("query", self._query_value)
        self.io.bind_output("acc", "cpu", 0, np.int32, list(self.acc.shape), self.acc.ctypes.data)


def select_candidates(approx: np.ndarray, bound: np.ndarray, k: int) -> np.ndarray:
    """Indices of every cell whose upper bound reaches the k-th largest lower bound (sorted ascending). The
    reference form of step 2 (:meth:`PathIndex.search` takes ``tau`` from exact scores instead; tests compare)."""
    n = approx.size
    k = min(k, n)
    lower = approx - bound
    tau = np.partition(lower, n - k)[n - k]
    return np.flatnonzero(approx + bound >= tau)


def log_norm_bounds(scores: np.ndarray, emax: float, cand: np.ndarray, exact: np.ndarray, keep: bool = True,
                    bound_abs: float | None = None) -> tuple[float, float, np.ndarray]:
    """logsumexp over all cells of A, estimated with ``exact`` on ``cand`` and the float32 approximate ``scores``
    (n,) elsewhere: (estimate, error bound, the float32 scores used, with ``exact`` written in; a copy when
    ``keep``, else ``scores`` is overwritten). The bound moves every non-candidate by ``emax`` (>= its E(f)) both
    ways, plus the float32 arithmetic: each score and its shift by the maximum ``m`` are rounded once (relative
    2^-24 each, so every exp argument is off by at most 2^-23 (max|score| + |m|)), the exp and the float64 sum of
    float32 terms add < 1e-6 relative. ``bound_abs``: a known bound on max|score| (saves a pass over the
    scores; for the approximate pass ``(||y|| + ||r_y||) max_f ||s_f q_f|| + max_f E(f)``)."""
    scores[cand] = exact
    out = scores.copy() if keep else scores
    m = float(exact.max())  # the top cell is a candidate: the maximum is exact
    if bound_abs is None:
        bound_abs = max(abs(float(scores.min())), abs(float(scores.max())))
    scores -= np.float32(m)
    e = np.exp(scores, out=scores)
    total = float(e.sum(dtype=np.float64))
    cand_mass = float(np.exp(exact - m).sum())
    rest = max(total - float(e[cand].sum(dtype=np.float64)), 0.0)
    est = m + np.log(total)
    hi = m + np.log(cand_mass + rest * np.exp(emax))
    lo = m + np.log(cand_mass + rest * np.exp(-emax))
    rounding = 2.0 ** -23 * (max(bound_abs, abs(m)) + abs(m)) + 1e-6
    return est, max(hi - est, est - lo) + rounding, out
