"""k-NN search primitives: L2 normalisation, exact search (KnnScan: bf16 products re-scored in
float32 on AVX512-BF16 CPUs), searches of faiss indexes by blocks of queries, and the list-by-list
search of a CPU IVF-Flat index (``ivf_knn``). Used by the background graph (lowshot/graph.py,
lowshot/ivf_build.py) and the graph completion (lowshot/completion.py).

Similarity tables ``D`` (float32) and neighbour tables ``I`` (int32, -1 = no neighbour) follow faiss.
"""
import time

import faiss
import numpy as np

from lowshot import torch_backend
from lowshot.common import InputError

# bf16 scans keep K + BF16_EXTRA candidates per query before the exact re-score; build_graph.py
# measures how often a row equals faiss' float32 search (docs/scale.md: 100% at 1M, 99.9% at 10M)
BF16_EXTRA = 16
# From this many queries, searches of a CPU IVF-Flat index go list by list (ivf_knn)
IVF_BLAS_MIN_QUERIES = 1000
# Rows searched at a time: bounds the temporaries (a block of queries, its (bs, K) results).
SEARCH_BS = 16384
# Candidate rows per call of KnnScan.add: 8192 x d bf16 (4 MB at d = 256) stay in the L3 cache
# while a block of queries is scored against them
DB_SLICE = 8192


def normalized(x, what="vectors"):
    """A float32 C-contiguous L2-normalised copy of ``x`` (n, d); zero rows stay zero.

    Raises InputError naming ``what`` when x holds NaN or inf.
    """
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))[0]
        raise InputError("%s: row %d holds NaN or inf" % (what, bad))
    faiss.normalize_L2(x)
    return x


def _blocks(n, bs):
    return [(i0, min(n, i0 + bs)) for i0 in range(0, n, bs)]


def to_gpus(index, ngpu, shard=False, float16=True):
    """Clone a CPU index to ``ngpu`` GPUs (sharded or replicated); the CPU index when ngpu is 0.

    Parameters
    ----------
    index : faiss.Index
    ngpu : int, GPUs faiss uses (``Backend.faiss_gpus``)
    shard : bool
        Split the vectors over the GPUs (large databases) instead of replicating them.
    float16 : bool
        Store vectors / lists in float16 on the GPUs (as the 2018 original), halving memory.
    """
    if ngpu == 0:
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = float16
    co.shard = shard
    co.shard_type = 1
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)


def knn_search(index, x, k, bs=SEARCH_BS, preproc=None, out=None, what="queries", backend=torch_backend.CPU):
    """Search ``x`` in ``index`` by blocks of ``bs`` rows.

    Parameters
    ----------
    index : faiss.Index (inner product)
    x : array (n, d), possibly a memmap
    k : int
    preproc : callable or None
        Applied to each block (e.g. normalisation of raw background rows).
    out : (D, I) or None
        Preallocated (n, k) float32 / int32 outputs (views allowed).
    backend : lowshot.torch_backend.Backend, the scans of :func:`ivf_knn`

    Returns
    -------
    D : ndarray, float32 (n, k), decreasing similarities; -inf where I is -1
    I : ndarray, int32 (n, k)
    """
    n = x.shape[0]
    if out is None:
        D = np.empty((n, k), dtype=np.float32)
        I = np.empty((n, k), dtype=np.int32)
    else:
        D, I = out
    for i0, i1 in _blocks(n, bs):
        xb = preproc(x[i0:i1]) if preproc else np.ascontiguousarray(x[i0:i1], dtype=np.float32)
        Di, Ii = index_search(index, xb, k, backend)
        Di[Ii < 0] = -np.inf
        D[i0:i1] = Di
        I[i0:i1] = Ii
    return D, I


def ivf_lists(index):
    """Each list of a CPU IndexIVFFlat as (vectors float32 (size, d) view, ids int32): index memory."""
    d = index.d
    out = []
    for c in range(index.nlist):
        size = index.invlists.list_size(c)
        if size == 0:
            out.append((None, None))
            continue
        x = faiss.rev_swig_ptr(index.invlists.get_codes(c), size * d * 4).view(np.float32).reshape(size, d)
        ids = faiss.rev_swig_ptr(index.invlists.get_ids(c), size)
        if ids.max() >= 2**31:
            raise ValueError("ivf_knn needs ids < 2^31")
        out.append((x, ids.astype(np.int32)))
    return out


def scan_probed(scan, P, nlist, get_list, report=None):
    """Offer every query (row of P) the vectors of the lists it probes, list by list.

    P : (n, nprobe) int32, the lists each query probes, nearest first
    get_list : c -> (vectors float32 (size, d), ids int32), or (None, None) for an empty list

    Each query's nearest list comes first (a pass over the lists for the queries whose first probe
    they are, then one for the other probes): a query's table then fills with near candidates, and
    few of the later candidates beat them (the bf16 scan re-scores each one that does).
    ``report(pairs)``, if given, is called after each list with the pairs scored so far.
    Returns the pairs scored.
    """
    import graph_utils

    pairs = 0
    for cols in (P[:, :1], P[:, 1:]):
        if cols.shape[1] == 0:
            continue
        byl = graph_utils.transpose(graph_utils.csr_from_knn(np.ascontiguousarray(cols), nlist))
        for c in range(nlist):
            q0, q1 = int(byl.indptr[c]), int(byl.indptr[c + 1])
            if q1 > q0:
                v, ids = get_list(c)
                if v is not None and len(v):
                    scan.add(byl.indices[q0:q1], v, ids)
                    pairs += (q1 - q0) * len(v)
                    if report is not None:
                        report(pairs)
    return float(pairs)


def ivf_knn(index, x, K, bf16=None, bs=SEARCH_BS, backend=torch_backend.CPU):
    """K-NN of many queries in an IVF-Flat index, list by list (graph_utils.KnnScan).

    Row i is ``index.search(x_i, K)`` at ``index.nprobe``: the same probed lists, searched
    exhaustively. All queries that probe list c are scored against list c's vectors in one product,
    so each list is read once for all its queries. The product is bfloat16 where the CPU has
    AVX512-BF16 (K + BF16_EXTRA candidates kept per query and re-scored exactly in float32; the result
    equals the float32 search but for near-ties), float32 products elsewhere (``bf16=False``: exactly
    the float32 search, ties to the lower id).

    Parameters
    ----------
    index : faiss.IndexIVFFlat (CPU), ids < 2^31
    x : ndarray float32 (n, d), normalised queries
    K : int
    bf16 : bool or None (None: where the CPU has it and d is even)
    backend : lowshot.torch_backend.Backend, where the scan runs

    Returns
    -------
    D float32 (n, K), I int32 (n, K) (-inf / -1 where the probed lists hold fewer than K vectors),
    stats (dict: time_probes, time_table in s, pairs_scored = (query, list vector) pairs)
    """
    n, d = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    nlist, nprobe = index.nlist, min(index.nprobe, index.nlist)
    t0 = time.time()
    P = np.empty((n, nprobe), dtype=np.int32)     # the lists each query probes, nearest first
    for i0, i1 in _blocks(n, bs):
        P[i0:i1] = index.quantizer.search(x[i0:i1], nprobe)[1]
    lists = ivf_lists(index)
    stats = {"time_probes": time.time() - t0}
    t0 = time.time()
    if bf16 is None:
        bf16 = backend.bf16_scan(d)
    scan = backend.knn_scan(x, K + (BF16_EXTRA if bf16 else 0), bf16=bf16)
    stats["pairs_scored"] = scan_probed(scan, P, nlist, lists.__getitem__)
    D, I = scan.finish(K)
    stats["time_table"] = time.time() - t0
    return D, I, stats


def index_search(index, x, k, backend=torch_backend.CPU):
    """``index.search(x, k)``; many queries in a CPU IVF-Flat index go through :func:`ivf_knn`."""
    if isinstance(index, faiss.IndexIVFFlat) and x.shape[0] >= IVF_BLAS_MIN_QUERIES:
        D, I, _ = ivf_knn(index, x, k, backend=backend)
        return D, I
    return index.search(x, k)


def exact_search(xq, X, k, preproc=None, bs=None, out=None, progress=None, floor=None, raw_base=False,
                 backend=torch_backend.CPU):
    """The k most similar rows of X for every row of xq (inner product), exactly: graph_utils.KnnScan,
    bf16 products where the CPU has AVX512-BF16 (k + BF16_EXTRA candidates re-scored in float32),
    float32 products elsewhere.

    Two ways through the data, one per kind of X (its results are exact either way):

    - X in RAM, normalised (the graph completion): the queries go by blocks of ``bs`` rows
      (default SEARCH_BS), each scanning all of X, re-scored at the end against X;
    - ``raw_base``: X is raw rows, possibly larger than RAM (a memmap of the background, the
      reference of the recall measurements): X is streamed by blocks of ``bs`` rows (default
      4 SEARCH_BS), normalised, against all the queries at once, each candidate re-scored as it
      enters a query's table (6x faster than faiss.knn for 1000 queries at 1M). ``preproc``,
      ``out``, ``progress`` and ``floor`` are not used then.

    Parameters
    ----------
    xq : array (nq, d), possibly a memmap of raw rows (then ``preproc`` normalises each block);
        normalised, in RAM, with ``raw_base``
    X : array float32 (n, d), C-contiguous, normalised; raw rows with ``raw_base``
    out : (D, I) or None, (nq, k) float32 / int32 outputs (memmaps allowed)
    progress : lowshot.progress.Progress or None, told the rows done (fractions within a block)
    floor : array (nq,) or None: only rows of X with a similarity >= floor matter (the k-th of a
        table the result will be merged with); the others may be left out (-inf / -1)
    backend : lowshot.torch_backend.Backend, where the scans run

    Returns
    -------
    D float32 (nq, k) decreasing (ties: lower id first), I int32 (nq, k) row ids of X (-inf / -1
    past X's rows), uncertain (rows whose k-th neighbour is not guaranteed by the bfloat16 error
    bound: more than k + BF16_EXTRA candidates within it; 0 with float32 products)
    """
    if raw_base:
        return _exact_search_raw(xq, X, k, SEARCH_BS * 4 if bs is None else bs, backend)
    return _exact_search_ram(xq, X, k, preproc, SEARCH_BS if bs is None else bs, out, progress, floor, backend)


def _exact_search_ram(xq, X, k, preproc, bs, out, progress, floor, backend):
    """:func:`exact_search` of X in RAM: the queries by blocks, each scanning all of X."""
    nq = xq.shape[0]
    n = X.shape[0]
    D, I = out if out is not None else (np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int32))
    if n == 0:
        D[:] = -np.inf
        I[:] = -1
        return D, I, 0
    X = np.ascontiguousarray(X, dtype=np.float32)
    bf16 = backend.bf16_scan(X.shape[1])
    ids = np.arange(n, dtype=np.int32)
    # worst-case bf16 error of a score: 2^-8 |q| |x| (and float32 rounding), as in KnnScan
    xmax = float(np.sqrt(np.einsum("ij,ij->i", X, X).max()))
    uncertain = 0
    for i0, i1 in _blocks(nq, bs):
        q = preproc(xq[i0:i1]) if preproc else np.ascontiguousarray(xq[i0:i1], dtype=np.float32)
        fl = None
        if floor is not None:
            qn = np.sqrt(np.einsum("ij,ij->i", q, q))
            fl = np.asarray(floor[i0:i1], dtype=np.float32) - ((2.0**-7 if bf16 else 2.0**-20) * qn * xmax + 1e-5)
        scan = backend.knn_scan(q, min(512, k + BF16_EXTRA) if bf16 else k, bf16=bf16, deferred=True, floor=fl)
        rows = np.arange(i1 - i0)
        for j0, j1 in _blocks(n, DB_SLICE):
            scan.add(rows, X[j0:j1], ids[j0:j1])
            if progress is not None:       # a block of queries against a large X takes minutes
                progress.update(i0 + (i1 - i0) * j1 / n)
        D[i0:i1], I[i0:i1] = scan.finish(k, base=X if bf16 else None)
        uncertain += scan.uncertain
    return D, I, uncertain


def _exact_search_raw(xq, xb, k, bs, backend):
    """:func:`exact_search` with ``raw_base``: the raw rows of xb streamed against all of xq."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    bf16 = backend.bf16_scan(xq.shape[1])
    scan = backend.knn_scan(xq, min(512, k + BF16_EXTRA) if bf16 else k, bf16=bf16)
    rows = np.arange(xq.shape[0])
    for i0, i1 in _blocks(xb.shape[0], bs):
        scan.add(rows, normalized(xb[i0:i1]), np.arange(i0, i1, dtype=np.int32))
    D, I = scan.finish(k)
    return D, I, scan.uncertain


def recall_at(Iapprox, Iexact, at=10):
    """recall@at: mean over rows of |approximate top-at ∩ exact top-at| / at (-1 entries never count)."""
    at = min(at, Iexact.shape[1])
    hits = [np.intersect1d(a[a >= 0], g[g >= 0]).size for a, g in zip(Iapprox[:, :at], Iexact[:, :at])]
    return float(np.mean(hits)) / at if hits else float("nan")
