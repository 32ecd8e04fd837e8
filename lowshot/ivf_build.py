"""The CPU background graph of ``build_graph.py --method ivf``: resumable, splittable into array tasks.

The table is each background vector's K nearest among the vectors of the IVF lists its search probes
(faiss' IVF search of every stored vector), computed list by list: every query probing list c is
scored against list c in one product (graph_utils.KnnScan: bfloat16 dot products with an exact
float32 re-score of the candidates where the CPU has AVX512-BF16, float32 products elsewhere).

The IVF defaults (:func:`default_nlist`, :func:`default_nprobe`) and the project's one IVF
training (:func:`train_ivf`) live here. Three steps, the work kept in
``knngraph/ndis{N}_k{K}.work/`` (``stored_graph.graph_paths(...)["work"]``):

=========  =====================================================================================
prepare    k-means (:func:`train_ivf`, :func:`kmeans`), then every vector's probed lists, nearest
           first (its own list is the first). Writes ``prepare.json`` (its parameters),
           ``quantizer.index`` and ``probes.int32`` (N x nprobe), checkpoints that a rerun
           reuses, then ``lists.float32`` (N x d normalised vectors in list order),
           ``list_ids.int32`` (N), ``list_offsets.int64`` (nlist + 1), then ``plan.json`` (the
           step is done). A disk error before any chunk removes the work folder it created.
chunk j    rows ``[j C, (j + 1) C)`` of the table (C = ``plan["chunk_rows"]``): ``chunk{j}.I``,
           ``chunk{j}.D``. Independent of each other: ``--shard i/S`` computes chunks i, i + S, ...
merge      the chunks concatenated into the published tables (with the graph's record, pending,
           :mod:`lowshot.stored_graph`), the faiss ``IndexIVFFlat`` (quantizer + lists, for
           diffusion.py) written, the work folder removed. Progress lines every 30 s
           (:class:`lowshot.progress.Progress`), within chunks too.
=========  =====================================================================================

Every file is written atomically (:func:`lowshot.common.atomic_output`): a run killed at any point
and run again redoes only the unfinished chunk, and ends with the same bytes as an uninterrupted one
(each chunk is a deterministic function of the prepared files). Temporaries of dead runs on this
host are removed at start.

Bytes per step (N vectors of d floats, nprobe probed lists, K neighbours, 4-byte values):
prepare reads the raw rows twice (sample, then all) and writes 4 N d + 4 N nprobe; a chunk of C
rows reads its C raw rows and every list (4 N d, from the page cache when it fits), holds
C (4 d + 2 d + 24 kp) bytes and writes 8 C K; merge reads and writes 8 N K + 4 N d.

Over 400 lines: the IVF defaults and training (:func:`default_nlist`, :func:`default_nprobe`,
:func:`probed_lists`, :func:`kmeans`, :func:`train_ivf`) are kept with the build whose measurements
chose them (docs/scale.md) and which uses them; the rest is the work folder's three steps.
"""
import json
import os
import shutil
import time

import faiss
import numpy as np

from lowshot.common import (InputError, anon_rss_gib, atomic_output, logger, mapped_output, remove_stale_temporaries,
                            write_json)
from lowshot import search, stored_graph, torch_backend
from lowshot.progress import Progress

log = logger(__name__)

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
PLAN_VERSION = 1
# Rows per chunk: the unit of resumption and of sharding. A chunk reads every list once (N d floats),
# so few large chunks read less; each holds ~(6 d + 24 kp) bytes per row in RAM (3 GiB at 1M rows).
CHUNK_ROWS_MIN = 2**17
CHUNK_ROWS_MAX = 2**20
# k-means: training vectors per list and iterations (the lists' quality barely moves the recall:
# 32 or 64 vectors per list, 10 or 20 iterations gave the same recall@10 at 1M)
KMEANS_POINTS = 32
KMEANS_ITER = 10


def default_nlist(nbg, ngpu=0):
    """IVF lists for nbg vectors: IVF_LISTS_PER_SQRT * sqrt(nbg) (4 * sqrt(nbg) with GPUs, the original)."""
    f = 4 if ngpu > 0 else IVF_LISTS_PER_SQRT
    return int(max(1, min(nbg, round(f * np.sqrt(nbg)))))


def default_nprobe(nbg, nlist, ngpu=0):
    """IVF lists visited per query: 256 with GPUs (the original); on CPU enough lists to scan about
    IVF_SCAN vectors, times (N / 1M)^IVF_SCAN_GROWTH above 1M (at the default number of lists: 203
    of 1265 at 100k, 64 of 4000 at 1M, 30 of 12649 at 10M, 14 of 40000 at 100M)."""
    if ngpu > 0:
        return min(256, nlist)
    scan = IVF_SCAN * max(1.0, nbg / 1e6) ** IVF_SCAN_GROWTH
    return int(min(nlist, max(1, np.ceil(scan * nlist / float(nbg) - 1e-9))))


def default_chunk_rows(nbg):
    """About 8 chunks, between 2^17 and 2^20 rows (1M: 131072 rows; 10M and up: 2^20)."""
    c = -(-nbg // 8)
    return int(min(CHUNK_ROWS_MAX, max(CHUNK_ROWS_MIN, c)))


def _files(work):
    names = ("plan.json", "prepare.json", "quantizer.index", "lists.float32", "list_ids.int32",
             "list_offsets.int64", "probes.int32")
    return {n.split(".")[0]: os.path.join(work, n) for n in names}


def chunk_paths(work, j):
    return {"I": os.path.join(work, "chunk%05d.I" % j), "D": os.path.join(work, "chunk%05d.D" % j)}


def chunk_done(work, plan, j):
    """Both of chunk j's files are complete (``D`` is committed last: a run killed between the two
    renames leaves an ``I`` alone, and the chunk is computed again)."""
    rows = min(plan["chunk_rows"], plan["nbg"] - j * plan["chunk_rows"])
    return all(os.path.isfile(f) and os.path.getsize(f) == rows * plan["K"] * 4
               for f in chunk_paths(work, j).values())


def _input_signature(xb):
    path = getattr(xb, "filename", None)
    if path is None:
        return {"path": None}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": int(st.st_mtime)}


class DamagedWork(InputError):
    """A work folder whose ``plan.json`` or prepared files are not what the prepare step wrote (a
    corrupt plan, a truncated list file). ``plan``: the readable plan, or None."""

    def __init__(self, message, plan=None):
        super().__init__(message)
        self.plan = plan


_PLAN_KEYS = ("version", "nbg", "d", "K", "nlist", "nprobe", "precision", "kp", "chunk_rows", "nchunks", "input")


def read_plan(work):
    """The plan of a prepared work folder, or None when the prepare step has not completed.

    Raises :class:`DamagedWork` when ``plan.json`` cannot be read or a prepared file has not the
    size the plan gives it (checked on every read: a memory map of a truncated file fails later)."""
    f = _files(work)
    if not os.path.isfile(f["plan"]):
        return None
    try:
        with open(f["plan"]) as fh:
            plan = json.load(fh)
        missing = [k for k in _PLAN_KEYS if k not in plan] if isinstance(plan, dict) else ["all"]
        if missing:
            raise ValueError("keys %s missing" % ", ".join(missing))
        nbg, d, nlist, nprobe = (int(plan[k]) for k in ("nbg", "d", "nlist", "nprobe"))
    except (OSError, ValueError, TypeError) as e:
        raise DamagedWork("the work folder %s is damaged: %s cannot be read (%s)" % (work, f["plan"], e))
    sizes = {"lists": 4 * nbg * d, "list_ids": 4 * nbg, "list_offsets": 8 * (nlist + 1), "probes": 4 * nbg * nprobe}
    for name, size in sizes.items():
        have = os.path.getsize(f[name]) if os.path.isfile(f[name]) else None
        if have != size:
            raise DamagedWork("the work folder %s is damaged: %s %s, expected %d bytes" % (
                work, f[name], "is missing" if have is None else "has %d bytes" % have, size), plan)
    if not os.path.isfile(f["quantizer"]):
        raise DamagedWork("the work folder %s is damaged: %s is missing" % (work, f["quantizer"]), plan)
    return plan


def _repair(work, e, shard, nbg):
    """After :class:`DamagedWork` ``e``: remove the prepared files (and the chunks when the plan
    itself is unreadable), so that the prepare step runs again. Returns the old plan (or None)."""
    if shard is not None:
        raise InputError("%s: run the prepare step (`build_graph.py %d --prepare`, one task) again before the "
                         "shard tasks" % (e, nbg))
    log("%s: the prepare step is done again%s" % (e, "" if e.plan else ", and the chunks computed again"))
    if e.plan is None:
        shutil.rmtree(work)
        return None
    for path in _files(work).values():
        if os.path.exists(path):
            os.remove(path)
    return e.plan


def check_plan(plan, want, work):
    """Refuse a work folder prepared with other parameters than ``want`` (one-line InputError)."""
    for key, val in want.items():
        if val is not None and plan.get(key) != val:
            raise InputError("%s was prepared with %s = %s, not %s: rerun with the same parameters, or "
                             "with --force to start again" % (work, key, plan.get(key), val))


def probed_lists(quantizer, x, nprobe, bf16, backend=torch_backend.CPU):
    """The nprobe lists nearest to each (normalised) row of x, nearest first, as faiss' L2 quantizer
    ranks them: argmin ||x - c||^2 = argmax <x, c> - ||c||^2 / 2, one inner product with
    [x, 1] . [c, -||c||^2 / 2]. Scanned with KnnScan (bf16 where available, exact re-score)."""
    C = faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * quantizer.d).reshape(
        quantizer.ntotal, quantizer.d)
    n, d = x.shape
    dd = d + 2 if d % 2 == 0 else d + 1          # one extra column, padded to an even width
    Ca = np.zeros((C.shape[0], dd), dtype=np.float32)
    Ca[:, :d] = C
    Ca[:, d] = -0.5 * np.einsum("ij,ij->i", C, C)
    Xa = np.zeros((n, dd), dtype=np.float32)
    Xa[:, :d] = x
    Xa[:, d] = 1
    nprobe = min(nprobe, C.shape[0])
    # deferred: only the kept candidates near the cut are re-scored, at the end, instead of each
    # one as it enters (fewer exact products, the same lists)
    scan = backend.knn_scan(Xa, nprobe + (8 if bf16 else 0), bf16=bf16, deferred=True)
    scan.add(np.arange(n), Ca, np.arange(C.shape[0], dtype=np.int32))
    return scan.finish(nprobe, base=Ca)[1]


def kmeans(x, nlist, niter=KMEANS_ITER, bf16=True, seed=1234, backend=torch_backend.CPU):
    """Lloyd's k-means of the rows of x (float32, (n, d)) into nlist centroids, L2.

    faiss' k-means, with the assignment step on graph_utils.KnnScan (bf16 products, exact
    re-score: 5x faster than float32 BLAS on AVX512-BF16 CPUs). Starts from nlist distinct random
    rows; an empty cluster restarts at a random member of the largest one, as faiss does (without
    its perturbation). Deterministic for a given seed.
    """
    import scipy.sparse as sp

    n, d = x.shape
    rs = np.random.RandomState(seed)
    C = x[np.sort(rs.choice(n, nlist, replace=False))].astype(np.float32)
    for it in range(niter):
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(C)
        a = probed_lists(quantizer, x, 1, bf16, backend)[:, 0].astype(np.int64)
        counts = np.bincount(a, minlength=nlist)
        M = sp.csr_matrix((np.ones(n, dtype=np.float32), (a, np.arange(n))), shape=(nlist, n))
        sums = np.asarray(M @ x)
        nonempty = counts > 0
        C[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        for c in np.flatnonzero(~nonempty):
            big = int(np.argmax(counts))
            C[c] = x[rs.choice(np.flatnonzero(a == big))]
            counts[big] -= 1
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(C)
    return quantizer


def train_ivf(x, nlist, points_per_list=64, assign="faiss", quantizer_metric=faiss.METRIC_L2, seed=1234,
              what="background", backend=torch_backend.CPU):
    """An empty ``IndexIVFFlat`` (inner product), its quantizer trained by 10 iterations of k-means:
    the one IVF training of the project, whose callers differ in the parameters below.

    Parameters
    ----------
    x : array float32 (n, d), raw rows (a memmap): the sample is normalised like the stored vectors
    nlist : int, lists (clipped to 1 .. n)
    points_per_list : int or None
        k-means runs on ``points_per_list * nlist`` rows at most, drawn with ``seed`` (faiss samples
        256 per centroid at most; 64 give lists as good for the search, 32 for the resumable
        build). None: on every row of x, taken as they are (already normalised).
    assign : {"faiss", "bf16", "float32"}
        faiss: faiss' k-means (on the GPUs when faiss sees any). bf16 / float32: :func:`kmeans`
        (the resumable build's, its assignment on KnnScan); its numbers differ from faiss'.
    quantizer_metric : faiss metric of the quantizer (L2 for the background; inner product for
        the node index of lowshot/completion.py)
    backend : lowshot.torch_backend.Backend, the scans of :func:`kmeans` and faiss' GPUs

    Returns
    -------
    faiss.IndexIVFFlat, trained, empty.
    """
    n, d = x.shape
    nlist = int(min(max(1, nlist), n))
    if points_per_list is None:
        ntrain, sample = n, x
    else:
        ntrain = min(n, points_per_list * nlist)
        rs = np.random.RandomState(seed)
        sample = search.normalized(x[np.sort(rs.choice(n, ntrain, replace=False))], what)
    if assign == "faiss":
        log("training IVF%d on %d vectors" % (nlist, ntrain))
        quantizer = faiss.IndexFlatL2(d) if quantizer_metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
    else:
        log("k-means: %d lists on %d vectors, %d iterations (%s assignment)" % (nlist, ntrain, KMEANS_ITER, assign))
        quantizer = kmeans(sample, nlist, bf16=assign == "bf16", seed=seed, backend=backend)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    if assign == "faiss":
        index.cp.niter = KMEANS_ITER
        if backend.faiss_gpus > 0:
            index.clustering_index = search.to_gpus(faiss.IndexFlatL2(d), backend.faiss_gpus)
        index.train(sample)
    return index


def _checkpoint(work, params):
    """The quantizer and probes of an unfinished prepare step with these ``params``, or (None, None).

    The prepare step writes ``prepare.json`` (its parameters), then ``quantizer.index`` after
    k-means and ``probes.int32`` after the probes, each whole (atomic): a rerun after a kill
    reuses them, and ends with the same bytes. Those of other parameters are removed."""
    f = _files(work)
    try:
        with open(f["prepare"]) as fh:
            same = json.load(fh) == params
    except (OSError, ValueError):
        same = False
    quantizer = probes = None
    if same and os.path.isfile(f["quantizer"]):
        log("%s: k-means done by an earlier run, reused" % f["quantizer"])
        quantizer = faiss.read_index(f["quantizer"])
        if os.path.isfile(f["probes"]) and os.path.getsize(f["probes"]) == 4 * params["nbg"] * params["nprobe"]:
            log("%s: probes found by an earlier run, reused" % f["probes"])
            probes = np.memmap(f["probes"], dtype=np.int32, mode="r", shape=(params["nbg"], params["nprobe"]))
    elif not same:
        for key in ("quantizer", "probes"):
            if os.path.exists(f[key]):
                os.remove(f[key])
        write_json(f["prepare"], params)
    return quantizer, probes


def _write_probes(xb, path, quantizer, nprobe, bf16, bs, backend):
    """Every vector's nprobe nearest lists, nearest first, written to ``path`` (int32 (nbg, nprobe))."""
    nbg = xb.shape[0]
    log("probed lists of %d vectors (nprobe = %d of %d lists, %s scan)" % (
        nbg, nprobe, quantizer.ntotal, "bf16" if bf16 else "float32"))
    with atomic_output(path) as tmp:
        probes = mapped_output(tmp, np.int32, (nbg, nprobe), name=path)    # a full disk: no SIGBUS
        tp0 = tlast = time.time()
        for i0, i1 in search._blocks(nbg, 4 * bs):
            x = search.normalized(xb[i0:i1], "background rows %d:%d" % (i0, i1))
            probes[i0:i1] = probed_lists(quantizer, x, nprobe, bf16, backend)
            if time.time() - tlast > 10:
                tlast = time.time()
                log("  probes %d / %d (%.0f s left)" % (i1, nbg, (tlast - tp0) * (nbg - i1) / i1))
        probes.flush()
        del probes
    return np.memmap(path, dtype=np.int32, mode="r", shape=(nbg, nprobe))


def _write_lists(xb, f, probes, bs):
    """The normalised vectors in list order (``lists.float32``) and their ids (``list_ids.int32``)."""
    nbg, d = xb.shape
    # written in order (a scatter into a memory map of the output was 3x slower at 10M); each
    # block gathers its rows from the raw file, in the page cache after the probes' pass. Within a
    # list, vectors are in id order, as faiss' add
    order = np.argsort(np.asarray(probes[:, 0]), kind="stable").astype(np.int64)
    with atomic_output(f["lists"]) as tl, atomic_output(f["list_ids"]) as ti:
        with open(tl, "wb") as fl:
            for o0, o1 in search._blocks(nbg, 4 * bs):
                src = order[o0:o1]
                srt = np.argsort(src)
                x = np.empty((o1 - o0, d), dtype=np.float32)
                x[srt] = search.normalized(xb[src[srt]])
                fl.write(x.tobytes())
        order.astype(np.int32).tofile(ti)


def prepare(xb, K, work, nlist, nprobe, bf16, chunk_rows, bs=search.SEARCH_BS, backend=torch_backend.CPU):
    """Train the IVF, sort the vectors into lists and find each one's probed lists; write them to
    ``work`` and ``plan.json`` last. Returns the plan. k-means and the probes are checkpoints
    (:func:`_checkpoint`)."""
    nbg, d = xb.shape
    f = _files(work)
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    nlist = int(min(max(1, nlist), nbg))
    nprobe = int(min(nprobe, nlist))
    precision = "bf16" if bf16 else "float32"
    quantizer, probes = _checkpoint(work, {"nbg": nbg, "d": d, "nlist": nlist, "nprobe": nprobe,
                                           "precision": precision, "input": _input_signature(xb)})
    if quantizer is None:
        index = train_ivf(xb, nlist, KMEANS_POINTS, assign=precision, backend=backend)
        quantizer = faiss.clone_index(faiss.downcast_index(index.quantizer))
        del index
        with atomic_output(f["quantizer"]) as tmp:
            faiss.write_index(quantizer, tmp)
    if probes is None:
        probes = _write_probes(xb, f["probes"], quantizer, nprobe, bf16, bs, backend)
    sizes = np.zeros(nlist, dtype=np.int64)
    for i0, i1 in search._blocks(nbg, 2**20):
        sizes += np.bincount(probes[i0:i1, 0], minlength=nlist)
    log("writing the %d lists in list order (%.1f GB)" % (nlist, nbg * d * 4 / 1e9))
    _write_lists(xb, f, probes, bs)
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    with atomic_output(f["list_offsets"]) as tmp:
        offsets.tofile(tmp)
    plan = {"version": PLAN_VERSION, "nbg": nbg, "d": d, "K": K, "nlist": int(nlist), "nprobe": nprobe,
            "precision": precision, "kp": K + (search.BF16_EXTRA if bf16 else 0),
            "chunk_rows": int(chunk_rows), "nchunks": int(-(-nbg // chunk_rows)),
            "input": _input_signature(xb), "time_prepare": round(time.time() - t0, 2),
            "pairs": float(np.dot(np.bincount(probes.ravel(), minlength=nlist), sizes))}
    write_json(f["plan"], plan)
    log("prepared %s: %d chunks of %d rows, %.3g pairs to score" % (
        work, plan["nchunks"], chunk_rows, plan["pairs"]))
    return plan


def compute_chunk(xb, work, plan, j, report=None, backend=torch_backend.CPU):
    """Table rows of chunk j, written to ``chunk{j}.I`` / ``.D``. ``report(fraction)`` is told the
    fraction of the chunk's pairs scored, list by list. Returns (pairs scored, seconds, rows beyond
    the bf16 bound, own memory in GiB)."""
    t0 = time.time()
    f = _files(work)
    nbg, d, nlist, nprobe, K = plan["nbg"], plan["d"], plan["nlist"], plan["nprobe"], plan["K"]
    i0 = j * plan["chunk_rows"]
    i1 = min(nbg, i0 + plan["chunk_rows"])
    L = np.memmap(f["lists"], dtype=np.float32, mode="r", shape=(nbg, d))
    ids = np.fromfile(f["list_ids"], dtype=np.int32)
    offsets = np.fromfile(f["list_offsets"], dtype=np.int64)
    P = np.array(np.memmap(f["probes"], dtype=np.int32, mode="r", shape=(nbg, nprobe))[i0:i1])
    # the queries are normalised exactly as the stored vectors were (same function, same rows)
    Qf = search.normalized(xb[i0:i1], "background rows %d:%d" % (i0, i1))
    # candidates are named by their row in L (list order) while scanning, so that the exact
    # re-score reads them there; their ids at the end
    scan = backend.knn_scan(Qf, plan["kp"], bf16=plan["precision"] == "bf16", deferred=True)
    pos = np.arange(nbg, dtype=np.int32)
    total = max(1.0, float(np.dot(np.bincount(P.ravel(), minlength=nlist), np.diff(offsets))))
    pairs = search.scan_probed(scan, P, nlist, lambda c: (L[offsets[c]:offsets[c + 1]],
                                                         pos[offsets[c]:offsets[c + 1]]),
                               report=None if report is None else lambda done: report(done / total))
    del P
    D, I = scan.finish(K, base=L)
    own = anon_rss_gib()    # the chunk's peak: its scan tables, queries and results are all alive
    I[I >= 0] = ids[I[I >= 0]]
    uncertain = scan.uncertain
    del scan
    cp = chunk_paths(work, j)
    with atomic_output(cp["D"]) as td, atomic_output(cp["I"]) as ti:    # I renamed first, D last
        I.tofile(ti)
        D.tofile(td)
    return pairs, time.time() - t0, uncertain, own


def run_chunks(xb, work, plan, chunks, backend=torch_backend.CPU):
    """Compute the chunks of ``chunks`` not done yet, logging progress, rate and ETA."""
    todo = [j for j in chunks if not chunk_done(work, plan, j)]
    if len(todo) < len(chunks):
        log("%d of %d chunks already done" % (len(chunks) - len(todo), len(chunks)))
    t0 = time.time()
    # rows_beyond_bf16_bound: rows whose kp-th candidate is within the worst-case bf16 error bound
    # (all rounding errors aligned, ~16x the typical error) of their K-th: for those, equality with
    # the float32 search is not guaranteed by the bound (build_graph.py measures it on a sample)
    stats = {"pairs_scored": 0.0, "chunks_computed": len(todo), "rows_beyond_bf16_bound": 0}
    # a chunk can take minutes (12.5 min at 10M on a busy machine): a line every 30 s within it
    rows = [min(plan["chunk_rows"], plan["nbg"] - j * plan["chunk_rows"]) for j in todo]
    progress = Progress("table", sum(rows), unit="rows", emit=log)
    for n, j in enumerate(todo):
        before = sum(rows[:n])
        pairs, sec, uncertain, own = compute_chunk(
            xb, work, plan, j, report=lambda frac, b=before, r=rows[n]: progress.update(b + frac * r), backend=backend)
        stats["pairs_scored"] += pairs
        stats["rows_beyond_bf16_bound"] += uncertain
        stats["own_gib_chunk"] = max(stats.get("own_gib_chunk", 0.0), own or 0.0)
        el = time.time() - t0
        log("chunk %d (%d / %d here): %.3g pairs in %.1f s, %.3g pairs/s; own memory %.2f GiB at its "
            "end; %.0f s left" % (j, n + 1, len(todo), pairs, sec, pairs / max(sec, 1e-9),
                                  own or float("nan"), el / (n + 1) * (len(todo) - n - 1)))
    stats["time_table"] = time.time() - t0
    return stats


def _concatenate(work, plan, paths, progress, record):
    """The chunks copied into the published tables; with ``record``, its pending copy is written
    just before the I table is renamed into place (:func:`lowshot.stored_graph.write_pending_record`)."""
    nbg, K = plan["nbg"], plan["K"]
    done = 0
    with atomic_output(paths["I"]) as ti, atomic_output(paths["D"]) as td:
        with open(ti, "wb") as fi, open(td, "wb") as fd:
            for j in range(plan["nchunks"]):
                for key, out in (("I", fi), ("D", fd)):
                    with open(chunk_paths(work, j)[key], "rb") as src:
                        for buf in iter(lambda: src.read(2**24), b""):
                            out.write(buf)
                            done += len(buf)
                            progress.update(done)
        for p in (ti, td):
            if os.path.getsize(p) != nbg * K * 4:
                raise InputError("%s: the chunks hold %d bytes, expected %d" % (work, os.path.getsize(p), nbg * K * 4))
        if record is not None:
            stored_graph.write_pending_record(paths, record, ti)
    return done


def merge(work, plan, paths, record=None):
    """Concatenate the chunks into the published tables, write the faiss index, remove ``work``.

    ``record``: the graph's record (dict), landing with the tables (:func:`_concatenate`)."""
    from faiss.contrib.ivf_tools import add_preassigned

    f = _files(work)
    nbg, d, K = plan["nbg"], plan["d"], plan["K"]
    missing = [j for j in range(plan["nchunks"]) if not chunk_done(work, plan, j)]
    if missing:
        raise InputError("%s: %d chunks are not computed yet (e.g. chunk %d)" % (work, len(missing), missing[0]))
    log("merging %d chunks into %s" % (plan["nchunks"], paths["I"]))
    # bytes: both tables copied, then the lists added to the index
    progress = Progress("merge", 2 * nbg * K * 4 + nbg * d * 4, unit="bytes", emit=log)
    done = _concatenate(work, plan, paths, progress, record)
    log("writing the IVF index %s" % paths["index"])
    quantizer = faiss.read_index(f["quantizer"])
    index = faiss.IndexIVFFlat(quantizer, d, quantizer.ntotal, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    L = np.memmap(f["lists"], dtype=np.float32, mode="r", shape=(nbg, d))
    ids = np.fromfile(f["list_ids"], dtype=np.int32).astype(np.int64)
    offsets = np.fromfile(f["list_offsets"], dtype=np.int64)
    lst = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    for i0, i1 in search._blocks(nbg, 2**20):
        add_preassigned(index, np.ascontiguousarray(L[i0:i1]), lst[i0:i1], ids[i0:i1])
        progress.update(done + i1 * d * 4)
    index.nprobe = plan["nprobe"]
    del L
    with atomic_output(paths["index"]) as tmp:
        faiss.write_index(index, tmp)
    shutil.rmtree(work)


def shard_chunks(nchunks, shard, nshards):
    """The chunks of shard ``shard`` of ``nshards``: shard, shard + nshards, ... (balanced)."""
    return list(range(shard, nchunks, nshards))


def _open_work(xb, work, force, shard):
    """The work folder's plan (or None), after ``--force``, the removal of dead runs' temporaries
    and the repair of a damaged folder; and the plan it had before a repair (or None)."""
    if force and os.path.isdir(work):
        if shard is not None:
            raise InputError("force with a shard would delete the chunks of the other shards: "
                             "remove %s by hand, or rerun the whole build" % work)
        log("--force: removing %s" % work)
        shutil.rmtree(work)
    if os.path.isdir(work):
        for p in remove_stale_temporaries(work):
            log("removed %s (its writer is gone)" % p)
    try:
        return read_plan(work), None
    except DamagedWork as e:
        return None, _repair(work, e, shard, xb.shape[0])


def _resolve(xb, nlist, nprobe, bf16, chunk_rows, old_plan, backend):
    """The parameters of a build: those given, else those of a repaired plan, else the defaults."""
    nbg, d = xb.shape
    if old_plan is not None:     # prepared again with its parameters: its chunks stay valid
        nlist, nprobe = nlist or old_plan["nlist"], nprobe or old_plan["nprobe"]
        chunk_rows = chunk_rows or old_plan["chunk_rows"]
        bf16 = (old_plan["precision"] == "bf16") if bf16 is None else bf16
    nlist = nlist or default_nlist(nbg, ngpu=0)
    nprobe = nprobe or default_nprobe(nbg, nlist, ngpu=0)
    if bf16 is None:
        bf16 = backend.bf16_scan(d)
    elif bf16 and not (backend.bf16_scan(d)):
        raise InputError("precision bf16 needs graph_utils on a CPU with AVX512-BF16 (not the cuda or torch-cpu "
                         "backend) and an even d (d = %d)" % d)
    return nlist, nprobe, bf16, chunk_rows or default_chunk_rows(nbg)


def _prepare_once(xb, K, work, params, old_plan, shard, backend):
    """The prepare step of a build whose work folder has no plan; a disk error before any chunk
    removes the work folder this run created (nothing of it is worth keeping)."""
    if shard is not None:
        raise InputError("%s is not prepared: run the prepare step (`build_graph.py %d --prepare`, one task) before "
                         "the shard tasks" % (work, xb.shape[0]))
    created = not os.path.isdir(work)
    try:
        plan = prepare(xb, K, work, *params, backend=backend)
    except (InputError, OSError):
        if created:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if old_plan is not None and any(plan[k] != old_plan.get(k) for k in _PLAN_KEYS + ("pairs",)):
        log("the prepare step gave other lists than before: the chunks are computed again")
        for j in range(old_plan["nchunks"]):
            for path in chunk_paths(work, j).values():
                if os.path.exists(path):
                    os.remove(path)
    return plan


def build(xb, K, paths, nlist=None, nprobe=None, bf16=None, chunk_rows=None, shard=None, prepare_only=False,
          force=False, record=None, backend=torch_backend.CPU):
    """The CPU IVF graph of ``xb``, resumable: prepare if needed, compute the chunks (all, or those of
    ``shard = (i, S)``), and merge when every chunk exists and no shard was asked for.

    ``record``: None, or a function of the statistics giving the graph's record, which lands with
    the tables (:func:`merge`). Returns a dict of statistics (``done`` is True once the published
    tables are written).
    """
    nbg = xb.shape[0]
    work = paths["work"]
    plan, old_plan = _open_work(xb, work, force, shard)
    stats = {"method": "ivf", "nbg": nbg, "K": K}
    if plan is not None:
        check_plan(plan, {"nbg": nbg, "K": K, "input": _input_signature(xb), "nlist": nlist, "nprobe": nprobe,
                          "chunk_rows": chunk_rows,
                          "precision": None if bf16 is None else ("bf16" if bf16 else "float32")}, work)
    params = _resolve(xb, nlist, nprobe, bf16, chunk_rows, old_plan, backend)
    if plan is None:
        t0 = time.time()
        plan = _prepare_once(xb, K, work, params, old_plan, shard, backend)
        stats["time_index"] = time.time() - t0
    else:
        log("%s already prepared (%d chunks of %d rows)" % (work, plan["nchunks"], plan["chunk_rows"]))
        stats["time_index"] = 0.0
        if plan["precision"] == "bf16" and not backend.bf16_scan(xb.shape[1]):
            raise InputError("%s was prepared for the bf16 scan, which %s lacks (AVX512-BF16): run the chunks "
                             "on such a CPU with --device cpu, or start again with --force" % (
                                 work, backend.describe()))
    stats.update({k: plan[k] for k in ("nlist", "nprobe", "precision", "kp", "nchunks", "chunk_rows")})
    if prepare_only:
        stats["done"] = False
        return stats
    chunks = list(range(plan["nchunks"])) if shard is None else shard_chunks(plan["nchunks"], *shard)
    log("table: %d chunks%s, %s scan, %d candidates per row" % (
        len(chunks), "" if shard is None else " (shard %d / %d)" % shard, plan["precision"], plan["kp"]))
    stats.update(run_chunks(xb, work, plan, chunks, backend))
    stats["time_search"] = stats["time_table"]
    stats["done"] = False
    if shard is None:
        t0 = time.time()
        merge(work, plan, paths, None if record is None else record(stats))
        stats["time_merge"] = time.time() - t0
        stats["done"] = True
    return stats
