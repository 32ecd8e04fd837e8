"""graph_utils: sparse k-NN graphs (CSR) and the sparse x dense product of the diffusion, in C++/OpenMP.

Numpy arrays in, numpy arrays out. A graph is a :class:`CSR` holding ``indptr`` (int64, nrows + 1),
``indices`` (int32 column ids) and ``data`` (float32), for matrices with fewer than 2^31 columns.
The C++ module is built by ``pip install .`` / ``pip install -e .`` (setup.py; ``bash setup.bash``
does it in ``.venv``). MKL is optional (:func:`has_mkl`): without it the hand-written kernels do all
the work, and :class:`MklSpmm` / ``spmm(kernel="mkl")`` raise RuntimeError.

Every function checks dtypes, shapes and contiguity here and raises TypeError / ValueError with the
argument's name; errors found in C++ (invalid ids, unsorted rows, MKL status codes) come back as
ValueError (bad input) or RuntimeError (MKL failure). Long calls release the GIL and use
``omp_get_max_threads()`` OpenMP threads (set ``OMP_NUM_THREADS`` to change it).
"""
import numpy as np

try:
    from . import graph_utils_swig as _gu
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError("graph_utils C++ module not built or not loadable (%s): install the project with "
                      "pip install -e . (or bash setup.bash)" % e)

__all__ = ["CSR", "csr_from_knn", "transpose", "spgemm", "sort_rows", "knn_to_graph", "col_normalize", "spmm", "MklSpmm",
           "merge_knn_results", "locality_order", "permute", "permute_columns", "inverse_permutation", "max_threads",
           "has_mkl", "cpu_has_bf16", "to_bf16", "KnnScan"]

_INT32_MAX = 2**31 - 1
#: MKL's LP64 sparse BLAS takes 32-bit row offsets: the product is cut into row blocks of at most this
#: many entries (tests lower it to exercise the blocking on small matrices)
MKL_MAX_BLOCK_NNZ = _INT32_MAX
#: kernel used by spmm(kernel=None): the faster one in benchmarks/bench_spmm.py on 2-core x86 machines
DEFAULT_KERNEL = "hand"
#: float32 product of KnnScan(kernel=None), in every build: the faster one in benchmarks/bench_scan.py
#: (2.7x MKL's sgemm on 2 Zen 4 cores, 20000 x 200000 x 256), and the same results with or without MKL
DEFAULT_SCAN_KERNEL = "hand"


def max_threads():
    """Number of OpenMP threads the C++ calls use (``omp_get_max_threads()``)."""
    return _gu.max_threads()


def has_mkl():
    """True when this build links oneMKL (:class:`MklSpmm`, ``spmm(kernel="mkl")``, sgemm for the
    float32 :class:`KnnScan`); chosen when the package is built (setup.py, ``LOWSHOT_MKL``)."""
    return bool(_gu.has_mkl())


def _require_mkl(what):
    if not _gu.has_mkl():
        raise RuntimeError("graph_utils was built without MKL: %s needs it (use the hand-written kernel, or "
                           "reinstall with mkl-devel installed: LOWSHOT_MKL=on pip install --no-build-isolation -e .)"
                           % what)


def _as_1d(a, dtype, name):
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError("%s must be 1-D, got shape %s" % (name, a.shape))
    return np.ascontiguousarray(a, dtype=dtype)


class CSR:
    """A sparse matrix in compressed sparse row format.

    Parameters
    ----------
    indptr : array (nrows + 1,), integer; stored as int64
        Row ``i`` holds entries ``indptr[i]:indptr[i + 1]`` of ``indices`` / ``data``.
    indices : array (nnz,), integer; stored as int32
        Column ids in ``[0, ncols)``.
    data : array (nnz,), float; stored as float32
    shape : (nrows, ncols)
    check : bool
        Verify the CSR invariants (O(nnz), parallel); ValueError names the first problem.

    Arrays already of the stored dtype and contiguous are kept without copy (the CSR borrows them);
    others are converted.
    """

    __slots__ = ("indptr", "indices", "data", "shape")

    def __init__(self, indptr, indices, data, shape, check=True):
        nrows, ncols = (int(s) for s in shape)
        if nrows < 0 or not 0 <= ncols <= _INT32_MAX:
            raise ValueError("invalid CSR shape %s: ncols must be < 2^31" % (shape,))
        indptr = np.asarray(indptr)
        indices = np.asarray(indices)
        for name, a in ("indptr", indptr), ("indices", indices):
            if a.dtype.kind not in "iu":
                raise TypeError("%s must be an integer array, got dtype %s" % (name, a.dtype))
        if np.asarray(data).dtype.kind not in "fiub":
            raise TypeError("data must be a real array, got dtype %s" % np.asarray(data).dtype)
        if indices.dtype != np.int32 and indices.size and (indices.max() > _INT32_MAX or indices.min() < 0):
            raise ValueError("indices out of range [0, %d)" % ncols)
        self.indptr = _as_1d(indptr, np.int64, "indptr")
        self.indices = _as_1d(indices, np.int32, "indices")
        self.data = _as_1d(data, np.float32, "data")
        self.shape = (nrows, ncols)
        if len(self.indptr) != nrows + 1:
            raise ValueError("indptr has %d entries, expected nrows + 1 = %d" % (len(self.indptr), nrows + 1))
        if len(self.indices) != len(self.data):
            raise ValueError("indices and data differ in length (%d, %d)" % (len(self.indices), len(self.data)))
        if self.indptr[0] != 0 or self.indptr[-1] != len(self.indices):
            raise ValueError("indptr must start at 0 and end at nnz = %d, got %d .. %d" % (
                len(self.indices), self.indptr[0], self.indptr[-1]))
        if check:
            _gu.check(*self._args(), False)

    def _args(self):
        return self.indptr, self.indices, self.data, self.shape[0], self.shape[1]

    @property
    def nnz(self):
        """Number of stored entries (explicit zeros and duplicates included)."""
        return int(self.indptr[-1])

    @classmethod
    def from_scipy(cls, m):
        """Copy of a scipy sparse matrix (any format) as CSR with int64 / int32 / float32 arrays."""
        m = m.tocsr()
        return cls(m.indptr, m.indices, m.data, m.shape)

    def to_scipy(self):
        """scipy.sparse.csr_matrix sharing this matrix' arrays (no copy)."""
        import scipy.sparse
        return scipy.sparse.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape, copy=False)

    def __repr__(self):
        return "CSR(shape=%s, nnz=%d)" % (self.shape, self.nnz)


def _from_tuple(t, shape):
    indptr, indices, data = t
    return CSR(indptr, indices, data, shape, check=False)


def _check_csr_arg(A, name="A"):
    if not isinstance(A, CSR):
        raise TypeError("%s must be a graph_utils.CSR (use CSR.from_scipy), got %s" % (name, type(A).__name__))


def _check_table(I, name, dtypes=(np.int32, np.int64)):
    """2-D array with contiguous rows (row stride free) of one of dtypes."""
    if not isinstance(I, np.ndarray):
        raise TypeError("%s must be a numpy array, got %s" % (name, type(I).__name__))
    if I.dtype not in dtypes:
        raise TypeError("%s must have dtype %s, got %s" % (name, " or ".join(np.dtype(d).name for d in dtypes),
                                                           I.dtype))
    if I.ndim != 2:
        raise ValueError("%s must be 2-D, got shape %s" % (name, I.shape))
    if I.size and (I.shape[1] > 1 and I.strides[1] != I.itemsize or I.strides[0] < 0):
        raise ValueError("%s must have contiguous rows (use np.ascontiguousarray)" % name)


def _check_dense(X, name, writable=False):
    if not isinstance(X, np.ndarray):
        raise TypeError("%s must be a numpy array, got %s" % (name, type(X).__name__))
    if X.dtype != np.float32:
        raise TypeError("%s must have dtype float32, got %s" % (name, X.dtype))
    if X.ndim != 2:
        raise ValueError("%s must be 2-D, got shape %s" % (name, X.shape))
    if not X.flags.c_contiguous:
        raise ValueError("%s must be C-contiguous (use np.ascontiguousarray)" % name)
    if writable and not X.flags.writeable:
        raise ValueError("%s is read-only" % name)


def csr_from_knn(I, ncols, values=None):
    """Sparse matrix with row ``i`` holding the ids of row ``i`` of a k-NN table.

    Parameters
    ----------
    I : array (n, k), int32 or int64, rows contiguous
        Column ids; -1 marks a missing entry (skipped). Entries keep the table order, duplicates included.
    ncols : int
        Number of columns; ids must be in ``[0, ncols)``.
    values : array (n, k), float32, optional
        Values of the entries; all 1 (binary matrix) when None.

    Returns
    -------
    CSR (n, ncols)
    """
    _check_table(I, "I")
    if values is not None:
        _check_table(values, "values", (np.float32,))
        if values.shape != I.shape:
            raise ValueError("values has shape %s, I has %s" % (values.shape, I.shape))
    return _from_tuple(_gu.csr_from_knn(I, int(ncols), values), (I.shape[0], int(ncols)))


def transpose(A):
    """A^T as a new CSR; its rows are sorted by column id."""
    _check_csr_arg(A)
    return _from_tuple(_gu.transpose(*A._args()), A.shape[::-1])


def spgemm(A, B):
    """``A @ B`` for CSR matrices as a new CSR (rows sorted by column id), for products with few
    columns (a dense accumulator of B.shape[1] floats per thread): the diffusion's first iterations."""
    _check_csr_arg(A, "A")
    _check_csr_arg(B, "B")
    if A.shape[1] != B.shape[0]:
        raise ValueError("A has %d columns but B has %d rows" % (A.shape[1], B.shape[0]))
    return _from_tuple(_gu.spgemm(*A._args(), *B._args()), (A.shape[0], B.shape[1]))


def sort_rows(A):
    """Sort each row of A by column id, in place (stable: duplicates keep their order). Returns A."""
    _check_csr_arg(A)
    _gu.sort_rows(*A._args())
    return A


def knn_to_graph(I, n):
    """The diffusion graph W: row-L1-normalised ``W0 + W0^T`` for a k-NN table, in one C++ call.

    Parameters
    ----------
    I : array (n, k), int32 or int64, rows contiguous
        Neighbour ids in ``[0, n)``; -1 marks a missing neighbour (skipped).
    n : int
        Number of nodes (rows of I).

    Returns
    -------
    CSR (n, n), float32 values, rows sorted
        ``W0[i, j] = 1`` iff j appears in row i of I (duplicates counted once), so entries of
        ``W0 + W0^T`` are 1 or 2 before the normalisation.
    """
    _check_table(I, "I")
    if I.shape[0] != n:
        raise ValueError("I has %d rows, expected n = %d" % (I.shape[0], n))
    if n > _INT32_MAX:
        raise ValueError("graphs are limited to 2^31 - 1 nodes")
    return _from_tuple(_gu.knn_to_graph(I, int(n)), (int(n), int(n)))


def col_normalize(X):
    """Scale each column of X (n, C) float32 C-contiguous to sum 1, in place; zero columns stay. Returns X."""
    _check_dense(X, "X", writable=True)
    _gu.col_normalize(X)
    return X


class MklSpmm:
    """``A @ X`` with MKL's inspector-executor, analysed once for products with C columns (builds with
    MKL only: RuntimeError otherwise, see :func:`has_mkl`).

    The matrix is cut into row blocks of at most ``max_block_nnz`` entries so that MKL's 32-bit
    offsets suffice; each block gets ``mkl_sparse_set_mm_hint`` + ``mkl_sparse_optimize``. Keeps A's
    arrays referenced; do not modify them while the plan is in use.

    Parameters
    ----------
    A : CSR
    C : int
        Columns of the dense operands.
    expected_calls : int
        Hint for MKL's optimisation.
    max_block_nnz : int, optional
        Defaults to MKL_MAX_BLOCK_NNZ (2^31 - 1).
    """

    def __init__(self, A, C, expected_calls=10, max_block_nnz=None):
        _require_mkl("MklSpmm")
        _check_csr_arg(A)
        self.shape = A.shape
        self.C = int(C)
        self._plan = _gu.MklPlan(*A._args(), self.C, int(max_block_nnz or MKL_MAX_BLOCK_NNZ), int(expected_calls))

    @property
    def nblocks(self):
        """Number of row blocks handed to MKL."""
        return self._plan.nblocks()

    def __call__(self, X, out=None):
        """Return ``A @ X`` for X (A.shape[1], C) float32 C-contiguous, into ``out`` if given."""
        _check_dense(X, "X")
        if X.shape != (self.shape[1], self.C):
            raise ValueError("X has shape %s, expected %s" % (X.shape, (self.shape[1], self.C)))
        out = _out_array(out, (self.shape[0], self.C))
        self._plan.run(X, out)
        return out


def _out_array(out, shape):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    _check_dense(out, "out", writable=True)
    if out.shape != shape:
        raise ValueError("out has shape %s, expected %s" % (out.shape, shape))
    return out


def spmm(A, X, out=None, kernel=None):
    """Sparse x dense product ``A @ X``.

    Parameters
    ----------
    A : CSR (nrows, ncols)
    X : array (ncols, C), float32, C-contiguous
    out : array (nrows, C), float32, C-contiguous, optional
        Written in place (must not overlap X).
    kernel : "hand", "mkl" or None
        "hand": row-parallel OpenMP kernel with software prefetch; "mkl": MKL inspector-executor
        (analysis included in the call; use MklSpmm to reuse it; RuntimeError in a build without
        MKL, see :func:`has_mkl`); None: DEFAULT_KERNEL.

    Returns
    -------
    array (nrows, C), float32
    """
    _check_csr_arg(A)
    _check_dense(X, "X")
    if X.shape[0] != A.shape[1]:
        raise ValueError("X has %d rows, A has %d columns" % (X.shape[0], A.shape[1]))
    kernel = kernel or DEFAULT_KERNEL
    if kernel not in ("hand", "mkl"):
        raise ValueError("kernel must be 'hand' or 'mkl', got %r" % (kernel,))
    if kernel == "mkl":
        _require_mkl("spmm(kernel='mkl')")
    out = _out_array(out, (A.shape[0], X.shape[1]))
    if out.size and np.shares_memory(out, X):
        raise ValueError("out must not overlap X")
    if kernel == "hand":
        _gu.spmm_hand(*A._args(), X, out)
    else:
        MklSpmm(A, X.shape[1], expected_calls=1)(X, out)
    return out


def merge_knn_results(D, I, D2, I2, translation):
    """Merge two per-row k-best tables in place, keeping the largest similarities.

    Parameters
    ----------
    D : array (n, k), float32, rows contiguous (row-strided views allowed); modified in place
    I : array (n, k), int32 or int64, rows contiguous; modified in place
        Each row sorted by decreasing similarity (as faiss returns inner-product results).
    D2 : array (n, k2), float32, rows contiguous; sorted likewise
    I2 : array (n, k2), same dtype as I
        Ids relative to ``translation``: the merged table holds ``I2 + translation``; ids < 0 stay -1.
    translation : int

    After the call row i of (D, I) holds the k largest of the k + k2 candidates in decreasing order;
    equal similarities keep (D, I) first, then (D2, I2), each in its own order. A row not sorted by
    decreasing similarity raises ValueError before anything is modified.
    """
    _check_table(D, "D", (np.float32,))
    _check_table(D2, "D2", (np.float32,))
    _check_table(I, "I")
    _check_table(I2, "I2", (I.dtype,))
    if I.shape != D.shape or I2.shape != D2.shape or D.shape[0] != D2.shape[0]:
        raise ValueError("shapes: D %s, I %s, D2 %s, I2 %s: I must match D, I2 must match D2, same rows" % (
            D.shape, I.shape, D2.shape, I2.shape))
    if not (D.flags.writeable and I.flags.writeable):
        raise ValueError("D and I are modified in place and must be writable")
    _gu.merge_knn_results(D, I, D2, I2, int(translation))


def locality_order(A):
    """Node order that keeps neighbours close: breadth-first over the graph A (square).

    Returns
    -------
    perm : array (n,), int64
        ``perm[new_id] = old_id``. Apply with :func:`permute` (graph), :func:`permute_columns`
        (matrices whose columns are nodes) and ``X[perm]`` (rows of dense matrices); undo on results
        with ``Y[inverse_permutation(perm)]``; node ``old`` becomes ``inverse_permutation(perm)[old]``.
    """
    _check_csr_arg(A)
    if A.shape[0] != A.shape[1]:
        raise ValueError("locality_order needs a square matrix, got %s" % (A.shape,))
    perm = np.empty(A.shape[0], dtype=np.int64)
    _gu.bfs_order(*A._args(), perm)
    return perm


def permute(A, perm):
    """``P A P^T`` for ``perm[new_id] = old_id``: new CSR with ``B[r, c] = A[perm[r], perm[c]]``, rows sorted."""
    _check_csr_arg(A)
    if A.shape[0] != A.shape[1]:
        raise ValueError("permute needs a square matrix, got %s" % (A.shape,))
    perm = _as_1d(perm, np.int64, "perm")
    if len(perm) != A.shape[0]:
        raise ValueError("perm has %d entries, A has %d rows" % (len(perm), A.shape[0]))
    return _from_tuple(_gu.permute_symmetric(*A._args(), perm), A.shape)


def permute_columns(A, perm):
    """``A P^T`` for ``perm[new_id] = old_id``: new CSR with ``B[:, c] = A[:, perm[c]]``, rows sorted.

    For a rectangular matrix whose columns are graph nodes (e.g. test images x nodes) after the graph
    was reordered with :func:`permute`: ``permute_columns(T, perm) @ X[perm] == T @ X``.
    """
    _check_csr_arg(A)
    perm = _as_1d(perm, np.int64, "perm")
    if len(perm) != A.shape[1] or not np.array_equal(np.sort(perm), np.arange(A.shape[1])):
        raise ValueError("perm is not a permutation of the %d columns" % A.shape[1])
    inv = inverse_permutation(perm)
    B = CSR(A.indptr.copy(), inv[A.indices].astype(np.int32), A.data.copy(), A.shape, check=False)
    return sort_rows(B)


def inverse_permutation(perm):
    """inv with ``inv[perm[i]] = i`` (int64)."""
    perm = np.asarray(perm)
    inv = np.empty(len(perm), dtype=np.int64)
    inv[perm] = np.arange(len(perm), dtype=np.int64)
    return inv


def cpu_has_bf16():
    """True when this CPU has the AVX512-BF16 dot-product instructions :class:`KnnScan` uses."""
    return bool(_gu.cpu_has_bf16())


def to_bf16(X):
    """bfloat16 bits (uint16, round to nearest even) of a float32 (n, d) array."""
    _check_table(X, "X", (np.float32,))
    X = np.ascontiguousarray(X)
    out = np.empty(X.shape, dtype=np.uint16)
    _gu.to_bf16(X, out)
    return out


class KnnScan:
    """k-best tables of many queries, filled block by block of candidates (e.g. IVF lists).

    Each query (row of ``Qf``) keeps the ``kp >= k`` best candidates by score, then id (whatever
    order they come in). With ``bf16`` (the default where the CPU has AVX512-BF16 and d is even) the
    products are computed in bfloat16, ~5x faster than float32 BLAS on Zen 4, and the kept
    candidates are re-scored exactly in float32; :meth:`finish` keeps the k best by exact score.
    Without it the products are float32 (MKL's sgemm or the hand-written blocked product, see
    ``kernel``) and kp = k gives the float32 search's result.

    Parameters
    ----------
    Qf : array (n, d), float32, C-contiguous: the (normalised) queries
    kp : int
        Candidates kept per query (k for float32; more for bf16, whose ranking is approximate).
    bf16 : bool or None
        None: :func:`cpu_has_bf16` and d even.
    deferred : bool
        bf16 only: keep approximate scores during the scan and compute the exact ones in
        :meth:`finish`, which then needs ``base``, one array holding every candidate, the ids given
        to :meth:`add` being its rows: only the kept candidates within the bf16 error bound of the
        k-th are scored, at the end, instead of every candidate entering a row, while its vector is
        in cache (fewer products, but random reads of ``base``).
    floor : array float32 (n,) or None
        Per query, candidates scoring below it (by the scan's own, approximate with bf16, score)
        are never kept: when only candidates above a known k-th score matter (a merge with another
        table), most are rejected by one comparison. Rows may end with fewer than k candidates.
    kernel : "mkl", "hand" or None
        The float32 product (without bf16): "mkl" MKL's sgemm (builds with MKL only, see
        :func:`has_mkl`), "hand" the hand-written blocked product (OpenMP, vectorised for the CPU at
        load time); None: DEFAULT_SCAN_KERNEL.
    """

    def __init__(self, Qf, kp, bf16=None, deferred=False, floor=None, kernel=None):
        kernel = kernel or DEFAULT_SCAN_KERNEL
        if kernel not in ("hand", "mkl"):
            raise ValueError("kernel must be 'hand' or 'mkl', got %r" % (kernel,))
        if kernel == "mkl":
            _require_mkl("KnnScan(kernel='mkl')")
        self.kernel = kernel
        _check_table(Qf, "Qf", (np.float32,))
        self.Qf = np.ascontiguousarray(Qf)
        n, d = self.Qf.shape
        if bf16 is None:
            bf16 = cpu_has_bf16() and d % 2 == 0
        if bf16 and not (cpu_has_bf16() and d % 2 == 0):
            raise ValueError("bf16 scan needs AVX512-BF16 and an even d (d = %d)" % d)
        self.bf16 = bool(bf16)
        self.deferred = self.bf16 and deferred
        self.vmax = 0.0
        self.uncertain = 0
        self.Qb = to_bf16(self.Qf) if self.bf16 else None
        if not 1 <= kp <= 512:
            raise ValueError("kp = %d: need 1 <= kp <= 512 candidates per query" % kp)
        self.kp = int(kp)
        cap = 2 * self.kp
        self._t = (np.full((n, cap), -np.inf, dtype=np.float32), np.full((n, cap), -np.inf, dtype=np.float32),
                   np.full((n, cap), -1, dtype=np.int32), np.zeros(n, dtype=np.int32),
                   np.full(n, -np.inf, dtype=np.float32), self.kp)
        if floor is not None:        # the rows' entry thresholds start there
            floor = np.asarray(floor, dtype=np.float32)
            if floor.shape != (n,) or np.isnan(floor).any():
                raise ValueError("floor must hold one score per query (%d), not NaN" % n)
            self._t[4][:] = floor

    def add(self, rows, Xc, ids):
        """Offer candidates ``Xc`` (nc, d) float32 with ids (nc,) int32 to queries ``rows``
        (strictly increasing int64); no id may be offered twice to one query (not checked)."""
        rows = _as_1d(rows, np.int64, "rows")
        ids = _as_1d(ids, np.int32, "ids")
        _check_table(Xc, "Xc", (np.float32,))
        vmax = _gu.knn_scan_list(*self._t, rows, self.Qf, self.Qb, Xc, ids, not self.deferred, self.kernel == "mkl")
        self.vmax = max(self.vmax, vmax)

    def finish(self, k, D=None, I=None, base=None):
        """The k best candidates of every query by exact score: D float32 (n, k) decreasing, I int32
        (n, k) (ties: lower id first); -inf / -1 where a query got fewer than k. D, I: outputs to fill.
        base: the candidates' array (deferred scans); ``self.uncertain`` then counts the rows whose
        result is not guaranteed exact (more than kp candidates within the bf16 error bound)."""
        n = self.Qf.shape[0]
        if self.deferred and base is None:
            raise ValueError("a deferred scan needs base, the array of the candidates, to finish")
        _gu.knn_scan_settle(*self._t)
        if self.deferred:
            _check_table(base, "base", (np.float32,))
            self.uncertain = int(_gu.knn_scan_rescore(*self._t, self.Qf, base, k, self.vmax))
        D = np.empty((n, k), dtype=np.float32) if D is None else D
        I = np.empty((n, k), dtype=np.int32) if I is None else I
        _gu.knn_scan_finish(*self._t, D, I)
        return D, I
