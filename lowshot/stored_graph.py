"""The stored background graph under ``$DDIR/knngraph``: its file names, reading and checking the
tables and the index, the record JSON written beside it, and when ``build_graph.py`` reuses it.

Files for the first ``nbg`` background vectors and ``K`` neighbours (:func:`graph_paths`)::

    ndis{nbg}.index               faiss index of the normalised rows (the same for every K)
    ndis{nbg}_k{K}_I_11.int32     raw (nbg, K) int32 neighbour ids, -1 = none
    ndis{nbg}_k{K}_D_11.float32   raw (nbg, K) float32 similarities, decreasing
    ndis{nbg}_k{K}.json           the record: method, parameters, recall, time
    ndis{nbg}_k{K}.work/          the resumable CPU IVF build's folder (lowshot/ivf_build.py)
    ndis{nbg}.lock                held by the build_graph.py run writing these files

The 2018 code's names (``_I_11.npy``, ``.int32`` for K = 32) are read too (:func:`_table_names`).
The record lands with the tables: :func:`write_pending_record` writes it, naming the table file
about to be renamed into place, before that rename; a run killed before the final record is
written then still finds it (:func:`read_record`).
"""
import json
import os

import faiss
import numpy as np

from lowshot import torch_backend
from lowshot.common import InputError, logger, require_file, write_json
from lowshot.search import to_gpus

log = logger(__name__)

# the flags a record of a built graph answers
PARAM_FLAGS = ("method", "nlist", "nprobe", "precision", "hnsw_M", "ef_search", "ef_construction",
               "nnd_iter", "nnd_L")
METHOD_FLAGS = {"ivf": ("nlist", "nprobe", "precision"), "hnsw": ("hnsw_M", "ef_search", "ef_construction"),
                "nndescent": ("nnd_iter", "nnd_L"), "exact": ()}


def graph_K(k):
    """K, the smallest power of two >= k: the number of neighbours stored for a graph built for k."""
    if k < 1:
        raise InputError("k = %d: need at least 1 neighbour" % k)
    K = 1
    while K < k:
        K *= 2
    return K


def graph_paths(ddir, nbg, K):
    """Paths of the background k-NN graph files for the first ``nbg`` vectors and ``K`` neighbours.

    Returns
    -------
    dict with keys ``index`` (``knngraph/ndis{nbg}.index``), ``I`` (``knngraph/ndis{nbg}_k{K}_I_11.int32``),
    ``D`` (``knngraph/ndis{nbg}_k{K}_D_11.float32``), ``work`` (``knngraph/ndis{nbg}_k{K}.work``, the
    resumable build's folder, see :mod:`lowshot.ivf_build`), ``record`` (``knngraph/ndis{nbg}_k{K}.json``:
    how build_graph.py made the graph), ``lock`` (``knngraph/ndis{nbg}.lock``: held by the build_graph.py
    run writing these files, whose index is the same for every K).
    """
    g = os.path.join(ddir, "knngraph")
    return {"index": os.path.join(g, "ndis%d.index" % nbg),
            "I": os.path.join(g, "ndis%d_k%d_I_11.int32" % (nbg, K)),
            "D": os.path.join(g, "ndis%d_k%d_D_11.float32" % (nbg, K)),
            "work": os.path.join(g, "ndis%d_k%d.work" % (nbg, K)),
            "record": os.path.join(g, "ndis%d_k%d.json" % (nbg, K)),
            "lock": os.path.join(g, "ndis%d.lock" % nbg)}


def _table_names(p, K):
    """The (I, D) file names a stored table may have, in the 2018 code's order: ``_I_11.npy`` /
    ``_D_11.npy``, then ``.int{K}`` / ``.float{K}`` (its raw files: the published
    ``ndis{N}_k32_I_11.int32``), then this project's ``.int32`` / ``.float32`` for any K."""
    bi, bd = p["I"][:-len(".int32")], p["D"][:-len(".float32")]
    return [(bi + ".npy", bd + ".npy"), (bi + ".int%d" % K, bd + ".float%d" % K), (p["I"], p["D"])]


def _read_table(path, dts, nbg, K, cmd):
    """A stored table as a read-only memmap, its shape and dtype checked (one-line InputError)."""
    if path.endswith(".npy"):
        try:
            t = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError("background graph %s is not a .npy array: %s" % (path, e))
        if t.ndim != 2 or t.shape[0] != nbg or t.shape[1] < K or t.dtype not in dts:
            raise InputError("background graph %s holds %s %s, expected (nbg, >= K) = (%d, >= %d) %s "
                             "(rebuild it with `%s`)" % (path, t.dtype, t.shape, nbg, K,
                                                         " or ".join(np.dtype(d).name for d in dts), cmd))
        return t
    size = os.path.getsize(path)
    if size != nbg * K * 4:
        raise InputError("background graph %s has %d bytes, expected nbg*K*4 = %d*%d*4 = %d "
                         "(rebuild it with `%s`)" % (path, size, nbg, K, nbg * K * 4, cmd))
    return np.memmap(path, dtype=dts[0], mode="r", shape=(nbg, K))


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
        p = graph_paths(ddir, nbg, K)
        found = next((f for f in _table_names(p, K) if os.path.isfile(f[0]) and os.path.isfile(f[1])), None)
        K = K if found else 2 * K
    if found is None:
        p = graph_paths(ddir, nbg, graph_K(k))
        raise InputError("background graph %s (or a larger K) does not exist: make it with `%s`"
                         % (p["I"], cmd))
    require_file(p["index"], "background index (make it with `%s`)" % cmd)
    D = _read_table(found[1], (np.float32,), nbg, K, cmd)
    I = _read_table(found[0], (np.int32, np.int64), nbg, K, cmd)
    return p["index"], D, I


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


def _is_ivf_file(path):
    """True when a faiss index file holds an IndexIVFFlat (its fourcc: "IwFl", or "IvFl" in old files)."""
    with open(path, "rb") as f:
        return f.read(4) in (b"IwFl", b"IvFl")


def read_background_index(path, nbg, d, nprobe=None, ef_search=None, search_L=None, backend=torch_backend.CPU):
    """Read the stored background index, check it (``nbg`` vectors, of dimension ``d`` unless None),
    set search parameters, move it to the GPUs of ``backend`` (a lowshot.torch_backend.Backend) if any."""
    try:
        # IVF on CPU: the lists stay in the file, memory-mapped (page cache, shared by the tasks of a
        # node, not the process' own memory: 10 GB at F10M)
        ivf_cpu = backend.faiss_gpus == 0 and _is_ivf_file(path)
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
    if isinstance(index, (faiss.IndexFlat, faiss.IndexIVF)) and backend.faiss_gpus > 0:
        index = to_gpus(index, backend.faiss_gpus, shard=True)
    return index


############################################################################################
# The record beside a graph, and the reuse policy
############################################################################################


def build_record(method, params, stats):
    """How the graph was built: the method, its parameters (as used: ``stats``' value, else the
    attribute of ``params``, the parsed flags), its recall and time."""
    rec = {"method": method}
    for k in METHOD_FLAGS.get(method, ()):
        v = stats.get(k, getattr(params, k))
        if v is not None:
            rec[k] = v
    if method == "ivf" and "precision" not in stats:
        rec.pop("precision", None)          # GPU builds: faiss' own search
    for k in ("recall@10", "time_total"):
        if stats.get(k) is not None:
            rec[k] = round(float(stats[k]), 4)
    return rec


def _pending(paths):
    return paths["record"] + ".pending"


def write_pending_record(paths, record, tmp_I):
    """Write ``record`` as the one of the tables whose I file is now the temporary ``tmp_I``,
    about to be renamed to ``paths["I"]``: a rename keeps the file's inode, which identifies the
    table the record describes (a record left by a build killed before its rename names another)."""
    write_json(_pending(paths), {"record": record, "I_inode": os.stat(tmp_I).st_ino})


def write_record(paths, record):
    """Write the final record of the graph at ``paths`` (and drop the pending one)."""
    write_json(paths["record"], record)
    if os.path.exists(_pending(paths)):
        os.remove(_pending(paths))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_record(paths):
    """The record of the graph at ``paths``: the final one, else the pending one when it names the
    I table now in place (a run killed between the tables and its final record); None when the
    graph was built without one (an earlier version or the 2018 code)."""
    rec = _read_json(paths["record"])
    if rec is None:
        pend = _read_json(_pending(paths))
        try:
            if isinstance(pend, dict) and pend.get("I_inode") == os.stat(paths["I"]).st_ino:
                rec = pend.get("record")
        except OSError:
            pass
    return rec


def describe(record):
    """A record in words, for the log."""
    if record is None:
        return "built without a record of its parameters (by an earlier version or the 2018 code)"
    params = ", ".join("%s %s" % (k, record[k]) for k in PARAM_FLAGS[1:] if k in record)
    return "built with method %s%s%s" % (record.get("method"), " (%s)" % params if params else "",
                                         ", recall@10 %.3f" % record["recall@10"] if "recall@10" in record else "")


def explicit_params(args, defaults):
    """The build parameters that differ from their defaults, as {name: value}: read from the parsed
    arguments ``args`` against the parser's ``defaults`` (a dict), never from raw tokens (an
    abbreviated or ``--flag=value`` form counts the same)."""
    params = {k: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k) != defaults[k]}
    if params.get("precision") == "auto":     # whatever the CPU offers: any stored precision
        del params["precision"]
    return params


def check_reuse(record, explicit, N):
    """A stored graph is reused only when the parameters given explicitly are the ones it was built
    with; otherwise a one-line error names both."""
    if not explicit:
        return
    if record is None or any(record.get(k) != v for k, v in explicit.items()):
        raise InputError("a background graph for N = %d exists, %s; %s was asked: force (build_graph.py "
                         "--force) rebuilds it" % (
            N, describe(record), ", ".join("%s %s" % kv for kv in sorted(explicit.items()))))


def reusable_graph(ddir, N, K, explicit):
    """The stored graph a build of (N, K) reuses, or None when there is none.

    Returns (index path, stored K' >= K, record); raises a one-line InputError when the graph
    exists but was built with other parameters than the ``explicit`` ones (:func:`check_reuse`).
    If the record was left pending by a killed run, it is published now.
    """
    try:
        idx_path, _, I = find_background_graph(ddir, N, K)
    except InputError:
        return None
    paths = graph_paths(ddir, N, I.shape[1])
    record = read_record(paths)
    check_reuse(record, explicit, N)
    if record is not None and not os.path.isfile(paths["record"]):
        try:
            write_record(paths, record)
        except (OSError, InputError):     # a read-only data root: the pending record still serves
            pass
    return idx_path, int(I.shape[1]), record
