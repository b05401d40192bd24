"""Exact cell search (geosurge.runtime.cellsearch): the top-k equals brute force over the stored table for every table
kind the runtime loads (fp32 / fp16 / int8 rows, PCA-projected, pruned with outside probes, level cuts), on near-ties,
exact ties and batches; the error bound holds cell by cell; memory holds no FP32 copy of the table; the ONNX writer
makes valid models; the O(n) uncertainty radius equals the sorted one.

The reference is brute force written here independently: every level's logits over all stored rows in float64,
summed along each finest cell's ancestors, ordered by (-score, index)."""
import tracemalloc

import numpy as np
import pytest

from geosurge.errors import GeosurgeError
from geosurge.runtime import cellsearch, onnxgraph
from geosurge.runtime.cells import CellScorer, save_cell_table

DIM = 48
T = 0.07


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def geo_like_tables(h, dim, rng):
    """Children resemble their parents (as geographic / trained cell embeddings do), so paths compete closely."""
    tabs = [unit(rng.normal(size=(h.sizes[0], dim)))]
    for k in range(1, h.num_levels):
        tabs.append(unit(tabs[-1][h.level(k).parent] + 0.8 * unit(rng.normal(size=(h.sizes[k], dim)))))
    return [t.astype(np.float32) for t in tabs]


def stored_rows(path):
    """float64 rows exactly as stored in a cell-table file (int8: q * scale)."""
    with np.load(path) as z:
        levels = len(z["temperature"])
        rows = [z[f"emb_{k}"].astype(np.float64) for k in range(levels)]
        if f"scale_{0}" in z.files:
            rows = [r * z[f"scale_{k}"].astype(np.float64)[:, None] for k, r in enumerate(rows)]
        proj = z["projection"].astype(np.float64) if "projection" in z.files else None
        return rows, z["temperature"].astype(np.float64), proj


def brute_force(path, anc, emb):
    """(N, n_finest) float64 logit sums A(f) over the stored rows."""
    rows, temps, proj = stored_rows(path)
    y = unit(np.atleast_2d(np.asarray(emb, np.float32)).astype(np.float64))
    if proj is not None:
        y = y @ proj
    return sum(np.einsum("nd,md->nm", y, r)[:, anc[:, k]] / temps[k] for k, r in enumerate(rows))


def ref_topk(a, k):
    return np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in a])


def queries(rng, tables, n_near=6, n_random=4, noise=0.6):
    fin = tables[-1]
    near = fin[rng.choice(len(fin), n_near)]
    near = near + noise * rng.normal(size=near.shape) / np.sqrt(fin.shape[1])
    return np.concatenate([near, rng.normal(size=(n_random, fin.shape[1]))]).astype(np.float32)


@pytest.fixture(scope="module")
def hierarchy_file(tmp_path_factory, default_hierarchy):
    path = tmp_path_factory.mktemp("cells") / "cells.npz"
    default_hierarchy.save(path)
    return path


def _scorer(tmp_path, cells_path, tables, dtype, name="t", **kw):
    path = tmp_path / f"{name}-{dtype}.npz"
    save_cell_table(path, tables, np.full(len(tables), T, np.float32), dtype=dtype, **kw)
    return CellScorer.load(cells_path, path), path


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_search_equals_brute_force_on_the_default_hierarchy(tmp_path, hierarchy_file, default_hierarchy, dtype):
    rng = np.random.default_rng(0)
    tables = geo_like_tables(default_hierarchy, DIM, rng)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, dtype)
    emb = queries(rng, tables)
    a = brute_force(path, sc.ancestors, emb)
    r = sc.search(emb, k=5)  # a batch
    np.testing.assert_array_equal(r.indices, ref_topk(a, 5))
    # the logit sums of the top-k are exact (float64 sums of 7 terms of |.| < 15: 1e-11 is far above rounding)
    np.testing.assert_allclose(r.logit_sums, np.take_along_axis(a, r.indices, 1), rtol=0, atol=1e-11)
    # probabilities renormalised over the finest level are within the stated bound
    lse = np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
    true_lp = np.take_along_axis(a, r.indices, 1) - lse[:, None]
    assert (np.abs(r.log_probs - true_lp) <= r.log_norm_error[:, None]).all()
    assert (r.candidates >= 5).all() and (r.candidates < 0.05 * a.shape[1]).all()
    # one query at a time gives the same, and topk() is the same search
    for i in (0, len(emb) - 1):
        np.testing.assert_array_equal(sc.search(emb[i], k=5).indices[0], r.indices[i])
    np.testing.assert_array_equal(sc.topk(emb, 5)[0], r.indices)
    bad = emb[:3].copy()
    bad[1] = np.nan
    with pytest.raises(GeosurgeError, match=r"embedding\(s\) \[1\]"):
        sc.search(bad)


def test_bound_holds_for_every_cell(tmp_path, hierarchy_file, default_hierarchy):
    rng = np.random.default_rng(1)
    tables = geo_like_tables(default_hierarchy, DIM, rng)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, "float16")
    index = sc.prepare_search()
    if index is None:
        pytest.skip("this CPU's int8 kernel failed the exactness check: the search runs brute force")
    emb = queries(rng, tables, 4, 4)
    a = brute_force(path, sc.ancestors, emb)
    approx, ynorm, ry = index.approx(sc._query64(emb))
    for i in range(len(emb)):
        e, emax = index.bound(ynorm[i], ry[i])
        err = np.abs(a[i] - approx[i])
        assert (err <= e).all() and e.max() <= emax
        assert err.max() > 1e-3 * e.max()  # the approximation is not exact: the bound is what makes it safe


def test_near_ties_and_exact_ties(tmp_path, hierarchy_file, default_hierarchy):
    rng = np.random.default_rng(2)
    h = default_hierarchy
    anc = h.ancestors()
    tables = [t.astype(np.float64) for t in geo_like_tables(h, DIM, rng)]
    z = unit(rng.normal(size=DIM))
    prefix = sum((tables[k] @ z / T)[anc[:, k]] for k in range(h.num_levels - 1))
    target = (prefix + tables[-1] @ z / T).max() + 2.0
    # near ties: 12 finest cells whose logit sums sit 0 .. 2e-2 below a target above every other cell: far inside
    # the approximate pass's error bound, so only the exact re-scoring can order them
    chosen = rng.choice(np.flatnonzero(np.abs(target - prefix) < 0.9 / T), 12, replace=False)
    for f, g in zip(chosen, [0, 1e-9, 2e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]):
        cos = (target - g - prefix[f]) * T
        u = rng.normal(size=DIM)
        u = unit(u - (u @ z) * z)
        tables[-1][f] = cos * z + np.sqrt(1 - cos ** 2) * u
    sc, path = _scorer(tmp_path, hierarchy_file, [t.astype(np.float32) for t in tables], "float32", name="near")
    a = brute_force(path, sc.ancestors, z)
    r = sc.search(z, k=12)
    np.testing.assert_array_equal(r.indices, ref_topk(a, 12))
    assert set(r.indices[0]) == set(chosen.tolist()) and r.candidates[0] >= 12
    assert r.bound[0] > 2e-2  # the bound could not separate them
    # exact ties: siblings whose rows and ancestors' rows all equal the query share the top logit sum exactly
    par = h.level(-1).parent
    sib = np.flatnonzero(par == np.bincount(par).argmax())
    for k in range(h.num_levels):
        tables[k][anc[sib, k]] = z
    sc, path = _scorer(tmp_path, hierarchy_file, [t.astype(np.float32) for t in tables], "float16", name="tie")
    a = brute_force(path, sc.ancestors, z)
    r = sc.search(z, k=len(sib) + 2)
    np.testing.assert_array_equal(r.indices, ref_topk(a, len(sib) + 2))
    np.testing.assert_array_equal(r.indices[0, :len(sib)], np.sort(sib))  # tied: lower index first
    assert np.ptp(r.logit_sums[0, :len(sib)]) == 0


def test_pca_pruned_and_level_cut_tables(tmp_path, default_hierarchy):
    rng = np.random.default_rng(3)
    h = default_hierarchy
    full = geo_like_tables(h, DIM, rng)
    # a pruned hierarchy: the finest cells of some level-0 cells, ancestors closed; then a level cut
    keep0 = np.zeros(h.sizes[0], bool)
    keep0[rng.choice(h.sizes[0], h.sizes[0] // 3, replace=False)] = True
    masks = [keep0] + [np.zeros(n, bool) for n in h.sizes[1:]]
    for k in range(1, h.num_levels):
        masks[k] = masks[k - 1][h.level(k).parent]
    levels = [0, 2, 4, 5, 6]
    sub = h.subset(masks).select_levels(levels)
    sub.save(tmp_path / "cells.npz")
    tables = [full[k][masks[k]] for k in levels]
    outside = full[0][~keep0]
    d_pca = 32
    proj = np.linalg.qr(rng.normal(size=(DIM, d_pca)))[0].astype(np.float32)
    for dtype, p in (("float16", None), ("int8", proj), ("float32", proj)):
        t = tables if p is None else [x @ p for x in tables]
        o = outside if p is None else outside @ p
        sc, path = _scorer(tmp_path, tmp_path / "cells.npz", t, dtype, name=f"cut{p is None}", projection=p,
                           outside=o)
        emb = queries(rng, [full[-1]], 5, 3)
        a = brute_force(path, sc.ancestors, emb)
        r = sc.search(emb, k=5)
        np.testing.assert_array_equal(r.indices, ref_topk(a, 5))
        mass = sc.region_mass(emb)
        assert mass.shape == (len(emb),) and ((0 <= mass) & (mass <= 1)).all()


def test_search_falls_back_to_brute_force_without_an_exact_kernel(tmp_path, hierarchy_file, default_hierarchy,
                                                                   monkeypatch):
    rng = np.random.default_rng(4)
    tables = geo_like_tables(default_hierarchy, DIM, rng)
    monkeypatch.setattr(cellsearch, "_KERNEL_EXACT", False)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, "float16")
    assert sc.prepare_search() is None
    emb = queries(rng, tables, 2, 1)
    a = brute_force(path, sc.ancestors, emb)
    r = sc.search(emb, k=5)
    np.testing.assert_array_equal(r.indices, ref_topk(a, 5))
    assert (r.log_norm_error == 0).all() and (r.candidates == a.shape[1]).all()


def test_the_kernel_check_catches_a_wrong_kernel(monkeypatch):
    """kernel_is_exact compares the ONNX Runtime product with numpy's on saturating probes: a kernel that rounds
    (here: a session whose output is perturbed) is refused."""
    real = cellsearch._session

    class Off:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            out = self.sess.run(names, feed)
            out[0] = out[0] + 1
            return out

    monkeypatch.setattr(cellsearch, "_KERNEL_EXACT", None)
    monkeypatch.setattr(cellsearch, "_session", lambda model, table: Off(real(model, table)))
    assert cellsearch.kernel_is_exact() is False
    monkeypatch.setattr(cellsearch, "_KERNEL_EXACT", None)
    monkeypatch.setattr(cellsearch, "_session", real)
    cellsearch.kernel_is_exact()  # leave the process with the real answer cached


def test_memory_holds_no_fp32_copy_of_the_table(tmp_path, hierarchy_file, default_hierarchy):
    rng = np.random.default_rng(5)
    dim = 128
    tables = geo_like_tables(default_hierarchy, dim, rng)
    path = tmp_path / "t.npz"
    save_cell_table(path, tables, np.full(len(tables), T, np.float32), dtype="float16")
    fp32_bytes = sum(t.nbytes for t in tables)
    emb = queries(rng, tables, 4, 4)
    for mmap_rows in (True, False):
        tracemalloc.start()  # numpy reports its array allocations to tracemalloc
        sc = CellScorer.load(hierarchy_file, path, mmap_rows=mmap_rows)
        loaded = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        sc.prepare_search()
        sc.search(emb, k=5)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sc.table_dtype == "float16" and sc.table_bytes == fp32_bytes // 2
        del sc
        # An FP32 copy of the table would hold fp32_bytes (23.6 MB here). Loaded: the hierarchy (~5 MB) plus, when
        # not memory-mapped, the fp16 rows (half of fp32_bytes). The search's working memory: the int8 path table
        # (n_finest x dim = 2.3 MB, handed to ONNX Runtime) and float64 chunk buffers (128 x dim x 8 x ~6 = 0.8 MB).
        assert loaded < (0.5 if not mmap_rows else 0) * fp32_bytes + 0.25 * fp32_bytes, (mmap_rows, loaded)
        assert peak - loaded < 0.3 * fp32_bytes, (mmap_rows, peak - loaded)
        assert held - loaded < 0.1 * fp32_bytes, (mmap_rows, held - loaded)


def test_uncertainty_radius_equals_sorting_every_cell(tmp_path, hierarchy_file, default_hierarchy):
    from geosurge.geo import haversine_km

    rng = np.random.default_rng(6)
    sc, _ = _scorer(tmp_path, hierarchy_file, geo_like_tables(default_hierarchy, 8, rng), "float16")
    n = sc.rep_lat.size
    for trial in range(6):
        p = rng.dirichlet(np.full(n, 0.05 if trial % 2 else 1.0))
        best = int(rng.integers(n))
        lat, lon = float(sc.rep_lat[best]), float(sc.rep_lon[best])
        d = haversine_km(lat, lon, sc.rep_lat, sc.rep_lon)
        order = np.argsort(d, kind="stable")
        cum = np.cumsum(p[order])
        for mass in (0.5, 0.68, 0.95):
            want = float(d[order][min(np.searchsorted(cum, mass), n - 1)])
            assert sc.uncertainty_km(p, lat, lon, mass=mass) == pytest.approx(want, abs=1e-6)
        sub = np.sort(rng.choice(n, 500, replace=False))
        ps = p[sub] / p[sub].sum()
        ds = haversine_km(lat, lon, sc.rep_lat[sub], sc.rep_lon[sub])
        o = np.argsort(ds, kind="stable")
        want = float(ds[o][min(np.searchsorted(np.cumsum(ps[o]), 0.68), sub.size - 1)])
        assert sc.uncertainty_km(ps, lat, lon, cells=sub) == pytest.approx(want, abs=1e-6)


def test_tables_view_gives_float32_levels_without_keeping_them(tmp_path, hierarchy_file, default_hierarchy):
    rng = np.random.default_rng(7)
    tables = geo_like_tables(default_hierarchy, 16, rng)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, "int8")
    rows, _, _ = stored_rows(path)
    assert len(sc.tables) == sc.num_levels
    for k in (0, sc.num_levels - 1):
        t = sc.tables[k]
        assert t.dtype == np.float32 and t.shape == tables[k].shape
        np.testing.assert_allclose(t, rows[k], rtol=1e-6)
    assert sc.tables[0] is not sc.tables[0]  # converted on access, never cached


def test_onnx_writer_makes_a_valid_model():
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    w = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    m = onnxgraph.model(
        [onnxgraph.node("MatMulInteger", ["q", "w", "zp"], ["acc"]), onnxgraph.node("Cast", ["acc"], ["f"], to=1),
         onnxgraph.node("ReduceSum", ["f", "axes"], ["s"], keepdims=0)],
        [onnxgraph.value_info("q", np.uint8, ["rows", 3])], [onnxgraph.value_info("s", np.float32, ["rows"])],
        [onnxgraph.tensor("w", w), onnxgraph.tensor("zp", np.array(64, np.uint8)),
         onnxgraph.tensor("axes", np.array([-1], np.int64))])
    onnx.checker.check_model(onnx.load_from_string(m), full_check=True)
    q = np.array([[65, 66, 64], [1, 127, 70]], np.uint8)
    got = ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"q": q})[0]
    np.testing.assert_array_equal(got, ((q.astype(np.int64) - 64) @ w).sum(1))


def test_query_quantization_is_an_exact_decomposition():
    rng = np.random.default_rng(8)
    y = np.concatenate([rng.normal(size=(5, 64)), np.zeros((1, 64))])
    a, s, ry = cellsearch.quantize_query(y)
    p1 = a[0::2].astype(np.int64) - 64
    p2 = a[1::2].astype(np.int64) - 64
    assert np.abs(p1).max() <= 63 and np.abs(p2).max() <= 63 and a.min() >= 1 and a.max() <= 127
    r = y - s[:, None] * (126 * p1 + p2)
    assert (np.abs(r) <= s[:, None] / 2 * (1 + 1e-12)).all()
    np.testing.assert_allclose(ry, np.linalg.norm(r, axis=1), rtol=1e-12)


def test_model_session_threads_do_not_spin(tmp_path):
    """One owner of threads: the model session's workers sleep between calls (see
    geosurge.runtime.backends.onnxruntime.SPINNING); an explicit choice is honoured."""
    from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    path = tmp_path / "id.onnx"
    path.write_bytes(onnxgraph.model([onnxgraph.node("Identity", ["x"], ["y"])],
                                     [onnxgraph.value_info("x", np.float32, [1, 3])],
                                     [onnxgraph.value_info("y", np.float32, [1, 3])]))
    key = "session.intra_op.allow_spinning"
    with OnnxRuntimeRunner(path, threads=2) as default:
        assert default.session.get_session_options().get_session_config_entry(key) == "0"
    with OnnxRuntimeRunner(path, threads=2, spinning=True) as spin:
        assert spin.session.get_session_options().get_session_config_entry(key) == "1"
        assert spin.session.get_session_options().intra_op_num_threads == 2  # threads still honoured
        np.testing.assert_array_equal(spin.infer({"x": np.ones((1, 3))})["y"], np.ones((1, 3)))


def test_model_session_has_no_memory_pattern(tmp_path, monkeypatch):
    """The model session runs without ONNX Runtime's memory pattern (MEM_PATTERN, ~2 MB less resident); None keeps
    ONNX Runtime's default (on)."""
    from geosurge.runtime.backends import onnxruntime as ortb

    path = tmp_path / "id.onnx"
    path.write_bytes(onnxgraph.model([onnxgraph.node("Identity", ["x"], ["y"])],
                                     [onnxgraph.value_info("x", np.float32, [1, 3])],
                                     [onnxgraph.value_info("y", np.float32, [1, 3])]))
    with ortb.OnnxRuntimeRunner(path) as r:
        assert r.session.get_session_options().enable_mem_pattern is False
        np.testing.assert_array_equal(r.infer({"x": np.ones((1, 3))})["y"], np.ones((1, 3)))
    monkeypatch.setattr(ortb, "MEM_PATTERN", None)
    with ortb.OnnxRuntimeRunner(path) as r:
        assert r.session.get_session_options().enable_mem_pattern is True


def test_path_index_does_not_depend_on_the_chunk_size(tmp_path, hierarchy_file, default_hierarchy):
    """The index is built per finest cell, so any chunking gives the same quantized table and bound terms (the
    default chunk is small to keep the build's peak memory low)."""
    rng = np.random.default_rng(11)
    tables = geo_like_tables(default_hierarchy, 48, rng)
    sc, _ = _scorer(tmp_path, hierarchy_file, tables, "float16")
    ref = cellsearch.PathIndex(sc._rows_f64, sc.ancestors, sc.temperatures, sc.dim, chunk=sc.ancestors.shape[0])
    y = unit(rng.normal(size=(3, sc.dim)))
    for chunk in (None, 7):
        kw = {} if chunk is None else {"chunk": chunk}
        idx = cellsearch.PathIndex(sc._rows_f64, sc.ancestors, sc.temperatures, sc.dim, **kw)
        for name in ("scale", "resid_norm", "quant_norm"):
            np.testing.assert_array_equal(getattr(idx, name), getattr(ref, name), err_msg=f"{name}, chunk {chunk}")
        np.testing.assert_array_equal(idx.products(y)[0], ref.products(y)[0])  # the same int8 table inside ORT


def test_cell_tokens_are_the_hierarchy_tokens(tmp_path, hierarchy_file, default_hierarchy):
    """CellScorer.tokens makes each token from its cell id when asked; equal to the hierarchy's eager list."""
    from geosurge.runtime.cells import CellTokens

    rng = np.random.default_rng(12)
    sc, _ = _scorer(tmp_path, hierarchy_file, geo_like_tables(default_hierarchy, 16, rng), "float16")
    want = default_hierarchy.level(-1).tokens
    assert isinstance(sc.tokens, CellTokens) and len(sc.tokens) == len(want)
    assert list(sc.tokens) == want
    idx = rng.choice(len(want), 20)
    assert sc.tokens[idx] == [want[i] for i in idx]
    assert sc.tokens[np.int64(3)] == want[3] and sc.tokens[-1] == want[-1] and sc.tokens[5:9] == want[5:9]
    with pytest.raises(IndexError):
        sc.tokens[len(want)]


def test_search_on_several_threads_and_large_k(tmp_path, hierarchy_file, default_hierarchy):
    """Each thread gets its own preallocated buffers and ONNX Runtime I/O binding: concurrent searches return what
    one thread does; a k beyond the re-scoring step (and beyond the candidates) is still exact."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    tables = geo_like_tables(default_hierarchy, DIM, rng)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, "float16")
    emb = queries(rng, tables, 6, 2)
    a = brute_force(path, sc.ancestors, emb)
    want = ref_topk(a, 5)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: sc.search(emb[i % len(emb)], k=5).indices[0], range(4 * len(emb))))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, want[i % len(emb)])
    r = sc.search(emb[:2], k=40)
    np.testing.assert_array_equal(r.indices, ref_topk(a[:2], 40))
    assert (r.candidates >= 40).all()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_rows_read_with_pread_equal_the_mapped_rows(tmp_path, hierarchy_file, default_hierarchy, dtype, monkeypatch):
    """The exact search reads the rows it re-scores from the file (RowReader) instead of the memory map: the same
    bytes, so the same search results to the last bit (whether the pages stay unmapped is the kernel's; the RSS
    figure is measured in benchmarks/runtime_rss.py, not here)."""
    from geosurge.runtime import cells

    rng = np.random.default_rng(3)
    tables = geo_like_tables(default_hierarchy, DIM, rng)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, dtype)
    assert sc._reader is not None
    monkeypatch.setattr(cells, "READ_ROWS", "mmap")
    mapped = CellScorer.load(hierarchy_file, path)
    assert mapped._reader is None
    # any rows, repeated, consecutive and at level boundaries, in any order
    n = [len(t) for t in tables]
    idx = np.stack([rng.integers(0, n_k, 40) for n_k in n])
    idx[:, :3] = 0
    idx[:, 3:6] = np.array(n)[:, None] - 1
    idx[:, 6:12] = np.minimum(np.arange(6) + 5, np.array(n)[:, None] - 1)
    got = sc._reader.gather(idx)
    want = np.stack([mapped._rows[k][idx[k]] for k in range(len(n))])
    assert got.dtype == want.dtype and np.array_equal(got, want)
    has_preadv = cells._PREADV
    monkeypatch.setattr(cells, "_PREADV", False)  # an OS without preadv: pread, then a copy
    assert np.array_equal(sc._reader.gather(idx), want)
    monkeypatch.setattr(cells, "_PREADV", has_preadv)
    emb = queries(rng, tables)
    a, b = sc.search(emb, k=5, with_scores=True), mapped.search(emb, k=5, with_scores=True)
    for f in ("indices", "logit_sums", "log_probs", "log_norm", "scores"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_search_bounds_benchmark_counts_on_a_geo_like_table(tmp_path, hierarchy_file, default_hierarchy):
    """benchmarks/search_bounds.py: the path embeddings it (and the index) build give brute force's scores; its
    bounds hold for every layout; a 4-bit or PCA-projected table needs more candidates than the runtime's int8 one;
    candidates and re-scored cells are ordered as defined (k <= re-scored <= candidates)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_search_bounds", Path(__file__).resolve().parents[1] / "benchmarks" / "search_bounds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(5)
    tables = geo_like_tables(default_hierarchy, DIM, rng)
    sc, path = _scorer(tmp_path, hierarchy_file, tables, "float16")
    w = cellsearch.path_embeddings(sc._rows_f64, sc.ancestors, 1.0 / sc.temperatures.astype(np.float64), sc.dim)
    emb = queries(rng, tables, 8, 2)
    y = sc._query64(emb)
    np.testing.assert_allclose(y @ w.T, brute_force(path, sc.ancestors, emb), rtol=1e-12, atol=1e-9)
    got = {name: bench.counts(w, y, rows, proj, 5) for name, _, rows, proj in bench.layouts(w, [16, 32])}
    assert list(got) == ["int8 / row", "int8 / 32", "int4 / row", "int4 / 32", "PCA 16 + int8 / row",
                         "PCA 32 + int8 / row"]
    for c in got.values():
        assert all(5 <= r <= m for r, m in zip(c["rescored_p50_p95_max"], c["candidates_p50_p95_max"]))
    base = got["int8 / row"]["candidates_p50_p95_max"][0]
    assert got["int4 / row"]["candidates_p50_p95_max"][0] > 2 * base
    assert got["PCA 16 + int8 / row"]["candidates_p50_p95_max"][0] > 2 * base


def test_search_stage_marks_change_nothing(tmp_path, hierarchy_file, default_hierarchy):
    """``search_one(marks=...)`` (the benchmark's stage timing) appends one non-decreasing time per stage and
    returns exactly what the unmarked search returns."""
    rng = np.random.default_rng(5)
    tables = geo_like_tables(default_hierarchy, 48, rng)
    sc, _ = _scorer(tmp_path, hierarchy_file, tables, "float16")
    idx = sc.prepare_search()
    y = sc._query64(unit(rng.normal(size=(1, 48))))[0]
    exact = lambda cells: sc._exact_sums(y, cells)  # noqa: E731
    plain = idx.search_one(y, 5, exact)
    marks = []
    marked = idx.search_one(y, 5, exact, marks=marks)
    assert len(marks) == len(cellsearch.STAGES) and marks == sorted(marks)
    np.testing.assert_array_equal(marked.indices, plain.indices)
    np.testing.assert_array_equal(marked.logit_sums, plain.logit_sums)
    assert marked.log_norm == plain.log_norm and marked.rescored == plain.rescored
