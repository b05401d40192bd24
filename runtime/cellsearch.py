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

2. **Candidates**: ``tau`` = the k-th largest lower bound ``Ã - E``; every cell with ``Ã + E >= tau`` may be in
   the top-k (a cell outside that set is beaten by k cells for certain).
3. **Exact re-scoring** of the candidates in float64 over the stored rows (fp32 / fp16 exactly, int8 as
   ``q * scale``), so the returned indices and their order are those of brute force over the stored table in
   exact arithmetic (float64 rounding, ~1e-12, can only swap cells tied to that precision; ties go to the lower
   index).

The normaliser ``logsumexp_f A(f)`` (for probabilities renormalised over the finest level) is not exact: it is
estimated with the exact ``A`` of the candidates and ``Ã`` of the rest, and bounded by shifting every non-candidate
by its bound (``log_norm_error``).

Memory: the int8 path table (n_finest x dim bytes) lives only inside ONNX Runtime (packed); the stored rows stay in
their stored dtype. The scoring session runs on the calling thread (``intra_op_num_threads=1``: no thread pool, so
nothing spins), and no BLAS call is on the hot path (no OpenBLAS worker wakes up).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import onnxgraph

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


def quantize_query(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, D) float64 -> (uint8 (2B, D): rows p_1 + 64, p_2 + 64 per query; s (B,); ||r_y|| (B,)).

    ``y = s (126 p_1 + p_2) + r_y`` with ``s = max|y| / (63 * 126)``, ``|p_1|, |p_2| <= 63`` and
    ``|r_y| <= s / 2`` elementwise (the integer ``126 p_1 + p_2`` is ``rint(y / s)``)."""
    y = np.asarray(y, np.float64)
    s = np.abs(y).max(1) / (QUERY_LEVELS * 2 * QUERY_LEVELS)
    s[s == 0] = 1.0
    whole = np.rint(y / s[:, None])
    p1 = np.rint(whole / (2 * QUERY_LEVELS))
    a = np.empty((2 * len(y), y.shape[1]), np.uint8)
    a[0::2] = p1 + QUERY_ZERO_POINT
    a[1::2] = whole - 2 * QUERY_LEVELS * p1 + QUERY_ZERO_POINT
    ry = y - whole * s[:, None]
    return a, s, np.sqrt(np.einsum("ij,ij->i", ry, ry))


def _matmul_integer_graph(d: int, n: int) -> bytes:
    nodes = [onnxgraph.node("MatMulInteger", ["query", "table", "zero_point"], ["acc"])]
    inits = [onnxgraph.external_tensor("table", np.int8, [d, n]),
             onnxgraph.tensor("zero_point", np.array(QUERY_ZERO_POINT, np.uint8))]
    return onnxgraph.model(nodes, [onnxgraph.value_info("query", np.uint8, ["rows", d])],
                           [onnxgraph.value_info("acc", np.int32, ["rows", n])], inits, name="cell_path_scores")


def _session(model: bytes, table: np.ndarray):
    """A single-threaded ONNX Runtime session whose ``table`` initializer is copied from ``table`` (ORT then packs
    it for its int8 GEMM; the caller may free its array)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # runs on the calling thread: no pool, nothing spinning between calls
    opts.inter_op_num_threads = 1
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


class PathIndex:
    """The approximate pass: the int8 path table inside an ONNX Runtime session, and the per-cell bound terms.

    ``rows(k, idx)`` -> float64 (len(idx), dim): the stored rows of level k, exactly. ``ancestors`` (n_finest, L)
    int; ``temperatures`` (L,) float32. Built in chunks of ``chunk`` finest cells (peak extra memory about
    ``chunk x dim x 8 x 6`` bytes besides the int8 table); ``after_chunk()`` runs after each (the scorer drops
    the memory-mapped rows it read from the process there)."""

    def __init__(self, rows, ancestors: np.ndarray, temperatures: np.ndarray, dim: int, chunk: int = 512,
                 after_chunk=None):
        n, levels = ancestors.shape
        inv_t = 1.0 / np.asarray(temperatures, np.float64)
        table = np.empty((dim, n), np.int8)  # MatMulInteger's B: (dim, n_finest)
        self.scale = np.empty(n, np.float64)
        self.resid_norm = np.empty(n, np.float64)
        self.quant_norm = np.empty(n, np.float64)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            w = np.zeros((c1 - c0, dim), np.float64)
            for k in range(levels):
                u, inv = np.unique(ancestors[c0:c1, k], return_inverse=True)
                w += rows(k, u)[inv.ravel()] * inv_t[k]
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
        self.session = _session(_matmul_integer_graph(dim, n), table)

    def approx(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, dim) float64 queries -> (Ã (B, n) float64, ||y|| (B,), ||r_y|| (B,)); ``|A - Ã| <= E`` with
        ``E = ||y|| resid_norm + ||r_y|| quant_norm`` (see :meth:`bound`)."""
        a, s, ry = quantize_query(y)
        acc = self.session.run(None, {"query": a})[0]
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


def select_candidates(approx: np.ndarray, bound: np.ndarray, k: int) -> np.ndarray:
    """Indices of every cell whose upper bound reaches the k-th largest lower bound (sorted ascending)."""
    n = approx.size
    k = min(k, n)
    lower = approx - bound
    tau = np.partition(lower, n - k)[n - k]
    return np.flatnonzero(approx + bound >= tau)


def log_norm_bounds(approx: np.ndarray, emax: float, cand: np.ndarray, exact: np.ndarray
                    ) -> tuple[float, float, np.ndarray]:
    """logsumexp over all cells of A, estimated with ``exact`` on ``cand`` and ``approx`` elsewhere: (estimate,
    error bound, the float32 scores used). The bound moves every non-candidate by ``emax`` (>= its E(f)) both
    ways and adds 1e-5 for the float32 exp and sum (relative error < 1e-6 each)."""
    scores = approx.astype(np.float32)
    scores[cand] = exact
    m = float(exact.max())  # the top cell is a candidate: the maximum is exact
    e = np.exp(scores - np.float32(m))
    total = float(e.sum(dtype=np.float64))
    cand_mass = float(np.exp(exact - m).sum())
    rest = max(total - float(e[cand].sum(dtype=np.float64)), 0.0)
    est = m + np.log(total)
    hi = m + np.log(cand_mass + rest * np.exp(emax))
    lo = m + np.log(cand_mass + rest * np.exp(-emax))
    return est, max(hi - est, est - lo) + 1e-5, scores
