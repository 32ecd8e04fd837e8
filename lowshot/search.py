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


def to_gpus(index, shard=False, float16=True):
    """Clone a CPU index to every GPU faiss sees (sharded or replicated); CPU index when none.

    Parameters
    ----------
    index : faiss.Index
    shard : bool
        Split the vectors over the GPUs (large databases) instead of replicating them.
    float16 : bool
        Store vectors / lists in float16 on the GPUs (as the 2018 original), halving memory.
    """
    ngpu = torch_backend.faiss_gpus()
    if ngpu == 0:
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = float16
    co.shard = shard
    co.shard_type = 1
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)


def knn_search(index, x, k, bs=SEARCH_BS, preproc=None, out=None, what="queries"):
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
        Di, Ii = index_search(index, xb, k)
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


def scan_probed(scan, P, nlist, get_list):
    """Offer every query (row of P) the vectors of the lists it probes, list by list.

    P : (n, nprobe) int32, the lists each query probes, nearest first
    get_list : c -> (vectors float32 (size, d), ids int32), or (None, None) for an empty list

    Each query's nearest list comes first (a pass over the lists for the queries whose first probe
    they are, then one for the other probes): a query's table then fills with near candidates, and
    few of the later candidates beat them (the bf16 scan re-scores each one that does).
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
    return float(pairs)


def ivf_knn(index, x, K, bf16=None, bs=SEARCH_BS):
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
        bf16 = torch_backend.bf16_scan(d)
    scan = torch_backend.knn_scan(x, K + (BF16_EXTRA if bf16 else 0), bf16=bf16)
    stats["pairs_scored"] = scan_probed(scan, P, nlist, lists.__getitem__)
    D, I = scan.finish(K)
    stats["time_table"] = time.time() - t0
    return D, I, stats


def index_search(index, x, k):
    """``index.search(x, k)``; many queries in a CPU IVF-Flat index go through :func:`ivf_knn`."""
    if isinstance(index, faiss.IndexIVFFlat) and x.shape[0] >= IVF_BLAS_MIN_QUERIES:
        D, I, _ = ivf_knn(index, x, k)
        return D, I
    return index.search(x, k)


def exact_knn(xq, xb, k, bs=SEARCH_BS * 4):
    """Exact inner-product k-NN of (normalised) queries in raw background rows, streaming xb: the
    reference of the recall measurements.

    graph_utils.KnnScan: bf16 products where the CPU has AVX512-BF16, each candidate entering a
    query's table re-scored in float32, K + BF16_EXTRA kept (6x faster than faiss.knn for 1000
    queries at 1M); float32 products elsewhere.

    Parameters
    ----------
    xq : ndarray, float32 (nq, d), normalised
    xb : array float32 (nb, d), raw rows (memmap), normalised block by block

    Returns
    -------
    D : ndarray, float32 (nq, k); I : ndarray, int64 (nq, k)
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    bf16 = torch_backend.bf16_scan(xq.shape[1])
    scan = torch_backend.knn_scan(xq, min(512, k + BF16_EXTRA) if bf16 else k, bf16=bf16)
    rows = np.arange(xq.shape[0])
    for i0, i1 in _blocks(xb.shape[0], bs):
        scan.add(rows, normalized(xb[i0:i1]), np.arange(i0, i1, dtype=np.int32))
    D, I = scan.finish(k)
    return D, I.astype(np.int64)
