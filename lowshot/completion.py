"""Graph completion (``diffusion.py``): the k-NN graph over the nodes (labelled images, then the
background) and the test images' neighbours among them, with the 2018 code's exact searches into
the labelled set.

Sets (lowshot.graph's numbering): 0 the labelled images held in RAM -- the base-class images
(``B``, the first ``nbase`` rows: all the images of the base classes, the same for every run of a
split) then the run's own rows (``R``: its labelled novel-class images, then in-domain ones);
1 the background; 2 the test images. Searches:

======  ================================================================================
* -> 0  exact: graph_utils.KnnScan (bfloat16 products on AVX512-BF16 CPUs, the candidates
        re-scored in float32; float32 products elsewhere). The part into B (1->B, 2->B, B->B) does
        not depend on the run: it is computed once and kept under ``$DDIR/cache/completion``
        (:func:`base_searches`); a run then searches only R and merges.
0, 2->1 the stored background index (an IVF or HNSW index is approximate: its recall@10 is
        measured on a sample, :func:`bg_index_recall`)
1 -> 1  the stored background table
======  ================================================================================

Each row keeps the k largest similarities of its candidate lists; on equal similarities a
background candidate comes before a labelled one (the 2018 merge's strict >), and within set 0 the
lower id first.
``--node_index ivf|hnsw`` replaces the exact 1->0 search by an index over set 0 (faster without a
cache, approximate: recall logged).

Over 400 lines: the exact search, the cache of its run-independent part and the completion that
merges them share the sets' numbering and the merge order, kept in one place.
"""
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time

import faiss
import numpy as np

from lowshot import torch_backend
from lowshot.common import InputError, fsync_path, logger, mapped_output, temporary_path, write_json
from lowshot.progress import Progress
from lowshot.ivf_build import train_ivf
from lowshot.search import SEARCH_BS, _blocks, exact_search, knn_search, normalized, recall_at, to_gpus
from lowshot.stored_graph import check_table_rows

log = logger(__name__)

# Neighbours kept in the cache: a run with k <= CACHE_K reads the first k (the order is exact
# similarity then id, so the first k of the CACHE_K best are the k best)
CACHE_K = 32
CACHE_VERSION = 1
# Sampled queries for the recall of an approximate search: RECALL_PAIRS / N, between 100 and 1000
# (each costs N products and the sample reads all N rows: ~0.5 s at 1M, ~4 s at 10M)
RECALL_PAIRS = 2 * 10**8


def recall_sample_size(n, nq=None):
    return max(100, min(1000, RECALL_PAIRS // max(1, n))) if nq is None else nq


def merge_into(D, I, D2, I2, offset):
    """Rows of (D, I) become the k best of (D, I) U (D2, I2 + offset), in place (graph_utils'
    merge: the first table's candidate first on ties)."""
    import graph_utils
    graph_utils.merge_knn_results(D, I, D2, I2, offset)


def _bg_first(D1, I1, n0, D0=None, I0=None):
    """The k best of background candidates (ids + n0 as node ids) and set-0 candidates (D0, I0,
    node ids), the background one first on equal similarities as in the 2018 merge (strict >)."""
    D = np.array(D1, dtype=np.float32)
    I = np.where(I1 >= 0, I1 + n0, -1).astype(np.int32)
    if D0 is not None:
        merge_into(D, I, D0, I0, 0)
    return D, I


############################################################################################
# The run-independent searches into the base-class images, cached
############################################################################################


def _digest(a):
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def background_signature(x):
    """The background file's identity: path, size, modification time and 64 sampled rows."""
    path = getattr(x, "filename", None)
    sig = {"rows": int(x.shape[0]), "d": int(x.shape[1])}
    if path is not None:
        st = os.stat(path)
        sig.update(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)
    rows = np.unique(np.linspace(0, x.shape[0] - 1, 64).astype(np.int64))
    sig["sample"] = _digest(np.asarray(x[rows], dtype=np.float32))
    return sig


def cache_dir(root, xB, xt, bg_x, kc):
    """Where the searches into xB are kept, and the signature of their inputs: the base-class
    and test vectors as the run computed them (after PCA and normalisation: a changed feature
    file, split or PCA changes them) and the background file. The folder's name holds a hash of
    the signature, so changed inputs never meet an old cache."""
    sig = {"version": CACHE_VERSION, "kc": int(kc), "base": [int(xB.shape[0]), _digest(xB)],
           "test": [int(xt.shape[0]), _digest(xt)],
           "background": None if bg_x is None else background_signature(bg_x)}
    h = hashlib.blake2b(json.dumps(sig, sort_keys=True).encode(), digest_size=8).hexdigest()
    nbg = 0 if bg_x is None else bg_x.shape[0]
    return os.path.join(root, "completion", "nbase%d_nbg%d_k%d_%s" % (xB.shape[0], nbg, kc, h)), sig


def _open_cache(path, sig):
    """The cached tables, or None when the folder is missing, incomplete or for other inputs."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("signature") != sig:
        return None
    kc = sig["kc"]
    tables = {}
    for name, rows in meta["rows"].items():
        files = [os.path.join(path, "%s.%s" % (name, ext)) for ext in ("D", "I")]
        if not all(os.path.isfile(f) and os.path.getsize(f) == rows * kc * 4 for f in files):
            return None
        tables[name] = (np.memmap(files[0], dtype=np.float32, mode="r", shape=(rows, kc)),
                        np.memmap(files[1], dtype=np.int32, mode="r", shape=(rows, kc)))
        nbase = sig["base"][0]
        for i0, i1 in _blocks(rows, 2**20):         # ids of base-class images, or -1: else damaged
            ids = tables[name][1][i0:i1]
            if ids.size and (ids.min() < -1 or ids.max() >= nbase):
                log("completion cache %s: %s holds ids outside 0..%d: damaged" % (path, files[1], nbase - 1))
                return None
    return tables


def _build_cache(path, sig, xB, xt, bg_x, kc, backend):
    """Compute the three searches into a temporary folder next to ``path`` and rename it."""
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    rows = {"B": xB.shape[0], "T": xt.shape[0], "1": 0 if bg_x is None else bg_x.shape[0]}
    uncertain = 0
    try:
        for name, xq, pre in (("B", xB, None), ("T", xt, None), ("1", bg_x, lambda x: normalized(x, "background"))):
            if xq is None:
                continue
            log("completion cache: %s -> base-class images (%d x %d)" % (
                {"B": "base", "T": "test", "1": "background"}[name], xq.shape[0], xB.shape[0]))
            # blocks reserved first: a full disk is an error here, not a SIGBUS in the search
            out = tuple(mapped_output(os.path.join(tmp, "%s.%s" % (name, ext)), dt, (xq.shape[0], kc),
                                      name=os.path.join(path, "%s.%s" % (name, ext)))
                        for ext, dt in (("D", np.float32), ("I", np.int32)))
            progress = Progress("cache " + name, xq.shape[0], emit=log)
            uncertain += exact_search(xq, xB, kc, preproc=pre, out=out, progress=progress, backend=backend)[2]
            for a in out:
                a.flush()
                fsync_path(a.filename)
            del out
        write_json(os.path.join(tmp, "meta.json"), {"signature": sig, "rows": {k: v for k, v in rows.items() if v},
                                                    "seconds": round(time.time() - t0, 2),
                                                    "uncertain_rows": int(uncertain)})
        try:
            os.rename(tmp, path)
        except OSError:      # another process published it first (same inputs, same bytes)
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(os.path.dirname(path), directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log("completion cache written: %s (%.1f s)" % (path, time.time() - t0))


def base_searches(root, xB, xt, bg_x, kc=CACHE_K, backend=torch_backend.CPU):
    """The k nearest base-class images (exact) of the base-class, test and background vectors,
    from the cache under ``root`` or computed there first.

    Concurrent runs (Slurm array tasks) share it: one computes it under a lock while the others
    wait, then all read it; it is written to a temporary folder renamed into place, so a killed run
    leaves nothing half-written (its temporary folder is removed by the next build). Under a root
    that cannot be written (a read-only data root) a complete cache is read as it is; without one
    the run goes without it.

    Returns ({"B": (D, I), "T": (D, I), "1": (D, I)} read-only memmaps of (rows, kc), info dict:
    ``cache`` its folder, ``cache_built``), or (None, {}) without a cache.
    """
    path, sig = cache_dir(root, xB, xt, bg_x, kc)
    tables = _open_cache(path, sig)
    info = {"cache": path, "cache_built": False}
    if tables is None and not _writable(path):
        log("%s is not writable (a read-only data root?) and holds no complete completion cache for "
            "these inputs: graph completion runs without it (a writable cache folder keeps it)" % root)
        return None, {}
    if tables is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a+") as lock:
            try:                                   # POSIX lock: also across NFS clients
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log("completion cache %s is being computed by another run: waiting for it" % path)
                fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                tables = _open_cache(path, sig)
                if tables is None:
                    _remove_dead_temporaries(path)
                    if os.path.exists(path):       # incomplete or damaged: replaced
                        log("completion cache %s is incomplete: computed again" % path)
                        shutil.rmtree(path)
                    _build_cache(path, sig, xB, xt, bg_x, kc, backend)
                    info["cache_built"] = True
                    tables = _open_cache(path, sig)
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)
        if tables is None:
            raise InputError("completion cache %s could not be read back after writing it" % path)
    else:
        log("completion cache: %s" % path)
    return tables, info


def _writable(path):
    """Whether the cache folder ``path`` can be made: its nearest existing ancestor is writable
    (os.access is also False on a read-only mount, EROFS)."""
    top = path
    while not os.path.exists(top) and top != os.path.dirname(top):
        top = os.path.dirname(top)
    return os.access(top, os.W_OK)


def _remove_dead_temporaries(path):
    """Temporary folders of builds that died (we hold the lock: no build is alive)."""
    parent, base = os.path.dirname(path), os.path.basename(path)
    for f in os.listdir(parent):
        if f.startswith(".%s.tmp" % base):
            shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
            log("removed %s, left by a build that did not finish" % os.path.join(parent, f))


############################################################################################
# Approximate indexes and their recall
############################################################################################


def make_node_index(x0, method, nprobe=16, hnsw_M=32, ef_search=64, backend=torch_backend.CPU):
    """An approximate index over set 0 for the background -> set 0 search (``--node_index ivf`` or
    ``hnsw``; IVF: 4 sqrt(n0) lists). Returns (index, description)."""
    n0, d = x0.shape
    if method == "ivf":
        nlist = max(1, min(n0 // 39, int(4 * np.sqrt(n0))))
        # faiss' k-means on every row of x0, an inner-product quantizer
        index = train_ivf(x0, nlist, points_per_list=None, quantizer_metric=faiss.METRIC_INNER_PRODUCT,
                          backend=backend)
        index.add(x0)
        index.nprobe = min(nprobe, nlist)
        desc = "IVF%d,Flat nprobe=%d" % (nlist, index.nprobe)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        index.add(x0)
        desc = "HNSW%d efSearch=%d" % (hnsw_M, ef_search)
    else:
        raise InputError("unknown labelled-set index %r (expected exact, ivf or hnsw)" % method)
    if method == "ivf" and backend.faiss_gpus > 0:
        index = to_gpus(index, backend.faiss_gpus, shard=False)
    return index, desc


def bg_index_recall(index, bg_x, xq, nq=None, seed=0, backend=torch_backend.CPU):
    """recall@10 of the stored background index for queries from outside the background (a sample
    of the labelled and test vectors ``xq``) against exact search of the raw rows. nq: sampled
    queries (default :func:`recall_sample_size`: 200 at 1M, 100 from 2M)."""
    nbg = bg_x.shape[0]
    nq = recall_sample_size(nbg, nq)
    rs = np.random.RandomState(seed)
    sample = np.sort(rs.choice(xq.shape[0], min(nq, xq.shape[0]), replace=False))
    q = np.ascontiguousarray(xq[sample])
    _, Igt, _ = exact_search(q, bg_x, 10, raw_base=True, backend=backend)
    _, Ia = knn_search(index, q, 10, backend=backend)
    return recall_at(Ia, Igt), len(sample)


def search_nodes(xq, x0, k, index1=None, bs=SEARCH_BS, backend=torch_backend.CPU):
    """The graph neighbours of new rows (the 2018 one-hop scoring of test images): exact search into
    set 0 and the background index, merged as :func:`complete_graph` merges its 2 -> 0 and 2 -> 1
    searches (a background candidate first on equal similarities).

    Parameters
    ----------
    xq : ndarray float32 (nq, d), normalised queries
    x0 : ndarray float32 (n0, d), normalised set-0 vectors (node ids 0..n0-1)
    index1 : faiss index over the normalised background (node ids n0..), or None

    Returns
    -------
    I : ndarray int32 (nq, k), node ids (-1 where fewer than k nodes exist)
    """
    D, I, _ = exact_search(xq, x0, k, backend=backend)
    if index1 is not None:
        D, I = _bg_first(*knn_search(index1, xq, k, bs, backend=backend), x0.shape[0], D, I)
    return I


############################################################################################
# The completion
############################################################################################


@dataclasses.dataclass
class Background:
    """Set 1 of the completion: the background's raw rows, its stored index and k-NN tables.

    Attributes
    ----------
    x : array (nbg, d) float32, raw rows (a memmap)
    index : faiss index of the normalised rows, or None once :meth:`take_index` gave it away
    D, I : arrays (nbg, K >= k) float32 / int32 (int64 in a 2018 .npy table), the stored table
    I_path : str, the name of the I table in messages
    exact_index : bool, True when the index is exact (no recall to measure)
    """
    x: object
    index: object
    D: object
    I: object
    I_path: str = "I table"
    exact_index: bool = False

    def take_index(self):
        """The index, no longer referenced here: :func:`complete_graph` frees its memory (nbg d
        floats) before the background pass when the caller holds no other reference."""
        index, self.index = self.index, None
        return index


def complete_graph(x0, xt, k, bg=None, node_index="exact", node_nprobe=16, nbase=0, cache_root=None,
                   bs=SEARCH_BS, recall_nq=None, D_out=None, backend=torch_backend.CPU):
    """The k-NN graph over the nodes (set 0, then background) and the test images' graph neighbours.

    Parameters
    ----------
    x0 : ndarray float32 (n0, d), normalised node vectors held in RAM: the ``nbase`` base-class
        images first (the same for every run of a split), then the run's own rows
    xt : ndarray float32 (nt, d), normalised test vectors
    k : int
    bg : Background or None
        The background; its index is taken (:meth:`Background.take_index`) once searched. None: no
        background.
    node_index : "exact" (default) or an approximate index over set 0 for the 1 -> 0 search
        ("ivf", "hnsw", :func:`make_node_index`)
    nbase, cache_root : with nbase > 0, cache_root and exact search, the searches into x0[:nbase]
        come from :func:`base_searches` (when its cache exists or can be written)
    recall_nq : sampled queries for the recall of approximate searches (None: default, 0: skip)
    D_out : array float32 (n0 + nbg, k) or None
        Receives the similarities of ``I_nodes`` (edge weights other than binary need them).
    backend : lowshot.torch_backend.Backend, where the exact scans run

    Returns
    -------
    I_nodes : ndarray int32 (n0 + nbg, k), node ids; -1 where fewer than k were found
    I_test : ndarray int32 (nt, k), node ids
    info : dict, timings, the searches used, recalls of approximate ones, the cache used
    """
    n0, nbg = _check_sizes(x0, k, bg)
    node_index = "exact" if node_index == "auto" else node_index
    t0 = time.time()
    use_cache = node_index == "exact" and cache_root is not None and nbase > 0 and k <= CACHE_K
    set0, cinfo = _SetZero.cached_or_not(x0, xt, k, bg, nbase if use_cache else 0, cache_root, backend)
    info = dict({"node_index": "exact" if node_index == "exact" else None}, **cinfo, time_cache=time.time() - t0)
    t0 = time.time()
    log("searching 0->0 and 2->0 exactly (%d labelled%s, %d test; %s)" % (
        n0, ", %d of them cached" % set0.nbase if set0.nbase else "", xt.shape[0], backend.describe()))
    (D_00, I_00), (D_20, I_20) = set0.nodes(), set0.rows(xt, "T")
    info["time_search_0"] = time.time() - t0
    I_nodes = np.empty((n0 + nbg, k), dtype=np.int32)
    if bg is not None:
        t0 = time.time()
        (D_00, I_00), (D_20, I_20), recall = _searches_into_1(bg, x0, xt, k, (D_00, I_00), (D_20, I_20), bs,
                                                              recall_nq, backend)
        info.update(recall)
        info["time_search_01"] = time.time() - t0
    I_nodes[:n0] = I_00
    if D_out is not None:
        D_out[:n0] = D_00
    del D_00, I_00
    if bg is not None:
        t0 = time.time()
        info.update(_background_rows(bg, x0, set0, k, node_index, node_nprobe, (I_nodes, D_out), bs,
                                     recall_nq, backend))
        info["time_search_10"] = time.time() - t0
    info["rows_beyond_bf16_bound"] = set0.uncertain
    return I_nodes, I_20, info


def _check_sizes(x0, k, bg):
    """(n0, nbg) of a completion with k < n0 + nbg neighbours, and K >= k in the background table."""
    n0, nbg = x0.shape[0], 0 if bg is None else bg.x.shape[0]
    if k >= n0 + nbg:
        raise InputError("k = %d but the graph has only %d nodes (%d labelled/in-domain + %d "
                         "background): need k < number of nodes" % (k, n0 + nbg, n0, nbg))
    if bg is not None and bg.I.shape[1] < k:
        raise InputError("background graph has K = %d < k = %d" % (bg.I.shape[1], k))
    return n0, nbg


class _SetZero:
    """Exact searches into set 0: the cached part into its first ``nbase`` rows (base-class
    images) merged with a search of the rest (R). ``uncertain`` counts the rows of all its searches
    beyond the bfloat16 error bound."""

    def __init__(self, x0, k, backend, nbase=0, cached=None):
        self.x0, self.k, self.backend, self.nbase, self.cached = x0, k, backend, nbase, cached
        self.xB, self.xR = x0[:nbase], np.ascontiguousarray(x0[nbase:])
        self.uncertain = 0

    @classmethod
    def cached_or_not(cls, x0, xt, k, bg, nbase, cache_root, backend):
        """With nbase > 0, the cached searches into x0[:nbase] (:func:`base_searches`) when a cache
        exists or can be written, else searches of all of x0; and the cache's info."""
        tables, info = None, {}
        if nbase:
            tables, info = base_searches(cache_root, x0[:nbase], xt, None if bg is None else bg.x, backend=backend)
        if tables is None:
            return cls(x0, k, backend), info
        return cls(x0, k, backend, nbase, tables), info

    def search(self, xq, X, floor=None):
        D, I, u = exact_search(xq, X, self.k, floor=floor, backend=self.backend)
        self.uncertain += u
        return D, I

    def cached_rows(self, name, i0, i1):
        """Rows i0:i1 of the cached table ``name``, copies (merged into in place)."""
        k = self.k
        return (np.array(self.cached[name][0][i0:i1, :k], dtype=np.float32, order="C"),
                np.array(self.cached[name][1][i0:i1, :k], dtype=np.int32, order="C"))

    def rows(self, xq, name, i0=0, i1=None):
        """k best of set 0 for rows i0:i1 of xq: the cached B part merged with a search of R."""
        i1 = xq.shape[0] if i1 is None else i1
        D, I = self.search(xq[i0:i1], self.xR)
        if self.cached is None:
            return D, I
        DB, IB = self.cached_rows(name, i0, i1)
        merge_into(DB, IB, D, I, self.nbase)
        return DB, IB

    def nodes(self):
        """0 -> 0: (D, I) (n0, k)."""
        nbase, n0 = self.nbase, self.x0.shape[0]
        D = np.empty((n0, self.k), dtype=np.float32)
        I = np.empty((n0, self.k), dtype=np.int32)
        if nbase:
            D[:nbase], I[:nbase] = self.rows(self.x0, "B", i1=nbase)
        DRR, IRR = self.search(self.xR, self.xR)          # R's rows: R candidates (ids from nbase)
        if nbase:                                          # and B candidates
            DRB, IRB = self.search(self.xR, self.xB)
            merge_into(DRB, IRB, DRR, IRR, nbase)
            DRR, IRR = DRB, IRB
        else:
            IRR[IRR >= 0] += nbase
        D[nbase:], I[nbase:] = DRR, IRR
        return D, I


def _searches_into_1(bg, x0, xt, k, DI_00, DI_20, bs, recall_nq, backend):
    """0 -> 1 and 2 -> 1 in the background index, merged into the searches into set 0 (a
    background candidate first on equal similarities). Returns the merged (D, I) of set 0 and of
    the test rows, and the index's recall when measured."""
    n0 = x0.shape[0]
    log("searching 0->1 and 2->1 in the background index")
    index1 = bg.take_index()
    D_01, I_01 = knn_search(index1, x0, k, bs, backend=backend)
    D_21, I_21 = knn_search(index1, xt, k, bs, backend=backend)
    recall = {}
    if not bg.exact_index and recall_nq != 0:
        r, nq = bg_index_recall(index1, bg.x, np.vstack([x0, xt]), recall_nq, backend=backend)
        recall["bg_index_recall@10"] = round(r, 4)
        log("background index recall@10 = %.4f (%d sampled labelled and test vectors, exact "
            "search of the raw rows)" % (r, nq))
    del index1    # its vectors (nbg * d floats) are not needed for the background pass
    return _bg_first(D_01, I_01, n0, *DI_00), _bg_first(D_21, I_21, n0, *DI_20), recall


def _background_rows(bg, x0, set0, k, node_index, node_nprobe, out, bs, recall_nq, backend):
    """1 -> 0 for every background row, merged with its stored 1 -> 1 row, into rows n0.. of
    ``out`` = (I_nodes, D_out or None). Returns the info of the node index, when one is used."""
    I_nodes, D_out = out
    n0, nbg = x0.shape[0], bg.x.shape[0]
    info = {"node_index": "exact"}
    index0 = None
    if node_index != "exact":
        index0, info["node_index"] = make_node_index(x0, node_index, nprobe=node_nprobe, backend=backend)
    log("searching 1->0 for %d background vectors (%s; %s), merging with the stored 1->1 table" % (
        nbg, info["node_index"] + (", base-class part cached" if set0.cached is not None else ""),
        backend.describe()))
    progress = Progress("background rows", nbg, every=10.0, emit=log)
    for i0, i1 in _blocks(nbg, bs):
        D_11 = np.ascontiguousarray(bg.D[i0:i1, :k])
        I_11 = np.asarray(bg.I[i0:i1, :k])          # int32, or int64 in a 2018 .npy table
        check_table_rows(D_11, I_11, nbg, i0, getattr(bg.D, "filename", "D table"), bg.I_path)
        I_11 = np.ascontiguousarray(I_11, dtype=np.int32)
        q = normalized(bg.x[i0:i1], "background")
        if index0 is not None:
            D_10, I_10 = _bg_first(D_11, I_11, n0, *knn_search(index0, q, k, bs, backend=backend))
        else:
            # the background table and the cached base-class part first: a row of R can only
            # enter above their k-th similarity, so nearly all are rejected at one comparison
            D_10, I_10 = _bg_first(D_11, I_11, n0, *(set0.cached_rows("1", i0, i1) if set0.cached is not None
                                                     else (None, None)))
            D_1R, I_1R = set0.search(q, set0.xR, floor=D_10[:, k - 1])
            merge_into(D_10, I_10, D_1R, I_1R, set0.nbase)
        I_nodes[n0 + i0:n0 + i1] = I_10
        if D_out is not None:
            D_out[n0 + i0:n0 + i1] = D_10
        progress.update(i1)
    if index0 is not None and recall_nq != 0:
        nq = recall_sample_size(n0, recall_nq)
        rows = np.sort(np.random.RandomState(0).choice(nbg, min(nq, nbg), replace=False))
        q = normalized(bg.x[rows], "background")
        _, Ia = knn_search(index0, q, 10, backend=backend)
        _, Igt, _ = exact_search(q, x0, 10, backend=backend)
        info["node_index_recall@10"] = round(recall_at(Ia, Igt), 4)
        log("node index recall@10 = %.4f (%d sampled background vectors, exact search of set 0)" % (
            info["node_index_recall@10"], len(rows)))
    return info
