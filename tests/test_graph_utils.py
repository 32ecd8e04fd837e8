"""graph_utils against scipy / numpy references, with the edge cases of the k-NN graphs of the diffusion."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

import graph_utils as gu

needs_mkl = pytest.mark.skipif(not gu.has_mkl(), reason="graph_utils built without MKL (has_mkl() is False)")
MKL = pytest.param("mkl", marks=needs_mkl)
NO_MKL = "graph_utils was built without MKL"


def random_csr(nrow, ncol, density, rs, empty_rows=(), sorted_rows=True):
    """Random scipy CSR (float32) with some rows forced empty; unsorted rows when not sorted_rows."""
    m = sp.random(nrow, ncol, density=density, random_state=rs, format="lil", dtype=np.float32)
    for r in empty_rows:
        m.rows[r] = []
        m.data[r] = []
    m = m.tocsr()
    m.data = (m.data + 0.1).astype(np.float32)
    if not sorted_rows:
        for r in range(nrow):
            s = slice(m.indptr[r], m.indptr[r + 1])
            p = rs.permutation(m.indptr[r + 1] - m.indptr[r])
            m.indices[s] = m.indices[s][p]
            m.data[s] = m.data[s][p]
    return m


def knn_table(n, k, rs, ncol=None, missing=0.1, dtype=np.int64):
    I = rs.randint(0, ncol or n, size=(n, k)).astype(dtype)
    I[rs.rand(n, k) < missing] = -1
    return I


def dense(A):
    return A.to_scipy().toarray()


def assert_valid(A, sorted_rows=False):
    """The CSR invariants, in numpy: offsets from 0 to nnz, non-decreasing; ids in range; with
    sorted_rows, ids strictly increasing within each row."""
    n, m = A.shape
    assert A.indptr[0] == 0 and A.indptr[-1] == A.nnz and (np.diff(A.indptr) >= 0).all()
    assert A.nnz == 0 or (A.indices.min() >= 0 and A.indices.max() < m)
    if sorted_rows:
        rows = np.repeat(np.arange(n), np.diff(A.indptr))
        same_row = rows[1:] == rows[:-1]
        assert (np.diff(A.indices.astype(np.int64))[same_row] > 0).all()


def assert_same_csr(A, ref, sorted_rows=True):
    """A (graph_utils.CSR) equals the scipy matrix ref entry for entry (same structure when sorted)."""
    ref = ref.tocsr()
    ref.sum_duplicates()
    assert A.shape == ref.shape
    assert_valid(A, sorted_rows)
    np.testing.assert_array_equal(A.indptr, ref.indptr)
    np.testing.assert_array_equal(A.indices, ref.indices)
    np.testing.assert_allclose(A.data, ref.data, rtol=1e-6)


# ---------------------------------------------------------------- CSR container and construction

def test_csr_roundtrip_and_checks():
    rs = np.random.RandomState(0)
    m = random_csr(50, 30, 0.2, rs, empty_rows=[0, 7, 49])
    A = gu.CSR.from_scipy(m)
    assert A.indptr.dtype == np.int64 and A.indices.dtype == np.int32 and A.data.dtype == np.float32
    assert A.nnz == m.nnz and A.shape == (50, 30)
    np.testing.assert_array_equal(dense(A), m.toarray())
    bad = A.indices.copy()
    bad[5] = 30
    with pytest.raises(ValueError, match="out of range"):
        gu.CSR(A.indptr, bad, A.data, A.shape)
    indptr = A.indptr.copy()
    indptr[3] = indptr[4] + 1
    with pytest.raises(ValueError, match="indptr decreases"):
        gu.CSR(indptr, A.indices, A.data, A.shape)
    with pytest.raises(ValueError, match="nrows"):
        gu.CSR(A.indptr[:-1], A.indices, A.data, A.shape)
    with pytest.raises(TypeError, match="integer"):
        gu.CSR(A.indptr.astype(np.float64), A.indices, A.data, A.shape)
    assert_valid(gu.CSR.from_scipy(random_csr(20, 40, 0.3, rs, sorted_rows=False)))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_csr_from_knn(dtype):
    rs = np.random.RandomState(1)
    n, k, ncol = 300, 7, 120
    I = knn_table(n, k, rs, ncol=ncol, dtype=dtype)
    I[:, 3] = I[:, 2]  # duplicate ids within rows
    I[5] = -1          # an empty row
    V = rs.rand(n, k).astype(np.float32)
    mask = I >= 0
    rows = np.repeat(np.arange(n), k).reshape(n, k)[mask]
    for values in None, V:
        A = gu.csr_from_knn(I, ncol, values)
        vals = np.ones(mask.sum(), np.float32) if values is None else V[mask]
        # entries in table order, duplicates kept: compare structure row by row, then values summed
        np.testing.assert_array_equal(A.indices, I[mask])
        np.testing.assert_array_equal(np.diff(A.indptr), mask.sum(1))
        np.testing.assert_allclose(dense(A), sp.coo_matrix((vals, (rows, I[mask])), shape=(n, ncol)).toarray())
    # row-strided view of a wider table
    wide = np.concatenate([I, I[:, :3]], axis=1)
    A2 = gu.csr_from_knn(wide[:, :k], ncol)
    np.testing.assert_array_equal(A2.indices, I[mask])
    I[4, 1] = ncol
    with pytest.raises(ValueError, match=r"I\[4, 1\]"):
        gu.csr_from_knn(I, ncol)
    I[4, 1] = -2
    with pytest.raises(ValueError, match="neither -1"):
        gu.csr_from_knn(I, ncol)
    with pytest.raises(TypeError, match="dtype"):
        gu.csr_from_knn(I.astype(np.float32), ncol)


# ---------------------------------------------------------------- structural operations

def test_transpose_rectangular_and_empty():
    rs = np.random.RandomState(2)
    for shape in (137, 61), (40, 300), (0, 5), (5, 0):
        m = random_csr(*shape, 0.1, rs, empty_rows=[0] if shape[0] else [])
        A = gu.transpose(gu.CSR.from_scipy(m))
        assert_same_csr(A, m.T)


def test_transpose_many_threads_per_column():
    # more entries than columns: several private count arrays (one per thread) are merged
    rs = np.random.RandomState(3)
    m = random_csr(3000, 5, 0.6, rs)
    assert_same_csr(gu.transpose(gu.CSR.from_scipy(m)), m.T)


def test_sort_rows_stable_with_duplicates():
    rs = np.random.RandomState(4)
    n, k = 200, 90  # rows longer than the insertion-sort cutoff too
    I = rs.randint(0, 30, size=(n, k))
    V = rs.rand(n, k).astype(np.float32)
    A = gu.sort_rows(gu.csr_from_knn(I, 30, V))
    order = np.argsort(I, axis=1, kind="stable")
    np.testing.assert_array_equal(A.indices.reshape(n, k), np.take_along_axis(I, order, 1))
    np.testing.assert_array_equal(A.data.reshape(n, k), np.take_along_axis(V, order, 1))
    assert_valid(A)


def test_col_normalize():
    rs = np.random.RandomState(8)
    X = rs.rand(333, 17).astype(np.float32)
    X[:, 4] = 0
    ref = X / np.where(X.sum(0) == 0, 1, X.sum(0))
    Y = gu.col_normalize(X)
    assert Y is X
    np.testing.assert_allclose(X, ref, rtol=1e-6)
    np.testing.assert_allclose(X.sum(0)[np.arange(17) != 4], 1, rtol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous"):
        gu.col_normalize(np.asfortranarray(X))
    with pytest.raises(TypeError, match="float32"):
        gu.col_normalize(X.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_knn_to_graph(dtype):
    rs = np.random.RandomState(9)
    n, k = 1000, 12
    I = knn_table(n, k, rs, dtype=dtype)
    I[:, 1] = I[:, 0]        # duplicates counted once
    I[7] = -1                # a node with no neighbour of its own (may still be someone's neighbour)
    I[8, 0] = 8              # a self-loop
    W = gu.knn_to_graph(I, n)
    mask = I >= 0
    rows = np.repeat(np.arange(n), k).reshape(n, k)[mask]
    W0 = sp.csr_matrix((np.ones(mask.sum(), np.float32), (rows, I[mask])), shape=(n, n))
    W0.sum_duplicates()
    W0.data[:] = 1
    ref = W0 + W0.T
    ref = sp.diags(1 / np.maximum(np.asarray(ref.sum(1)).ravel(), 1e-30)) @ ref
    assert_same_csr(W, ref)
    with pytest.raises(ValueError, match="node id"):
        bad = I.copy()
        bad[3, 3] = n
        gu.knn_to_graph(bad, n)


# ---------------------------------------------------------------- sparse x dense

def graph_for_spmm(n, ncol, rs, k=9):
    I = knn_table(n, k, rs, ncol=ncol, missing=0.2)
    I[::17] = -1  # empty rows
    return gu.csr_from_knn(I, ncol, rs.rand(n, k).astype(np.float32))


@pytest.mark.parametrize("kernel", ["hand", MKL, None])
@pytest.mark.parametrize("C", [1, 3, 37, 100])
def test_spmm(kernel, C):
    rs = np.random.RandomState(C)
    A = graph_for_spmm(1001, 733, rs)  # rectangular, nrows not a multiple of anything
    X = rs.randn(733, C).astype(np.float32)
    ref = A.to_scipy().astype(np.float64) @ X.astype(np.float64)
    Y = gu.spmm(A, X, kernel=kernel)
    assert Y.shape == (1001, C) and Y.dtype == np.float32
    assert np.linalg.norm(Y - ref) / np.linalg.norm(ref) < 1e-6
    np.testing.assert_array_equal(Y[::17], 0)
    out = np.full((1001, C), np.nan, np.float32)  # garbage in out must not leak into the result
    assert gu.spmm(A, X, out=out, kernel=kernel) is out
    np.testing.assert_allclose(out, Y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ncol", [1, 7, 507])
def test_spgemm(ncol):
    """A @ B for CSR matrices against scipy in float64: empty rows on both sides, unsorted rows of A,
    rows of the result sorted; shapes must agree."""
    rs = np.random.RandomState(ncol)
    A = graph_for_spmm(1001, 733, rs)                   # empty rows, -1 entries skipped
    Bs = sp.random(733, ncol, density=min(1.0, 3.0 / ncol), random_state=rs, format="csr", dtype=np.float32)
    Bs = sp.diags((np.arange(733) % 5 != 0).astype(np.float32)) @ Bs     # every fifth row of B empty
    Bs.eliminate_zeros()
    B = gu.CSR.from_scipy(Bs.tocsr())
    P = gu.spgemm(A, B)
    ref = (A.to_scipy().astype(np.float64) @ Bs.astype(np.float64)).toarray()
    assert P.shape == (1001, ncol)
    np.testing.assert_allclose(P.to_scipy().toarray(), ref, rtol=1e-6, atol=1e-7)
    for r in range(P.shape[0]):                          # sorted, no duplicate columns
        cols = P.indices[P.indptr[r]:P.indptr[r + 1]]
        assert np.all(np.diff(cols) > 0)
    assert P.nnz == np.count_nonzero((np.abs(A.to_scipy()) @ np.abs(Bs)).toarray())
    with pytest.raises(ValueError, match="A has 733 columns but B has 1001 rows"):
        gu.spgemm(A, A)


@needs_mkl
def test_mkl_row_blocks():
    # blocks of at most 50 entries: every block after the first has absolute offsets beyond what one
    # block may hold, as 2^31 would at full size; each block must be rebased to start at 0
    rs = np.random.RandomState(11)
    A = graph_for_spmm(997, 997, rs)
    X = rs.randn(997, 20).astype(np.float32)
    ref = A.to_scipy() @ X
    plan = gu.MklSpmm(A, 20, max_block_nnz=50)
    assert plan.nblocks > A.nnz // 50
    for _ in range(2):  # the plan is reusable
        Y = plan(X)
        assert np.linalg.norm(Y - ref) / np.linalg.norm(ref) < 1e-6
    with pytest.raises(ValueError, match="more than a row block holds"):
        gu.MklSpmm(A, 20, max_block_nnz=3)
    with pytest.raises(ValueError, match="X has shape"):
        plan(X[:, :10].copy())


def test_spmm_rejects_bad_inputs():
    rs = np.random.RandomState(12)
    A = graph_for_spmm(100, 80, rs)
    X = rs.rand(80, 10).astype(np.float32)
    with pytest.raises(TypeError, match="float32"):
        gu.spmm(A, X.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        gu.spmm(A, np.asfortranarray(X))
    with pytest.raises(ValueError, match="C-contiguous"):
        gu.spmm(A, rs.rand(80, 20).astype(np.float32)[:, ::2])
    with pytest.raises(ValueError, match="rows"):
        gu.spmm(A, X[:50])
    with pytest.raises(ValueError, match="out has shape"):
        gu.spmm(A, X, out=np.empty((100, 11), np.float32))
    with pytest.raises(ValueError, match="kernel"):
        gu.spmm(A, X, kernel="cuda")
    with pytest.raises(TypeError, match="graph_utils.CSR"):
        gu.spmm(A.to_scipy(), X)
    # a corrupt matrix built without the check is caught by the kernel instead of reading out of bounds
    bad = A.indices.copy()
    bad[10] = 10**6
    B = gu.CSR(A.indptr, bad, A.data, A.shape, check=False)
    with pytest.raises(ValueError, match="out of range"):
        gu.spmm(B, X, kernel="hand")
    if gu.has_mkl():
        with pytest.raises(ValueError, match="out of range"):
            gu.spmm(B, X, kernel="mkl")


def test_has_mkl_is_what_the_module_loads():
    """has_mkl() against the libraries a fresh process maps after importing graph_utils alone (Linux)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    code = "import graph_utils; print(any('libmkl_core' in l for l in open('/proc/self/maps')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(gu.has_mkl())


@pytest.mark.skipif(gu.has_mkl(), reason="graph_utils built with MKL")
def test_without_mkl_the_mkl_kernels_say_so():
    rs = np.random.RandomState(16)
    A = graph_for_spmm(100, 80, rs)
    X = rs.rand(80, 10).astype(np.float32)
    with pytest.raises(RuntimeError, match=NO_MKL + ": spmm"):
        gu.spmm(A, X, kernel="mkl")
    with pytest.raises(RuntimeError, match=NO_MKL + ": MklSpmm"):
        gu.MklSpmm(A, 10)
    with pytest.raises(RuntimeError, match=NO_MKL):       # the C++ class itself, under the wrapper
        gu.graph_utils_swig.MklPlan(*A._args(), 10, 100, 1)
    with pytest.raises(RuntimeError, match=NO_MKL + ": KnnScan"):
        gu.KnnScan(X, 4, bf16=False, kernel="mkl")
    assert gu.DEFAULT_KERNEL == "hand" and gu.DEFAULT_SCAN_KERNEL == "hand"
    np.testing.assert_allclose(gu.spmm(A, X), A.to_scipy() @ X, rtol=1e-5, atol=1e-6)


def test_spmm_threads_release_gil():
    # concurrent calls from Python threads give the same results as serial ones, and while a call
    # runs in C++ another Python thread makes progress (the GIL is released)
    rs = np.random.RandomState(13)
    A = graph_for_spmm(3000, 3000, rs, k=20)
    Xs = [rs.rand(3000, 50).astype(np.float32) for _ in range(4)]
    ref = [gu.spmm(A, X) for X in Xs]
    res = [None] * 4

    def work(i):
        res[i] = gu.spmm(A, Xs[i], kernel="hand" if i % 2 or not gu.has_mkl() else "mkl")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r, e in zip(res, ref):
        np.testing.assert_allclose(r, e, rtol=1e-5, atol=1e-6)
    # while a long product runs in another thread, this one keeps running: the longest pause between
    # two of its steps is far shorter than the call (with the GIL held, it would last the whole call)
    big = graph_for_spmm(200000, 200000, rs, k=20)
    Xb = rs.rand(200000, 256).astype(np.float32)
    for kernel in ("hand", "mkl") if gu.has_mkl() else ("hand",):
        t0 = time.perf_counter()
        gu.spmm(big, Xb, kernel=kernel)
        alone = time.perf_counter() - t0
        assert alone > 0.02, alone
        t = threading.Thread(target=gu.spmm, args=(big, Xb), kwargs={"kernel": kernel})
        stamps = [time.perf_counter()]      # start() itself may wait for the GIL
        t.start()
        while t.is_alive():
            stamps.append(time.perf_counter())
        stamps.append(time.perf_counter())
        t.join()
        longest = max(np.diff(stamps))
        assert len(stamps) > 1000 and longest < alone / 2, (kernel, len(stamps), longest, alone)


# ---------------------------------------------------------------- k-best table merge

def merge_reference(D, I, D2, I2, translation):
    k = D.shape[1]
    I2t = np.where(I2 < 0, -1, I2 + translation).astype(I.dtype)
    Dc = np.concatenate([D, D2], axis=1)
    Ic = np.concatenate([I, I2t], axis=1)
    o = np.argsort(-Dc, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(Dc, o, 1), np.take_along_axis(Ic, o, 1)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_merge_knn_results(dtype):
    rs = np.random.RandomState(14)
    n, k, k2 = 500, 10, 6
    # coarse values make many ties, between and within tables
    D = -np.sort(-rs.randint(0, 8, size=(n, k)), axis=1).astype(np.float32)
    D2 = -np.sort(-rs.randint(0, 8, size=(n, k2)), axis=1).astype(np.float32)
    I = rs.randint(0, 1000, size=(n, k)).astype(dtype)
    I2 = rs.randint(0, 1000, size=(n, k2)).astype(dtype)
    D2[:, -2:] = -np.inf
    I2[:, -2:] = -1  # missing results stay -1, not translated
    refD, refI = merge_reference(D, I, D2, I2, 5000)
    # row-strided views: columns 2..2+k of wider tables
    bigD = np.zeros((n, k + 5), np.float32)
    bigI = np.zeros((n, k + 5), dtype)
    bigD[:, 2:2 + k] = D
    bigI[:, 2:2 + k] = I
    gu.merge_knn_results(bigD[:, 2:2 + k], bigI[:, 2:2 + k], D2, I2, 5000)
    np.testing.assert_array_equal(bigD[:, 2:2 + k], refD)
    np.testing.assert_array_equal(bigI[:, 2:2 + k], refI)
    np.testing.assert_array_equal(bigD[:, :2], 0)
    assert (bigI[:, 2:2 + k] >= -1).all()


def test_merge_knn_results_rejects_unsorted():
    rs = np.random.RandomState(15)
    D = -np.sort(-rs.rand(20, 5), axis=1).astype(np.float32)
    I = rs.randint(0, 9, size=(20, 5)).astype(np.int64)
    D2 = D[:, ::-1].copy()  # increasing
    D0, I0 = D.copy(), I.copy()
    with pytest.raises(ValueError, match="row 0 of D2 is not sorted"):
        gu.merge_knn_results(D, I, D2, I.copy(), 0)
    np.testing.assert_array_equal(D, D0)
    np.testing.assert_array_equal(I, I0)
    with pytest.raises(TypeError, match="dtype"):
        gu.merge_knn_results(D, I, D.copy(), I.astype(np.int32), 0)
    with pytest.raises(ValueError, match="contiguous rows"):
        gu.merge_knn_results(D, I, D.copy(), np.asfortranarray(I), 0)


def test_import_with_faiss_and_torch():
    # three OpenMP users in one process (torch, faiss, graph_utils/MKL), in an order where ours loads last
    code = ("import torch, faiss, numpy as np, graph_utils as gu; "
            "A = gu.knn_to_graph(np.random.randint(0, 500, (500, 5)), 500); "
            "X = np.random.rand(500, 20).astype(np.float32); "
            "assert not gu.has_mkl() or np.allclose(gu.spmm(A, X, kernel='mkl'), A.to_scipy() @ X, atol=1e-5); "
            "assert np.allclose(gu.spmm(A, X, kernel='hand'), A.to_scipy() @ X, atol=1e-5); "
            "i = faiss.IndexFlatL2(8); i.add(np.random.rand(100, 8).astype('float32')); "
            "t = torch.randn(200, 200); "
            "print('ok', np.allclose((t @ t).numpy(), t.numpy() @ t.numpy(), atol=1e-3))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "True"], r.stdout
