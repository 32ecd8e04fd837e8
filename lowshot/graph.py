"""The background graph (``build_graph.py``): methods and their defaults, build, recall, and finding
and reading a stored graph. The search primitives are in lowshot/search.py, the resumable CPU IVF
build in lowshot/ivf_build.py, the completion with the labelled and test images (``diffusion.py``)
in lowshot/completion.py.

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

Nothing is read at import time; faiss' GPU code is used when ``torch_backend.faiss_gpus() > 0``, the
scans go through ``torch_backend.knn_scan`` (graph_utils, or torch on a GPU: ``--device``).

About 400 lines: the methods' defaults are kept next to the measurements behind them.
"""
import os
import time

import faiss
import numpy as np

from lowshot import data, torch_backend
from lowshot.common import InputError, atomic_output, log, require_file
from lowshot.search import SEARCH_BS, _blocks, exact_knn, knn_search, normalized, to_gpus

METHODS = ("exact", "ivf", "hnsw", "nndescent")

# Background graph, CPU: exact search up to this size, IVF above, searched list by list
# (lowshot/ivf_build.py). The measurements behind these choices are in docs/scale.md ("Scale" and
# "Background graph"), from benchmarks/bench_build_graph.py: at 1M on 2 cores the IVF graph with
# bf16 products takes about a minute for recall@10 0.988; HNSW's per-query search misses near
# ties (0.910 at 1M); NN-descent's own graph is good but its index answers queries from outside
# the background poorly (recall@10 0.57 at 100k), which breaks graph completion: never the default.
# Exact costs N^2: below ~50k it takes seconds.
EXACT_MAX_CPU = 50000
# IVF on CPU: 4 sqrt(N) lists, enough of them visited to scan about IVF_SCAN vectors per query.
# Finer lists find more neighbours for the same scanned pairs (generated F1M, 1000 queries,
# benchmarks/bench_ivf_recall.py --nlists 2000,4000,8000 --scan 12000: 25.5k pairs/query, recall@10
# 0.968; 26.9k, 0.985; 24.2k, 0.992), but k-means costs nlist^2 and the probes N nlist.
# The same nominal scan finds fewer neighbours in a larger set (recall@10 0.985 at 1M, 0.940 at 10M
# with 16000), so above 1M it grows as N^(1/6): 23.5k at 10M, where recall@10 reaches 0.95
# (benchmarks/bench_ivf_recall.py --nprobes 21,28,35 at 10M: 0.9403, 0.9495, 0.9580)
IVF_LISTS_PER_SQRT = 4
IVF_SCAN = 16000
IVF_SCAN_GROWTH = 1 / 6
# With GPUs, exact search is cheap up to ~1M; above, IVF as in the 2018 original.
EXACT_MAX_GPU = 10**6

def graph_K(k):
    """K, the smallest power of two >= k: the number of neighbours stored for a graph built for k."""
    if k < 1:
        raise InputError("k = %d: need at least 1 neighbour" % k)
    K = 1
    while K < k:
        K *= 2
    return K


############################################################################################
# Background graph (build_graph.py)
############################################################################################


def default_method(nbg, ngpu=None):
    """The background-graph method chosen by measurement (see EXACT_MAX_CPU / EXACT_MAX_GPU)."""
    ngpu = torch_backend.faiss_gpus() if ngpu is None else ngpu
    if ngpu > 0 or torch_backend.active() == "cuda":
        return "exact" if nbg <= EXACT_MAX_GPU else "ivf"
    return "exact" if nbg <= EXACT_MAX_CPU else "ivf"


def _add_normalized(index, xb, bs, what):
    for i0, i1 in _blocks(xb.shape[0], bs):
        index.add(normalized(xb[i0:i1], "%s rows %d:%d" % (what, i0, i1)))


def default_nlist(nbg, ngpu=None):
    """IVF lists for nbg vectors: IVF_LISTS_PER_SQRT * sqrt(nbg) (4 * sqrt(nbg) with GPUs, the original)."""
    ngpu = torch_backend.faiss_gpus() if ngpu is None else ngpu
    f = 4 if ngpu > 0 else IVF_LISTS_PER_SQRT
    return int(max(1, min(nbg, round(f * np.sqrt(nbg)))))


def default_nprobe(nbg, nlist, ngpu=None):
    """IVF lists visited per query: 256 with GPUs (the original); on CPU enough lists to scan about
    IVF_SCAN vectors, times (N / 1M)^IVF_SCAN_GROWTH above 1M (at the default number of lists: 203
    of 1265 at 100k, 64 of 4000 at 1M, 30 of 12649 at 10M, 14 of 40000 at 100M)."""
    ngpu = torch_backend.faiss_gpus() if ngpu is None else ngpu
    if ngpu > 0:
        return min(256, nlist)
    scan = IVF_SCAN * max(1.0, nbg / 1e6) ** IVF_SCAN_GROWTH
    return int(min(nlist, max(1, np.ceil(scan * nlist / float(nbg) - 1e-9))))


def train_ivf(xb, nlist, what="background", seed=1234):
    """An empty ``IndexIVFFlat`` (inner product, L2 k-means quantizer) trained on a sample of xb.

    k-means runs on 64 vectors per list at most (faiss samples 256 per centroid at most; 64 give
    lists as good for the search), normalised like the stored vectors.
    """
    nbg, d = xb.shape
    nlist = int(min(max(1, nlist), nbg))
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.niter = 10       # k-means quality barely moves the search's recall (measured at 1M)
    ntrain = min(nbg, 64 * nlist)
    rs = np.random.RandomState(seed)
    sample = np.sort(rs.choice(nbg, ntrain, replace=False))
    if torch_backend.faiss_gpus() > 0:
        index.clustering_index = to_gpus(faiss.IndexFlatL2(d))
    log("training IVF%d on %d vectors" % (nlist, ntrain))
    index.train(normalized(xb[sample], what))
    return index


def make_background_index(xb, method, K=32, nlist=None, nprobe=None, hnsw_M=32, ef_search=64,
                          ef_construction=40, nnd_iter=10, nnd_L=None, nnd_search_L=None,
                          bs=SEARCH_BS, what="background"):
    """Build the index over the (normalised) background vectors.

    Parameters
    ----------
    xb : array float32 (nbg, d), raw background rows (a read-only memmap); normalised by blocks
    method : {"exact", "ivf", "hnsw", "nndescent"}
        exact: ``IndexFlatIP``. ivf: ``IndexIVFFlat`` with ``nlist`` lists visited ``nprobe`` at a
        time (None: :func:`default_nlist`, :func:`default_nprobe`). hnsw: ``IndexHNSWFlat`` (``hnsw_M``, ``ef_search``). nndescent:
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
        index = train_ivf(xb, nlist or default_nlist(nbg), what)
        index.nprobe = min(nprobe or default_nprobe(nbg, index.nlist), index.nlist)
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


def _write_tables(index, xb, K, paths, method, bs):
    """Search every background vector in ``index`` by blocks, appending the results to the tables."""
    nbg = xb.shape[0]
    t0 = time.time()
    search_index = index
    if method in ("exact", "ivf") and torch_backend.faiss_gpus() > 0:
        log("moving the index to %d GPUs" % torch_backend.faiss_gpus())
        search_index = to_gpus(index, shard=True)
    with atomic_output(paths["I"]) as tmpI, atomic_output(paths["D"]) as tmpD:
        with open(tmpI, "wb") as fI, open(tmpD, "wb") as fD:
            if method == "nndescent":
                blocks = _nndescent_tables(index, K, bs)
            elif method == "exact" and torch_backend.active():
                blocks = torch_backend.exact_blocks(xb, K, bs, lambda x: normalized(x, "background"))
            else:
                def preproc(x):
                    return normalized(x, "background")
                blocks = ((i0, i1) + knn_search(search_index, xb[i0:i1], K, bs, preproc)
                          for i0, i1 in _blocks(nbg, bs))
            tlast = time.time()
            for i0, i1, D, I in blocks:
                fD.write(np.ascontiguousarray(D, dtype=np.float32).tobytes())
                fI.write(np.ascontiguousarray(I, dtype=np.int32).tobytes())
                if time.time() - tlast > 10 or i1 == nbg:
                    tlast = time.time()
                    el = tlast - t0
                    log("graph rows %d / %d (%.0f rows/s)" % (i1, nbg, i1 / max(el, 1e-9)))


def build_background_graph(xb, K, paths, method=None, bs=SEARCH_BS, build_params=None, **index_params):
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
        ``index``, ``I``, ``D`` output paths (:func:`lowshot.data.graph_paths`), ``work`` for IVF on
        CPU (default: the I path + ``.work``).
    method : str or None
        One of METHODS; None = :func:`default_method`.
    build_params : dict or None
        IVF on CPU: ``bf16``, ``chunk_rows``, ``shard``, ``prepare_only``, ``force`` of ivf_build.build.
    **index_params
        Passed to :func:`make_background_index`.

    Returns
    -------
    dict: method, times of the index build and the table search in seconds.
    """
    nbg, d = xb.shape
    if K > nbg:
        raise InputError("K = %d neighbours but the background has only %d vectors" % (K, nbg))
    method = method or default_method(nbg)
    if method == "ivf" and torch_backend.faiss_gpus() == 0:
        # CPU: resumable and shardable, list by list (lowshot.ivf_build)
        from lowshot import ivf_build
        paths = dict(paths)
        paths.setdefault("work", paths["I"] + ".work")
        return ivf_build.build(xb, K, paths, nlist=index_params.get("nlist"), nprobe=index_params.get("nprobe"),
                               **(build_params or {}))
    stats = {"method": method, "nbg": nbg, "K": K}
    t0 = time.time()
    log("building %s index over %d background vectors" % (method, nbg))
    index = make_background_index(xb, method, K=K, bs=bs, **index_params)
    stats["time_index"] = time.time() - t0
    t0 = time.time()
    _write_tables(index, xb, K, paths, method, bs)
    stats["time_search"] = time.time() - t0
    with atomic_output(paths["index"]) as tmp:
        log("writing %s" % paths["index"])
        faiss.write_index(index, tmp)
    return stats


def graph_recall(xb, I, nq=1000, at=10, seed=0):
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
    _, Igt = exact_knn(normalized(xb[sample]), xb, at)
    Ia = np.asarray(I[sample, :at])
    hits = [np.intersect1d(a[a >= 0], g).size for a, g in zip(Ia, Igt)]
    return float(np.mean(hits)) / at


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


def find_background_graph(ddir, nbg, k):
    """Locate a stored background graph usable for k neighbours (any stored K' >= k, smallest first).

    Returns
    -------
    index_path : str
    D : numpy.memmap float32 (nbg, K') read-only
    I : numpy.memmap int32 (nbg, K') read-only
    """
    K = graph_K(k)
    cmd = "python build_graph.py %d --ddir %s" % (nbg, ddir)
    found = None
    while K <= 1024 and found is None:
        p = data.graph_paths(ddir, nbg, K)
        found = next((f for f in _table_names(p, K) if os.path.isfile(f[0]) and os.path.isfile(f[1])), None)
        K = K if found else 2 * K
    if found is None:
        p = data.graph_paths(ddir, nbg, graph_K(k))
        raise InputError("background graph %s (or a larger K) does not exist: make it with `%s`"
                         % (p["I"], cmd))
    require_file(p["index"], "background index (make it with `%s`)" % cmd)
    tabs = []
    for path, dts in ((found[1], (np.float32,)), (found[0], (np.int32, np.int64))):
        if path.endswith(".npy"):
            try:
                t = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise InputError("background graph %s is not a .npy array: %s" % (path, e))
            if t.ndim != 2 or t.shape[0] != nbg or t.shape[1] < K or t.dtype not in dts:
                raise InputError("background graph %s holds %s %s, expected (nbg, >= K) = (%d, >= %d) %s "
                                 "(rebuild it with `%s`)" % (path, t.dtype, t.shape, nbg, K,
                                                             " or ".join(np.dtype(d).name for d in dts), cmd))
            tabs.append(t)
            continue
        size = os.path.getsize(path)
        if size != nbg * K * 4:
            raise InputError("background graph %s has %d bytes, expected nbg*K*4 = %d*%d*4 = %d "
                             "(rebuild it with `%s`)" % (path, size, nbg, K, nbg * K * 4, cmd))
        tabs.append(np.memmap(path, dtype=dts[0], mode="r", shape=(nbg, K)))
    return p["index"], tabs[0], tabs[1]


def check_table_rows(D, I, nbg, row0=0, D_path="D table", I_path="I table"):
    """Check rows ``row0 ..`` of a stored background table as they are read (one vectorised pass):
    every id is -1 or a background id (< nbg), and where the id is valid the similarity is finite
    and no larger than the one before it (faiss' order; the -1 entries come last). A one-line
    InputError names the file, the first bad entry and the fix (a rebuild)."""
    fix = "the file is damaged, rebuild it with `build_graph.py %d --force`" % nbg
    bad = (I < -1) | (I >= nbg)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError("background graph %s: I[%d, %d] = %d is neither -1 nor a background id (< %d): %s" % (
            I_path, row0 + r, c, I[r, c], nbg, fix))
    valid = I >= 0
    with np.errstate(invalid="ignore"):
        bad = valid & ~np.isfinite(D)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise InputError("background graph %s: D[%d, %d] = %s is not a finite similarity: %s" % (
                D_path, row0 + r, c, D[r, c], fix))
        Dv = np.where(valid, D, -np.inf)
        bad = Dv[:, 1:] > Dv[:, :-1]
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError("background graph %s: row %d is not sorted by decreasing similarity (D[%d, %d] = %s < "
                         "D[%d, %d] = %s, or a neighbour after a -1 in %s): %s" % (
                             D_path, row0 + r, row0 + r, c, D[r, c], row0 + r, c + 1, D[r, c + 1], I_path, fix))


def _table_names(p, K):
    """The (I, D) file names a stored table may have, in the 2018 code's order: ``_I_11.npy`` /
    ``_D_11.npy``, then ``.int{K}`` / ``.float{K}`` (its raw files: the published
    ``ndis{N}_k32_I_11.int32``), then this project's ``.int32`` / ``.float32`` for any K."""
    bi, bd = p["I"][:-len(".int32")], p["D"][:-len(".float32")]
    return [(bi + ".npy", bd + ".npy"), (bi + ".int%d" % K, bd + ".float%d" % K), (p["I"], p["D"])]


def _is_ivf_file(path):
    """True when a faiss index file holds an IndexIVFFlat (its fourcc: "IwFl", or "IvFl" in old files)."""
    with open(path, "rb") as f:
        return f.read(4) in (b"IwFl", b"IvFl")


def read_background_index(path, nbg, d, nprobe=None, ef_search=None, search_L=None):
    """Read the stored background index, check it (``nbg`` vectors, of dimension ``d`` unless None),
    set search parameters, move it to GPUs if any."""
    try:
        # IVF on CPU: the lists stay in the file, memory-mapped (page cache, shared by the tasks of a
        # node, not the process' own memory: 10 GB at F10M)
        ivf_cpu = torch_backend.faiss_gpus() == 0 and _is_ivf_file(path)
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP if ivf_cpu else 0)
    except RuntimeError as e:
        raise InputError("background index %s cannot be read by faiss: %s" % (
            path, (str(e).strip().splitlines() or ["error"])[0]))
    if index.ntotal != nbg or (d is not None and index.d != d):
        raise InputError("background index %s holds %d vectors of d = %d, expected %d of d = %s" % (
            path, index.ntotal, index.d, nbg, "any" if d is None else d))
    if isinstance(index, faiss.IndexIVF) and nprobe:
        index.nprobe = nprobe
    if isinstance(index, faiss.IndexHNSW) and ef_search:
        index.hnsw.efSearch = ef_search
    if isinstance(index, faiss.IndexNNDescent):
        if search_L:
            index.nndescent.search_L = search_L
        log("WARNING: %s is an NN-descent index: its search of queries from outside the "
            "background (labelled and test images) is poor (recall@10 0.57 at 100k generated "
            "vectors, lower at 1M); rebuild with `build_graph.py %d --force --method hnsw`" % (
                path, nbg))
    if isinstance(index, (faiss.IndexFlat, faiss.IndexIVF)) and torch_backend.faiss_gpus() > 0:
        index = to_gpus(index, shard=True)
    return index
