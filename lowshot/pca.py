"""PCA + random rotation of CNN features (the paper's PCAR256), trained with faiss, applied streaming.

``train_pca`` fits ``faiss.PCAMatrix(d_in, d_out, eigen_power=0, random_rotation=True)`` on the rows of
one feature hdf5 (``features/f100m/block0.hdf5``: the first 1M background images) and writes it with
``faiss.write_VectorTransform`` (``features/PCAR256.vt``).

``apply_pca`` pushes the rows of hdf5 blocks ``block0 ... block{B-1}`` through it and appends them, in
order, to one raw float32 file (``features/f100m/concatenated_PCAR256.raw``: rows x d_out, no
header). A reader thread loads the next chunk while faiss transforms the current one. The output is
built in ``OUTFILE.partial`` with ``OUTFILE.partial.json`` recording the blocks and rows completed;
a rerun truncates the partial file to the last complete block and continues, so rows are never
duplicated or skipped; the final name appears when every block is done. The log has a line per
block and, within a block, one every 30 s (rows done / total, rate, ETA).
"""
import json
import os
import queue
import threading
import time

import faiss

from lowshot.common import InputError, disk_errors, logger
from lowshot.data import feature_shape, read_row_range
from lowshot.progress import Progress

log = logger(__name__)


def train_pca(infile, d_out=256, max_rows=None):
    """Train PCA + random rotation on the first ``max_rows`` rows (all: None) of ``infile``.

    Returns
    -------
    faiss.PCAMatrix
        ``d_in`` (read from the file) -> ``d_out``, eigen power 0, random rotation on.
    """
    n, d_in = feature_shape(infile)
    if max_rows is not None:
        n = min(n, max_rows)
    if not 0 < d_out <= d_in:
        raise InputError("PCA output dimension %d must be in 1..%d (the input dimension of %s)"
                         % (d_out, d_in, infile))
    if n < 2:
        raise InputError("feature file %s has %d rows: too few to train a PCA" % (infile, n))
    if n <= d_out:
        raise InputError("feature file %s has %d training rows: a PCA to %d dimensions needs more; give "
                         "more rows or a smaller --dout" % (infile, n, d_out))
    log("reading %d x %d training rows from %s" % (n, d_in, infile))
    x = read_row_range(infile, 0, n)
    log("training PCA %d -> %d (eigen power 0, random rotation)" % (d_in, d_out))
    pca = faiss.PCAMatrix(d_in, d_out, 0, True)
    # faiss subsamples above max_points_per_d * d_in rows: train on every row given
    pca.max_points_per_d = max(pca.max_points_per_d, -(-n // d_in))
    pca.train(x)
    return pca


def _chunks(infiles, start_block, chunk_rows):
    """Yield ``(block, i0, i1, rows)`` over the blocks from ``start_block``, in order."""
    for b in range(start_block, len(infiles)):
        n, _ = feature_shape(infiles[b])
        if n == 0:
            yield b, 0, 0, None
        for i0 in range(0, n, chunk_rows):
            i1 = min(n, i0 + chunk_rows)
            yield b, i0, i1, read_row_range(infiles[b], i0, i1)


def _prefetch(gen, depth=2):
    """Run generator ``gen`` in a thread, ``depth`` items ahead; exceptions are re-raised here."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work():
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _block_rows(vt, infiles):
    """The rows of each input file; InputError for a dimension other than the PCA's input."""
    rows = []
    for p in infiles:
        n, d = feature_shape(p)
        if d != vt.d_in:
            raise InputError("feature file %s has dimension %d, the PCA expects %d" % (p, d, vt.d_in))
        rows.append(n)
    return rows


def _resume_point(partial, progress, meta, row_bytes):
    """``(blocks, rows)`` completed by an earlier run on the same inputs (``(0, 0)``: none)."""
    if not (os.path.exists(partial) and os.path.exists(progress)):
        return 0, 0
    with open(progress) as f:
        state = json.load(f)
    if state["meta"] != meta:
        raise InputError("partial output %s was made from other inputs (see %s): delete both to "
                         "start over" % (partial, progress))
    done_blocks, done_rows = state["blocks_done"], state["rows_done"]
    if os.path.getsize(partial) < done_rows * row_bytes:
        raise InputError("partial output %s is shorter than the %d rows %s records: delete both "
                         "to start over" % (partial, done_rows, progress))
    log("resuming %s after block %d (%d rows)" % (partial, done_blocks, done_rows))
    return done_blocks, done_rows


def _save_progress(progress, meta, blocks, nrows):
    """Record durably that ``blocks`` blocks (``nrows`` rows) are complete in the partial file."""
    tmp = progress + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "blocks_done": blocks, "rows_done": nrows}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, progress)


def _write_rows(vt, infiles, rows, out, done_blocks, done_rows, chunk_rows, block_done):
    """Append the transformed rows of the blocks from ``done_blocks`` to ``out``; ``block_done(b,
    nrow)`` after block ``b`` is flushed. Logs each block and, in between, progress every 30 s.
    Returns the rows in the file."""
    total = sum(rows)
    t0 = time.time()
    nrow = done_rows
    lines = Progress("applying PCA", total - done_rows, emit=log)
    for b, i0, i1, x in _prefetch(_chunks(infiles, done_blocks, chunk_rows)):
        if x is not None:
            out.write(vt.apply(x).tobytes())
            nrow += i1 - i0
        if i1 == rows[b]:
            out.flush()
            os.fsync(out.fileno())
            block_done(b, nrow)
            rate = (nrow - done_rows) / max(time.time() - t0, 1e-9)
            log("block %d/%d, %d/%d rows, %.0f rows/s" % (b + 1, len(infiles), nrow, total, rate))
        else:
            lines.update(nrow - done_rows)
    return nrow


def apply_pca(vt, infiles, outfile, chunk_rows=65536, after_block=None):
    """Transform every row of ``infiles`` (hdf5 ``all_feats``) in order into raw float32 ``outfile``.

    Parameters
    ----------
    vt : faiss.VectorTransform
        Trained, ``vt.d_in`` must equal every file's feature dimension.
    infiles : list of str
        Feature hdf5 files, concatenated in this order.
    outfile : str
        Raw output, ``sum(rows)`` x ``vt.d_out`` float32, written via ``outfile + ".partial"``.
    chunk_rows : int
        Rows read and transformed at a time.
    after_block : callable or None
        Called with the number of blocks done after each block is durably written (tests use it
        to interrupt a run).

    Returns
    -------
    dict
        ``rows``, ``d_in``, ``d_out``, ``nblock``, ``rows_this_run``, ``seconds``, ``rows_per_s``.
    """
    rows = _block_rows(vt, infiles)
    partial, progress = outfile + ".partial", outfile + ".partial.json"
    meta = {"infiles": [os.path.abspath(p) for p in infiles], "rows": rows,
            "d_in": int(vt.d_in), "d_out": int(vt.d_out)}
    row_bytes = 4 * vt.d_out
    done_blocks, done_rows = _resume_point(partial, progress, meta, row_bytes)

    def block_done(b, nrow):
        _save_progress(progress, meta, b + 1, nrow)
        if after_block is not None:
            after_block(b + 1)

    os.makedirs(os.path.dirname(os.path.abspath(outfile)), exist_ok=True)
    mode = "r+b" if done_blocks > 0 else "wb"
    if mode == "wb":
        _save_progress(progress, meta, 0, 0)
    total = sum(rows)
    t0 = time.time()
    log("applying PCA %d -> %d to %d blocks (%d rows) from block %d"
        % (vt.d_in, vt.d_out, len(infiles), total, done_blocks))
    # a full disk: one line naming the output; the partial file keeps the complete blocks, a rerun resumes
    with disk_errors(outfile), open(partial, mode) as out:
        # drop whatever an interrupted run wrote after its last complete block
        out.truncate(done_rows * row_bytes)
        out.seek(done_rows * row_bytes)
        nrow = _write_rows(vt, infiles, rows, out, done_blocks, done_rows, chunk_rows, block_done)
    if nrow != total or os.path.getsize(partial) != total * row_bytes:
        raise RuntimeError("internal error: %d rows written, expected %d" % (nrow, total))
    os.replace(partial, outfile)
    os.remove(progress)
    seconds = time.time() - t0
    return {"rows": total, "d_in": int(vt.d_in), "d_out": int(vt.d_out), "nblock": len(infiles),
            "rows_this_run": total - done_rows, "seconds": round(seconds, 3),
            "rows_per_s": round((total - done_rows) / max(seconds, 1e-9), 1)}
