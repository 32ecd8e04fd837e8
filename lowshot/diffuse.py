"""Label diffusion on the k-NN graph, class slicing, scoring of the test images, late fusion.

Notation (paper): ``W`` (n, n) the row-L1-normalised symmetrised k-NN graph over the nodes
(labelled first, then unlabelled), ``L`` (n, c) the label matrix of a block of c classes, ``T``
(nt, n) the binary test-to-node matrix (row i has ones on the k graph neighbours of test image i).

  L0 = one-hot rows of the labelled nodes, zero elsewhere, columns normalised to sum 1
  L_{t+1} = colnorm(W L_t)
  scores_t = T L_t           (nt, c): the label mass on each test image's neighbours

Classes never interact (a column of L only depends on its own column of L0), which is why class
blocks (``lslice``) and job-array slices (``class_range``) give the result of one full run.

L0 has one entry per labelled node, and L_t spreads t hops from them: while few nodes are labelled,
the first iterations run on a sparse L (all classes at once, :func:`sparse_iterations`), then on dense
(n, lslice) blocks.

Over 400 lines: the diffusion itself (sparse first iterations, dense class blocks), the scoring of
the test images and the renumbering of the nodes share the W/T/L layout above; the late fusion and
the merge of class slices read the scores this module writes.
"""
import time

import numpy as np

from lowshot import evaluate, torch_backend
from lowshot import method as method_mod
from lowshot.common import InputError, logger

log = logger(__name__)


# Diffusion iterations validated by the 2018 code (run_diffusion.bash, stage 3) for k = 30: background
# size -> {labelled images per novel class n: iterations}. diffusion.py uses them when --niter is not
# given; elsewhere DEFAULT_NITER.
VALIDATED_NITER = {
    0: {1: 3, 2: 3, 5: 1, 10: 1, 20: 1},
    10**5: {1: 0, 2: 3, 5: 0, 10: 0, 20: 0},
    10**6: {1: 3, 2: 3, 5: 3, 10: 2, 20: 2},
    10**7: {1: 4, 2: 4, 5: 4, 10: 3, 20: 3},
    10**8: {1: 7, 2: 6, 5: 5, 10: 5, 20: 4},
}
VALIDATED_K = 30
DEFAULT_NITER = 3


def default_niter(nbg, nlabeled, k, variant="douze18"):
    """(iterations, where they come from) for a run without --niter."""
    if variant != "douze18":
        return method_mod.DEFAULT_NITER[variant], "the default of %s's reference implementation" % variant
    it = VALIDATED_NITER.get(nbg, {}).get(nlabeled) if k == VALIDATED_K else None
    if it is not None:
        return it, "validated by the 2018 code for nbg = %d, n = %d, k = %d" % (nbg, nlabeled, k)
    return DEFAULT_NITER, ("no validated value for nbg = %d, n = %d, k = %d (the 2018 code validated k = %d, "
                           "nbg 0/100k/1M/10M/100M, n 1/2/5/10/20): the default" % (nbg, nlabeled, k, VALIDATED_K))


def reorder(W, T):
    """Renumber the nodes breadth-first so that neighbours get close ids (faster products).

    The sparse x dense product gathers rows of L at W's column ids: with close ids they come from
    nearby memory (measured at 1M nodes: 2.5-4.1 s -> 1.1-1.5 s per product, for ~5 s once).
    Test scores T L do not depend on the numbering, so nothing needs to be undone.

    Parameters
    ----------
    W : graph_utils.CSR (n, n) or lowshot.method.Operator; T : graph_utils.CSR (nt, n)

    Returns
    -------
    W, T renumbered, and new_id (n,) int64: the new id of each node (``new_id[:nl]``: of the
    labelled nodes; ``M[new_id]`` puts the rows of a node matrix M back in the original order).
    """
    import graph_utils
    if isinstance(W, method_mod.Operator):
        perm = graph_utils.locality_order(W.A)
        W2 = W.permuted(perm)
    else:
        perm = graph_utils.locality_order(W)
        W2 = graph_utils.permute(W, perm)
    return W2, graph_utils.permute_columns(T, perm), graph_utils.inverse_permutation(perm)


# Columns of L diffused at a time by default: 128 (rows of 512 bytes: at F1M, 3 iterations over 507
# classes took 8.8 s in blocks of 128 against 14.3 s at once, same scores), fewer when the two
# (n, lslice) blocks would take more than LSLICE_BYTES (F10M: 48 columns, 3.8 GB).
LSLICE_MAX = 128
LSLICE_BYTES = 4 * 2**30


def auto_lslice(n, ncols):
    """The default class block: LSLICE_MAX columns, a multiple of 16 that fits LSLICE_BYTES."""
    fit = int(LSLICE_BYTES // (2 * 4 * max(1, n))) // 16 * 16
    return int(min(ncols, LSLICE_MAX, max(16, fit)))


def diffuse(W, T, y_lab, nclass, niter, class_range=None, lslice=0, on_iter=None, lab_nodes=None,
            sparse_start=True, return_runs=False, backend=torch_backend.CPU):
    """Run the diffusion and score the test images after every iteration.

    Parameters
    ----------
    W : graph_utils.CSR (n, n) or lowshot.method.Operator
        The 2018 graph (:func:`graph_utils.knn_to_graph`), or a variant's operator
        (:func:`lowshot.method.build_operator`).
    T : graph_utils.CSR (nt, n)
        Binary test-to-node matrix (:func:`graph_utils.csr_from_knn`).
    y_lab : ndarray, int (nl,)
        Labels in 0..C-1 of the labelled nodes (nodes 0..nl-1 unless ``lab_nodes`` says otherwise).
    nclass : int, C
    niter : int, iterations (>= 0)
    class_range : (c0, c1) or None, diffuse only classes [c0, c1) (default: all)
    lslice : int
        Columns of L handled at a time (0: the whole range at once). Peak memory is two (n, lslice)
        float32 matrices instead of two (n, c1-c0).
    on_iter : callable (t, c0, c1, L) or None
        Called with the (n, c) label matrix after iteration t (t = 0: initial) of the class block
        [c0, c1) (e.g. to store it); for spreading, its row-normalised ``out``.
    lab_nodes : ndarray, int (nl,) or None
        Node ids of the labelled images after :func:`reorder` (None: 0..nl-1).
    sparse_start : bool
        douze18: run the first iterations on a sparse L while it is sparse (:func:`sparse_iterations`):
        the same scores to float rounding, faster when few nodes are labelled.
    return_runs : bool, also return per class block the iterations done before ``tol`` stopped it
    backend : lowshot.torch_backend.Backend, where the dense products run (torch or graph_utils)

    Returns
    -------
    scores : list of niter+1 ndarrays float32 (nt, c1-c0): test scores after 0, 1, ..., niter iterations
    runs : list of int, or None when no dense block ran (all iterations sparse); with
        ``return_runs`` only
    """
    op = W if isinstance(W, method_mod.Operator) else method_mod.Operator(W)
    n = op.shape[0]
    if T.shape[1] != n:
        raise ValueError("T has %d columns but W has %d nodes" % (T.shape[1], n))
    c0, c1 = class_range or (0, nclass)
    if not 0 <= c0 < c1 <= nclass:
        raise InputError("class range %d:%d is not inside 0:%d" % (c0, c1, nclass))
    lslice = lslice if lslice and lslice > 0 else c1 - c0
    lab_nodes = np.arange(len(y_lab)) if lab_nodes is None else np.asarray(lab_nodes, dtype=np.int64)
    nt = T.shape[0]
    scores = [np.empty((nt, c1 - c0), dtype=np.float32) for _ in range(niter + 1)]
    t0, Ls, runs = -1, None, None
    if op.method.variant == "douze18" and op.method.tol is None:
        # L0 and the first iterations on a sparse L, while it is sparse (all classes at once)
        t0, Ls = sparse_iterations(op.A, T, y_lab, lab_nodes, c0, c1, niter if sparse_start else 0, scores,
                                   on_iter=on_iter, lslice=lslice)
    if t0 < niter:
        ops = backend.diffusion_ops(op.A, T) if backend.device is not None else \
            _GraphUtilsOps(op.A, T, min(lslice, c1 - c0))
        runs = [_dense_block(op, ops, y_lab, lab_nodes, (c0, b0, min(c1, b0 + lslice)), Ls, t0, niter, scores,
                             on_iter, lslice < c1 - c0)
                for b0 in range(c0, c1, lslice)]
        del ops
    return (scores, runs) if return_runs else scores


def _dense_block(op, ops, y_lab, lab_nodes, cols, Ls, t0, niter, scores, on_iter, sliced):
    """The dense iterations of class block [b0, b1) (``cols`` = (c0, b0, b1), c0 the diffused
    range's first class), from L0, or from the sparse iterations' ``Ls`` (after iteration t0).
    Returns the iterations done."""
    c0, b0, b1 = cols
    if sliced:
        log("classes %d:%d" % (b0, b1))
    blk = method_mod.Block(op, ops, y_lab, lab_nodes, b0, b1)
    if Ls is not None:
        L = ops.start(_dense_columns(Ls, b0 - c0, b1 - c0, ops.label_buffer(b1 - b0)))
    else:
        L = blk.start(ops.label_buffer(b1 - b0))
    return _iterate_block(blk, ops, L, t0, niter, cols, scores, on_iter)


def _iterate_block(blk, ops, L, t0, niter, cols, scores, on_iter):
    """Iterations t0 + 1..niter of one class block from its label matrix ``L`` (after iteration t0;
    t0 = -1: L0, recorded first) into ``scores``; once ``tol`` stops the block, the later iterations
    repeat its scores. ``cols``: (c0, b0, b1), the diffused range's first class and the block's.
    Returns the iterations done."""
    c0, b0, b1 = cols
    tol = blk.op.method.tol
    out, t, run = blk.out(L), t0 + 1, niter
    if t0 < 0:
        t = _record(0, b0, b1, c0, out, ops, scores, on_iter) + 1
    done = False
    while t <= niter:
        if not done:
            L_next = blk.step(L)
            done = tol is not None and float(abs(L_next - L).sum()) < tol
            L, out = L_next, blk.out(L_next)
            if done:
                run = t
        _record(t, b0, b1, c0, out, ops, scores, on_iter)
        t += 1
    return run


def _record(t, b0, b1, c0, out, ops, scores, on_iter):
    scores[t][:, b0 - c0:b1 - c0] = ops.scores(out)
    if on_iter:
        on_iter(t, b0, b1, ops.numpy(out))
    return t


# Below this many nodes L fits in cache and renumbering costs more than it saves.
REORDER_MIN_NODES = 200000


def diffuse_knn(I_nodes, I_test, y_lab, nclass, niter, class_range=None, lslice=None, renumber="auto",
                sparse_start=True, on_iter=None, keep_L=False, method=None, D_nodes=None, backend=torch_backend.CPU):
    """The method from a k-NN table: W, the renumbering, the diffusion; what ``diffusion.py`` and
    :class:`lowshot.LabelDiffusion` both run.

    Parameters
    ----------
    I_nodes : ndarray int32 (n, k)
        Neighbours of every graph node (node ids, -1: none); the labelled nodes are 0..nl-1.
    I_test : ndarray int32 (nt, k)
        Graph neighbours of the images to score (nt may be 0).
    y_lab : ndarray int (nl,)
        Labels in 0..nclass-1 of nodes 0..nl-1.
    nclass, niter, class_range, sparse_start, on_iter
        As :func:`diffuse`; ``on_iter`` gets L with its rows in node order (renumbering undone).
    lslice : int or None
        Class block (None: :func:`auto_lslice`; 0: all classes at once).
    renumber : "auto", "on" or "off"
        Renumber the nodes breadth-first (:func:`reorder`; auto: from REORDER_MIN_NODES nodes).
    keep_L : bool
        Also return the node matrix after the last iteration, (n, c1 - c0) float32 in node order.
    method : lowshot.method.Method or None
        The variant (None: douze18, the paper's).
    D_nodes : ndarray float32 (n, k) or None
        Similarities of I_nodes (weights other than binary need them).
    backend : lowshot.torch_backend.Backend
        As :func:`diffuse`.

    Returns
    -------
    scores : list of niter + 1 ndarrays float32 (nt, c1 - c0)
    L : ndarray float32 (n, c1 - c0), or None without ``keep_L``
    info : dict: ``nodes``, ``W_nnz``, ``lslice``, ``iterations_run``, times of ``make_W``, ``reorder``,
        ``diffusion``
    """
    n = I_nodes.shape[0]
    c0, c1 = class_range or (0, nclass)
    W, T, new_id, times = _operators(I_nodes, I_test, method or method_mod.DOUZE18, D_nodes, renumber)
    info = {"nodes": n, "times": times, "W_nnz": int(W.nnz)}
    lab_nodes = None if new_id is None else new_id[:len(y_lab)]
    L_last = np.zeros((n, c1 - c0), dtype=np.float32) if keep_L else None

    def node_order(t, b0, b1, L):
        if keep_L and t == niter:
            L_last[:, b0 - c0:b1 - c0] = L if new_id is None else L[new_id]
        if on_iter:
            on_iter(t, b0, b1, L if new_id is None else L[new_id])

    t0 = time.time()
    info["lslice"] = lslice = auto_lslice(n, c1 - c0) if lslice is None else lslice
    log("diffusion of classes %d:%d, %d iterations%s (%s)" % (
        c0, c1, niter, ", blocks of %d classes" % lslice if 0 < lslice < c1 - c0 else "",
        "torch.sparse on %s" % backend.device if backend.device else "graph_utils' spmm"))
    scores, runs = diffuse(W, T, y_lab, nclass, niter, class_range=(c0, c1), lslice=lslice, lab_nodes=lab_nodes,
                           on_iter=node_order if (on_iter or keep_L) else None, sparse_start=sparse_start,
                           return_runs=True, backend=backend)
    if runs is not None:
        info["iterations_run"] = runs
    times["diffusion"] = time.time() - t0
    return scores, L_last, info


def _operators(I_nodes, I_test, m, D_nodes, renumber):
    """W (the variant's operator) and T from the k-NN tables, renumbered breadth-first when asked.
    Returns (W, T, new_id or None, times of ``make_W`` and ``reorder``)."""
    import graph_utils
    n = I_nodes.shape[0]
    times = {}
    t0 = time.time()
    log("W = rownorm(W0 + W0^T) over %d nodes" % n if m == method_mod.DOUZE18 else
        "operator of %s over %d nodes" % (m.record(), n))
    W = method_mod.build_operator(I_nodes, n, m, D_nodes)
    T = graph_utils.csr_from_knn(I_test, n)
    log("W: %d nnz (%.1f per row); T: %d x %d" % (W.nnz, W.nnz / max(1, n), T.shape[0], T.shape[1]))
    times["make_W"] = time.time() - t0
    new_id = None
    if renumber == "on" or (renumber == "auto" and n >= REORDER_MIN_NODES):
        t0 = time.time()
        log("renumbering the %d nodes breadth-first (locality of the products)" % n)
        W, T, new_id = reorder(W, T)
        times["reorder"] = time.time() - t0
    return W, T, new_id, times


# The first iterations run on a sparse L (graph_utils.spgemm) while L_t fills at most SPARSE_MAX_FILL of
# the (n, C) matrix and the next one (at most sum_j nnz(row j of L_t) x deg(j) entries, W's pattern
# being symmetric; 8 bytes each) fits SPARSE_MAX_BYTES (the dense blocks' budget: a sparse L kept for
# the dense blocks that may follow is at most as large as they are). Measured at F1M (1M nodes, 38 entries per row of W, 507 classes, 2 cores): a
# sparse product costs ~16-22 ns per (entry of L_t, neighbour) pair, a dense iteration ~1.4 s, equal
# near 0.4% fill. The generated F1M run (10k labelled nodes): L1 0.03%, L2 0.15% full, so its 3
# iterations are all sparse; at F10M L2 fills 0.08% and W L2 has at most 173M entries (1.4 GB).
SPARSE_MAX_FILL = 0.004
SPARSE_MAX_BYTES = LSLICE_BYTES


def sparse_iterations(W, T, y_lab, lab_nodes, c0, c1, niter, scores, on_iter=None, lslice=0):
    """L0 and the iterations while L stays sparse: fills ``scores[0..t]`` and returns (t, L_t as a
    graph_utils.CSR (n, c1 - c0), columns normalised). ``on_iter`` gets dense blocks of ``lslice``
    columns, as from the dense iterations."""
    import graph_utils
    n, C = W.shape[0], c1 - c0
    y_lab = np.asarray(y_lab, dtype=np.int64)
    lab_nodes = np.arange(len(y_lab)) if lab_nodes is None else np.asarray(lab_nodes, dtype=np.int64)
    sel = np.flatnonzero((y_lab >= c0) & (y_lab < c1))
    cnt = np.bincount(y_lab[sel] - c0, minlength=C).astype(np.float32)
    cnt[cnt == 0] = 1
    rows, cols = lab_nodes[sel], y_lab[sel] - c0
    if len(rows) and not 0 <= rows.min() <= rows.max() < n:
        raise InputError("labelled node ids must lie in 0..%d, got %d..%d" % (n - 1, rows.min(), rows.max()))
    order = np.lexsort((cols, rows))
    L = _csr(rows[order], cols[order], (1 / cnt[cols[order]]).astype(np.float32), n, C)
    degree = np.diff(W.indptr)
    t = 0
    while True:
        scores[t][:] = graph_utils.spgemm(T, L).to_scipy().toarray()
        if on_iter:
            for b0 in range(0, C, lslice or C):
                b1 = min(C, b0 + (lslice or C))
                on_iter(t, c0 + b0, c0 + b1, _dense_columns(L, b0, b1, None))
        next_bound = int(np.diff(L.indptr) @ degree)          # entries of W L_t at most
        if t == niter or L.nnz > SPARSE_MAX_FILL * n * C or 8 * next_bound > SPARSE_MAX_BYTES:
            break
        L = graph_utils.spgemm(W, L)
        sums = np.zeros(C)
        for i0, i1 in _entry_chunks(L):
            sums += np.bincount(L.indices[i0:i1], weights=L.data[i0:i1], minlength=C)
        inv = np.where(sums == 0, 1.0, 1.0 / np.where(sums == 0, 1.0, sums)).astype(np.float32)
        for i0, i1 in _entry_chunks(L):
            L.data[i0:i1] *= inv[L.indices[i0:i1]]
        t += 1
        log("iteration %d on the sparse label matrix: %d entries (%.2f%% of %d x %d)" % (
            t, L.nnz, 100.0 * L.nnz / (n * C), n, C))
    return t, L


def _csr(rows, cols, vals, n, C):
    """graph_utils.CSR (n, C) from entries sorted by (row, column)."""
    import graph_utils
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return graph_utils.CSR(indptr, np.asarray(cols, dtype=np.int32), np.asarray(vals, dtype=np.float32), (n, C))


def _entry_chunks(L, size=2**22):
    """(i0, i1) ranges of L's entries, ~size each, cut at row boundaries: temporaries stay small."""
    cuts = np.searchsorted(L.indptr, np.arange(0, L.indptr[-1], size), side="right") - 1
    bounds = np.unique(np.concatenate([L.indptr[cuts], [L.indptr[-1]]]))
    return list(zip(bounds[:-1], bounds[1:])) if len(bounds) > 1 else []


def _dense_columns(L, a, b, out):
    """Columns [a, b) of the CSR L as a dense (n, b - a) float32 array (``out`` filled, or new)."""
    n = L.shape[0]
    out = np.zeros((n, b - a), dtype=np.float32) if out is None else out
    out[:] = 0
    r0 = 0
    for i0, i1 in _entry_chunks(L):
        r1 = int(np.searchsorted(L.indptr, i1, side="left"))        # rows [r0, r1) hold entries [i0, i1)
        cols = L.indices[i0:i1]
        keep = (cols >= a) & (cols < b)
        rows = np.repeat(np.arange(r0, r1), np.diff(L.indptr[r0:r1 + 1]))[keep]
        out[rows, cols[keep] - a] = L.data[i0:i1][keep]
        r0 = r1
    return out


class _GraphUtilsOps:
    """The diffusion's products with graph_utils: two (n, lslice) blocks allocated once and swapped
    (fresh pages cost a fault each on first write: at F1M, ~1 s per 512 MB block on this VM, as
    long as the block's 3 products). :class:`lowshot.torch_backend.TorchDiffusionOps` has the same
    methods."""

    def __init__(self, W, T, lslice):
        self.W, self.T, self.n = W, T, W.shape[0]
        self.bufs = [np.empty(self.n * lslice, dtype=np.float32) for _ in range(2)]
        self.cur = 0

    def _view(self, i, c):
        return self.bufs[i][:self.n * c].reshape(self.n, c)

    def label_buffer(self, c):
        self.cur = 0
        return self._view(0, c)

    def start(self, L0):
        return L0

    def product(self, L):
        """W L into the other block (L stays valid)."""
        import graph_utils
        self.cur = 1 - self.cur
        return graph_utils.spmm(self.W, L, out=self._view(self.cur, L.shape[1]))

    def product_new(self, X):
        """W X in a new array (a single column: the variants' row sums)."""
        import graph_utils
        return graph_utils.spmm(self.W, X)

    def colnorm(self, L):
        import graph_utils
        return graph_utils.col_normalize(L)

    def const(self, a):
        return a

    def scores(self, L):
        import graph_utils
        return graph_utils.spmm(self.T, L)

    def numpy(self, L):
        return L


############################################################################################
# Job-array slices: each process keeps its classes' top-5 per test image and iteration
############################################################################################

SLICE_TOPK = 5


def slice_top(scores_list, c0, k=SLICE_TOPK):
    """Top-k classes within a class slice, for every iteration.

    Parameters
    ----------
    scores_list : list of ndarray float32 (nt, c1-c0), one per iteration
    c0 : int, first class id of the slice

    Returns
    -------
    values : ndarray float32 (niter+1, nt, k'); ids : ndarray int64 (niter+1, nt, k'), global ids
    with k' = min(k, c1-c0).
    """
    vals, ids = zip(*[evaluate.topk(s, k) for s in scores_list])   # ties: lowest class id
    return np.stack(vals).astype(np.float32), np.stack(ids) + c0


def merge_slice_tops(parts, k=SLICE_TOPK):
    """Merge per-slice top-k lists into the global top-k (ties to the lowest class id).

    Exact: a class in the global top-k is in its own slice's top-k, since the order (score
    decreasing, then id increasing) is the same inside a slice and over all classes.

    Parameters
    ----------
    parts : list of (values (niter+1, nt, ki) float32, ids (niter+1, nt, ki) int64)

    Returns
    -------
    ids : ndarray int64 (niter+1, nt, k), best first
    """
    vals = np.concatenate([p[0] for p in parts], axis=2)
    ids = np.concatenate([p[1] for p in parts], axis=2)
    # lexsort: last key is primary -> by decreasing score, then increasing class id
    order = np.lexsort((ids, -vals), axis=-1)[..., :k]
    return np.take_along_axis(ids, order, axis=-1)


############################################################################################
# Late fusion
############################################################################################


# Diffusion weights tried by default on validation (fusion.py --weights, the phases' fusion.weights)
FUSION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


def l1_rows(S):
    """Rows scaled to sum 1 (all-zero rows stay zero); float64 copy. S must be >= 0."""
    S = np.asarray(S, dtype=np.float64)
    if (S < 0).any():
        raise InputError("scores to fuse must be non-negative (probabilities or diffusion mass)")
    s = S.sum(axis=1, keepdims=True)
    s[s == 0] = 1
    return S / s


def fuse(P_logreg, S_diffusion, w):
    """Late fusion: (1 - w) * logreg probabilities + w * L1-normalised diffusion scores.

    Both terms are distributions over the classes of each test image (the logreg softmax already
    sums to 1; the diffusion mass on an image's neighbours is scaled to sum 1), so the weight
    compares like with like. w = 0 is logreg alone, w = 1 diffusion alone.

    Parameters
    ----------
    P_logreg : ndarray (nt, C), softmax probabilities
    S_diffusion : ndarray (nt, C), diffusion scores (>= 0)
    w : float in [0, 1]

    Returns
    -------
    ndarray float64 (nt, C)
    """
    return (1 - w) * l1_rows(P_logreg) + w * l1_rows(S_diffusion)
