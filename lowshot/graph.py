"""The background graph (``build_graph.py``): methods and their defaults, build, recall. The stored
graph's files, reading and record are in lowshot/stored_graph.py, the search primitives in
lowshot/search.py, the IVF defaults, training and the resumable CPU IVF build in lowshot/ivf_build.py,
the completion with the labelled and test images (``diffusion.py``) in lowshot/completion.py.

All vectors are L2-normalised and compared by inner product (cosine similarity). Similarity tables
``D`` (float32) and neighbour tables ``I`` (int32, -1 = no neighbour) follow faiss; their suffixes
say which sets they connect (query set first):

====  =====================================================================
0     the in-RAM node set: labelled images (then in-domain unlabelled ones)
1     background images (``features/f100m/concatenated_PCAR256.raw``)
2     test images (not graph nodes)
====  =====================================================================

so ``I_10`` lists, for each labelled image, background neighbours. Graph nodes are numbered set 0
first (``0 .. n0-1``) then background (``n0 .. n0+nbg-1``).

Nothing is read at import time; the backend (:class:`lowshot.torch_backend.Backend`) is passed in:
faiss' GPU code is used when its ``faiss_gpus > 0``, the scans go through its ``knn_scan``
(graph_utils, or torch on a GPU: ``--device``).

"""
import time

import faiss
import numpy as np

from lowshot import ivf_build, stored_graph, torch_backend
from lowshot.common import InputError, atomic_output, logger
from lowshot.search import SEARCH_BS, _blocks, exact_search, knn_search, normalized, recall_at, to_gpus

log = logger(__name__)

METHODS = ("exact", "ivf", "hnsw", "nndescent")

# Background graph, CPU: exact search up to this size, IVF above, searched list by list
# (lowshot/ivf_build.py). The measurements behind these choices are in docs/scale.md ("Scale" and
# "Background graph"), from benchmarks/bench_build_graph.py: at 1M on 2 cores the IVF graph with
# bf16 products takes about a minute for recall@10 0.988; HNSW's per-query search misses near
# ties (0.910 at 1M); NN-descent's own graph is good but its index answers queries from outside
# the background poorly (recall@10 0.57 at 100k), which breaks graph completion: never the default.
# Exact costs N^2: below ~50k it takes seconds.
EXACT_MAX_CPU = 50000
# With GPUs, exact search is cheap up to ~1M; above, IVF as in the 2018 original.
EXACT_MAX_GPU = 10**6


############################################################################################
# Background graph (build_graph.py)
############################################################################################


def default_method(nbg, backend=torch_backend.CPU):
    """The background-graph method chosen by measurement (see EXACT_MAX_CPU / EXACT_MAX_GPU)."""
    if backend.faiss_gpus > 0 or backend.device == "cuda":
        return "exact" if nbg <= EXACT_MAX_GPU else "ivf"
    return "exact" if nbg <= EXACT_MAX_CPU else "ivf"


def _add_normalized(index, xb, bs, what):
    for i0, i1 in _blocks(xb.shape[0], bs):
        index.add(normalized(xb[i0:i1], "%s rows %d:%d" % (what, i0, i1)))


def make_background_index(xb, method, K=32, nlist=None, nprobe=None, hnsw_M=32, ef_search=64,
                          ef_construction=40, nnd_iter=10, nnd_L=None, nnd_search_L=None,
                          bs=SEARCH_BS, what="background", backend=torch_backend.CPU):
    """Build the index over the (normalised) background vectors.

    Parameters
    ----------
    xb : array float32 (nbg, d), raw background rows (a read-only memmap); normalised by blocks
    method : {"exact", "ivf", "hnsw", "nndescent"}
        exact: ``IndexFlatIP``. ivf: ``IndexIVFFlat`` with ``nlist`` lists visited ``nprobe`` at a
        time (None: :func:`lowshot.ivf_build.default_nlist`, :func:`lowshot.ivf_build.default_nprobe`). hnsw: ``IndexHNSWFlat`` (``hnsw_M``, ``ef_search``). nndescent:
        ``IndexNNDescentFlat`` whose graph of K neighbours per vector is built during ``add``.
    K : int
        Neighbours per vector (NN-descent builds exactly this graph).

    Returns
    -------
    index : faiss.Index (CPU), all nbg vectors added; ``index.ntotal == nbg``.
    """
    nbg, d = xb.shape
    if method == "exact":
        index = faiss.IndexFlatIP(d)
        _add_normalized(index, xb, bs, what)
    elif method == "ivf":
        ngpu = backend.faiss_gpus
        index = ivf_build.train_ivf(xb, nlist or ivf_build.default_nlist(nbg, ngpu), what=what, backend=backend)
        index.nprobe = min(nprobe or ivf_build.default_nprobe(nbg, index.nlist, ngpu), index.nlist)
        _add_normalized(index, xb, bs, what)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        _add_normalized(index, xb, bs, what)
    elif method == "nndescent":
        index = faiss.IndexNNDescentFlat(d, K, faiss.METRIC_INNER_PRODUCT)
        nnd = index.nndescent
        nnd.iter = nnd_iter
        if nnd_L is not None:
            nnd.L = nnd_L
        nnd.search_L = nnd_search_L or max(nnd.search_L, 2 * K)
        index.verbose = False
        # NN-descent builds its graph in add() over everything stored; fill the storage block by
        # block (one copy of the vectors in RAM) and let the last block's add() build the graph.
        storage = faiss.downcast_index(index.storage)
        blocks = _blocks(nbg, bs)
        for i0, i1 in blocks[:-1]:
            storage.add(normalized(xb[i0:i1], "%s rows %d:%d" % (what, i0, i1)))
        i0, i1 = blocks[-1]
        log("NN-descent on %d vectors (K=%d, L=%d, iter=%d)" % (nbg, K, nnd.L, nnd.iter))
        index.add(normalized(xb[i0:i1], "%s rows %d:%d" % (what, i0, i1)))
    else:
        raise InputError("unknown graph method %r (expected one of %s)" % (method, ", ".join(METHODS)))
    return index


def _nndescent_tables(index, K, bs):
    """Yield (i0, i1, D, I) blocks of the NN-descent graph with self first, similarities exact.

    NN-descent's graph excludes the vector itself; the exact search of a vector against its own
    set returns it first (similarity 1), so it is prepended to keep both tables alike.
    """
    n = index.ntotal
    d = index.d
    nnd = index.nndescent
    Kg = nnd.K
    graph = faiss.rev_swig_ptr(nnd.final_graph.data(), n * Kg).reshape(n, Kg)
    xs = faiss.rev_swig_ptr(faiss.downcast_index(index.storage).get_xb(), n * d).reshape(n, d)
    for i0, i1 in _blocks(n, bs):
        ids = np.empty((i1 - i0, K), dtype=np.int64)
        ids[:, 0] = np.arange(i0, i1)
        ids[:, 1:] = graph[i0:i1, :K - 1]
        bad = (ids[:, 1:] < 0) | (ids[:, 1:] >= n) | (ids[:, 1:] == ids[:, :1])
        ids[:, 1:][bad] = ids[:, :1].repeat(K - 1, axis=1)[bad]
        sims = np.einsum("ijd,id->ij", xs[ids], xs[i0:i1])
        sims[:, 1:][bad] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")
        D = np.take_along_axis(sims, order, axis=1).astype(np.float32)
        I = np.take_along_axis(ids, order, axis=1).astype(np.int32)
        I[~np.isfinite(D)] = -1
        yield i0, i1, D, I


def _write_tables(index, xb, K, paths, method, bs, record=None, backend=torch_backend.CPU):
    """Search every background vector in ``index`` by blocks, appending the results to the tables;
    ``record`` (a dict) lands with them (:func:`lowshot.stored_graph.write_pending_record`)."""
    nbg = xb.shape[0]
    t0 = time.time()
    search_index = index
    if method in ("exact", "ivf") and backend.faiss_gpus > 0:
        log("moving the index to %d GPUs" % backend.faiss_gpus)
        search_index = to_gpus(index, backend.faiss_gpus, shard=True)
    with atomic_output(paths["I"]) as tmpI, atomic_output(paths["D"]) as tmpD:
        with open(tmpI, "wb") as fI, open(tmpD, "wb") as fD:
            if method == "nndescent":
                blocks = _nndescent_tables(index, K, bs)
            elif method == "exact" and backend.device:
                blocks = backend.exact_blocks(xb, K, bs, lambda x: normalized(x, "background"))
            else:
                def preproc(x):
                    return normalized(x, "background")
                blocks = ((i0, i1) + knn_search(search_index, xb[i0:i1], K, bs, preproc, backend=backend)
                          for i0, i1 in _blocks(nbg, bs))
            tlast = time.time()
            for i0, i1, D, I in blocks:
                fD.write(np.ascontiguousarray(D, dtype=np.float32).tobytes())
                fI.write(np.ascontiguousarray(I, dtype=np.int32).tobytes())
                if time.time() - tlast > 10 or i1 == nbg:
                    tlast = time.time()
                    el = tlast - t0
                    log("graph rows %d / %d (%.0f rows/s)" % (i1, nbg, i1 / max(el, 1e-9)))
        if record is not None:
            stored_graph.write_pending_record(paths, record, tmpI)


def build_background_graph(xb, K, paths, method=None, bs=SEARCH_BS, build_params=None, record=None,
                           backend=torch_backend.CPU, **index_params):
    """Build the K-NN graph of the background vectors and write it (index, I and D tables).

    IVF on CPU goes to :func:`lowshot.ivf_build.build` (resumable, shardable; its statistics).
    Otherwise the tables are produced block by block and appended to temporary files, renamed when
    complete: RAM holds one block of results, never the (nbg, K) tables.

    Parameters
    ----------
    xb : array float32 (nbg, d), raw background rows (read-only memmap)
    K : int
        Neighbours per vector (a power of two; 32 for k=30).
    paths : dict
        ``index``, ``I``, ``D``, ``record`` output paths (:func:`lowshot.stored_graph.graph_paths`), ``work`` for IVF on
        CPU (default: the I path + ``.work``).
    method : str or None
        One of METHODS; None = :func:`default_method`.
    build_params : dict or None
        IVF on CPU: ``bf16``, ``chunk_rows``, ``shard``, ``prepare_only``, ``force`` of ivf_build.build.
    record : callable or None
        A function of the statistics giving the graph's record (a dict), written beside the tables
        as they land (pending until the caller writes the final one, :mod:`lowshot.stored_graph`).
    backend : lowshot.torch_backend.Backend
        Where the scans and faiss' searches run.
    **index_params
        Passed to :func:`make_background_index`.

    Returns
    -------
    dict: method, times of the index build and the table search in seconds.
    """
    nbg, d = xb.shape
    if K > nbg:
        raise InputError("K = %d neighbours but the background has only %d vectors" % (K, nbg))
    method = method or default_method(nbg, backend)
    if method == "ivf" and backend.faiss_gpus == 0:
        # CPU: resumable and shardable, list by list (lowshot.ivf_build)
        paths = dict(paths)
        paths.setdefault("work", paths["I"] + ".work")
        return ivf_build.build(xb, K, paths, nlist=index_params.get("nlist"), nprobe=index_params.get("nprobe"),
                               record=record, backend=backend, **(build_params or {}))
    stats = {"method": method, "nbg": nbg, "K": K}
    t0 = time.time()
    log("building %s index over %d background vectors" % (method, nbg))
    index = make_background_index(xb, method, K=K, bs=bs, backend=backend, **index_params)
    stats["time_index"] = time.time() - t0
    t0 = time.time()
    _write_tables(index, xb, K, paths, method, bs, None if record is None else record(stats), backend)
    stats["time_search"] = time.time() - t0
    with atomic_output(paths["index"]) as tmp:
        log("writing %s" % paths["index"])
        faiss.write_index(index, tmp)
    return stats


def graph_recall(xb, I, nq=1000, at=10, seed=0, backend=torch_backend.CPU):
    """recall@at of a stored graph against exact search, on a random sample of its nodes.

    recall@at = mean over sampled nodes of |approx top-at ∩ exact top-at| / at.

    Parameters
    ----------
    xb : array float32 (nbg, d), raw background rows
    I : array int32 (nbg, K), the graph (memmap)
    """
    nbg = xb.shape[0]
    at = min(at, I.shape[1], nbg)
    rs = np.random.RandomState(seed)
    sample = np.sort(rs.choice(nbg, min(nq, nbg), replace=False))
    _, Igt, _ = exact_search(normalized(xb[sample]), xb, at, raw_base=True, backend=backend)
    return recall_at(np.asarray(I[sample, :at]), Igt, at)


def ivf_agreement(index, xb, I, nq=1000, seed=0):
    """How often a table row equals the stored IVF index's own float32 search (faiss, the same
    probed lists): the check of the bf16 scan, on a random sample of rows.

    Returns (fraction of rows with the same set of ids, mean fraction of shared ids).
    """
    nbg, K = I.shape
    rs = np.random.RandomState(seed)
    sample = np.sort(rs.choice(nbg, min(nq, nbg), replace=False))
    _, Iref = index.search(normalized(xb[sample]), K)
    shared = [np.intersect1d(a[a >= 0], b[b >= 0]).size / max(1, (b >= 0).sum())
              for a, b in zip(np.asarray(I[sample]), Iref)]
    return float(np.mean(np.array(shared) == 1.0)), float(np.mean(shared))
