"""The bf16/float32 list scan (graph_utils.KnnScan) and the resumable, sharded CPU IVF build
(lowshot.ivf_build, build_graph.py --prepare / --shard), against brute force and faiss."""
import os
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest

import build_graph
import graph_utils
from lowshot import data, ivf_build, search, stored_graph
from lowshot.common import InputError
from test_graph import make_bg_ddir, read_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_bf16 = pytest.mark.skipif(not graph_utils.cpu_has_bf16(), reason="no AVX512-BF16 on this CPU")
# the float32 products: the hand-written blocked kernel (every build), MKL's sgemm (builds with MKL)
SCAN_KERNELS = ["hand", pytest.param("mkl", marks=pytest.mark.skipif(
    not graph_utils.has_mkl(), reason="graph_utils built without MKL (has_mkl() is False)"))]


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, d, seed, nclust=15):
    rs = np.random.RandomState(seed)
    c = rs.randn(nclust, d)
    return unit(c[rs.randint(nclust, size=n)] + 0.6 * rs.randn(n, d))


def offer_blocks(scan, Q, X, nblocks, rs):
    """Offer X in nblocks blocks, each to a random subset of queries; return the float64 score
    matrix with -inf where a (query, candidate) pair was not offered."""
    S = np.full((Q.shape[0], X.shape[0]), -np.inf)
    full = Q.astype(np.float64) @ X.T.astype(np.float64)
    for b, (j0, j1) in enumerate(zip(np.linspace(0, len(X), nblocks + 1).astype(int)[:-1],
                                     np.linspace(0, len(X), nblocks + 1).astype(int)[1:])):
        rows = np.arange(len(Q)) if b == 0 else np.sort(rs.choice(len(Q), len(Q) // 2, replace=False))
        scan.add(rows, X[j0:j1], np.arange(j0, j1, dtype=np.int32))
        S[np.ix_(rows, np.arange(j0, j1))] = full[np.ix_(rows, np.arange(j0, j1))]
    return S


@pytest.mark.parametrize("bf16,deferred", [(False, False), pytest.param(True, False, marks=needs_bf16),
                                           pytest.param(True, True, marks=needs_bf16)])
def test_knn_scan_against_brute_force(bf16, deferred):
    rs = np.random.RandomState(0)
    d, K = 64, 20
    Q, X = clustered(700, d, 1), clustered(2100, d, 2)
    scan = graph_utils.KnnScan(Q, K + (16 if bf16 else 0), bf16=bf16, deferred=deferred)
    assert scan.bf16 == bf16 and scan.deferred == deferred
    S = offer_blocks(scan, Q, X, 3, rs)
    if deferred:
        with pytest.raises(ValueError, match="needs base"):
            scan.finish(K)
    D, I = scan.finish(K, base=X)
    assert scan.uncertain <= 5
    Iref = np.argsort(-S, axis=1, kind="stable")[:, :K]
    Dref = np.take_along_axis(S, Iref, axis=1)
    # D holds the exact (float32) inner products of the ids in I, decreasing
    np.testing.assert_allclose(D, np.take_along_axis(S, I.astype(np.int64), axis=1), atol=2e-6)
    np.testing.assert_allclose(D, Dref, atol=2e-6)
    assert (np.diff(D, axis=1) <= 0).all()
    # the same sets as brute force but where two scores are within float32 rounding
    differ = [i for i in range(len(Q)) if set(I[i]) != set(Iref[i])]
    assert len(differ) <= 2, differ


@pytest.mark.parametrize("kernel", SCAN_KERNELS)
@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (5, 17, 2), (7, 300, 37), (101, 1000, 3), (203, 4099, 130)])
def test_knn_scan_fp32_odd_sizes(kernel, m, n, d):
    """The float32 scan against numpy in float64, at sizes that fill none of the kernel's blocks
    (queries per micro-kernel and tile, candidates per panel and tile), odd d, the candidates a
    row-strided view at an unaligned address (as an IVF list memory-mapped by faiss), each block
    offered to a random subset of the queries."""
    rs = np.random.RandomState(m + n + d)
    K = min(10, n)
    Q = rs.randn(m, d).astype(np.float32)
    raw = np.zeros(4 * n * (d + 3) + 2, np.uint8)       # float32 rows of d + 3, starting at byte 2
    Xall = raw[2:].view(np.float32).reshape(n, d + 3)
    Xall[:] = rs.randn(n, d + 3)
    X = Xall[:, 1:d + 1]
    assert not X.flags.aligned and X.strides[0] == 4 * (d + 3)
    scan = graph_utils.KnnScan(Q, K, bf16=False, kernel=kernel)
    assert not scan.bf16 and scan.kernel == kernel
    S = offer_blocks(scan, Q, X, min(3, n), rs)
    D, I = scan.finish(K)
    Iref = np.argsort(-S, axis=1, kind="stable")[:, :K]
    Dref = np.take_along_axis(S, Iref, axis=1)
    tol = 1e-5 * np.sqrt(d) * (1 + np.abs(Dref))
    offered = np.isfinite(Dref)                           # rows offered fewer than K candidates: -inf / -1
    assert (I[~offered] == -1).all() and np.isneginf(D[~offered]).all()
    assert (np.abs(D[offered] - Dref[offered]) <= tol[offered]).all()
    got = np.where(I >= 0, np.take_along_axis(S, np.maximum(I, 0).astype(np.int64), axis=1), -np.inf)
    np.testing.assert_allclose(D[offered], got[offered], atol=float(tol[offered].max()))   # D: scores of I
    assert (D[:, 1:][offered[:, 1:]] <= D[:, :-1][offered[:, 1:]]).all()      # decreasing
    differ = [i for i in range(m) if set(I[i]) != set(Iref[i])]
    assert len(differ) <= max(1, m // 100), differ       # only where two scores are within rounding


@needs_bf16
def test_knn_scan_bf16_matches_float32_and_pads():
    rs = np.random.RandomState(3)
    Q, X = clustered(500, 256, 4), clustered(3000, 256, 5)
    out = []
    for bf16 in (False, True):
        scan = graph_utils.KnnScan(Q, 32 + (16 if bf16 else 0), bf16=bf16)
        offer_blocks(scan, Q, X, 4, np.random.RandomState(7))
        out.append(scan.finish(32))
    assert (out[0][1] == out[1][1]).all(axis=1).mean() >= 0.99
    np.testing.assert_allclose(out[0][0], out[1][0], atol=2e-6)
    # fewer candidates than k: -inf / -1 past them
    scan = graph_utils.KnnScan(Q[:10], 8, bf16=True)
    scan.add(np.arange(10), X[:5], np.arange(5, dtype=np.int32))
    D, I = scan.finish(8)
    assert (I[:, 5:] == -1).all() and np.isneginf(D[:, 5:]).all() and (np.sort(I[:, :5], axis=1) == np.arange(5)).all()
    del rs


def test_knn_scan_bad_arguments():
    Q = clustered(50, 16, 0)
    scan = graph_utils.KnnScan(Q, 4, bf16=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        scan.add(np.array([3, 2]), Q[:5], np.arange(5))
    with pytest.raises(ValueError, match="outside the table"):
        scan.add(np.array([50]), Q[:5], np.arange(5))
    with pytest.raises(ValueError, match="one row per table row|one per id"):
        scan.add(np.array([1]), Q[:5], np.arange(4))
    with pytest.raises(ValueError, match="need 1 <= k <= kp"):
        scan.finish(5)
    with pytest.raises(ValueError, match="need 1 <= kp <= 512"):
        graph_utils.KnnScan(Q, 0)
    with pytest.raises(ValueError, match="kernel must be 'hand' or 'mkl'"):
        graph_utils.KnnScan(Q, 4, kernel="blas")
    if not graph_utils.cpu_has_bf16():
        with pytest.raises(ValueError, match="AVX512-BF16"):
            graph_utils.KnnScan(Q, 4, bf16=True)


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_bf16)])
def test_probed_lists_are_faiss_quantizer_search(bf16):
    x = clustered(3000, 32, 8)
    q = faiss.IndexFlatL2(32)
    km = faiss.Kmeans(32, 60, niter=5, seed=1)
    km.train(x)
    q.add(km.centroids)
    P = ivf_build.probed_lists(q, x, 7, bf16)
    _, Pref = q.search(x, 7)
    assert (P == Pref).all(axis=1).mean() >= 0.995
    assert (P[:, 0] == Pref[:, 0]).mean() >= 0.999


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_bf16)])
def test_kmeans_against_faiss(bf16):
    """Lloyd's iterations with the KnnScan assignment: as good a partition as faiss' k-means."""
    x = clustered(4000, 32, 11, nclust=25)
    q = ivf_build.kmeans(x, 40, niter=10, bf16=bf16)
    assert q.ntotal == 40
    D, a = q.search(x, 1)
    km = faiss.Kmeans(32, 40, niter=10, seed=1234)
    km.train(x)
    Dref, _ = km.index.search(x, 1)
    assert D.sum() <= 1.05 * Dref.sum(), (D.sum(), Dref.sum())
    assert np.bincount(a[:, 0], minlength=40).min() > 0        # no empty list
    # deterministic
    q2 = ivf_build.kmeans(x, 40, niter=10, bf16=bf16)
    assert (faiss.rev_swig_ptr(q.get_xb(), 40 * 32) == faiss.rev_swig_ptr(q2.get_xb(), 40 * 32)).all()


def build(root, nbg, *flags):
    return build_graph.main([str(nbg), "--ddir", str(root), "--recall_nq", "0", "--method", "ivf", "--nlist", "40",
                             "--nprobe", "5", *flags])


def test_table_is_faiss_ivf_search_float32(tmp_path):
    """--precision float32: the published table is the stored index's own search of every vector."""
    nbg, K = 5000, 32
    x = make_bg_ddir(tmp_path, nbg, d=16, nclust=40)
    build(tmp_path, nbg, "--precision", "float32", "--chunk_rows", "1100")
    D, I, p = read_tables(tmp_path, nbg, K)
    index = faiss.read_index(p["index"])
    assert index.nprobe == 5 and index.ntotal == nbg
    Dref, Iref = index.search(search.normalized(x), K)
    np.testing.assert_allclose(D, Dref, atol=1e-5)
    mism = I != Iref
    assert mism.mean() < 0.002, mism.mean()     # float ties only
    np.testing.assert_allclose(D[mism], Dref[mism], atol=1e-5)
    assert sorted(os.listdir(tmp_path / "knngraph")) == sorted(
        os.path.basename(p[k]) for k in ("index", "I", "D", "record"))   # work folder removed


def test_shards_and_resume_give_identical_bytes(tmp_path, capsys):
    nbg = 6000
    make_bg_ddir(tmp_path, nbg, d=16, nclust=40)
    p = stored_graph.graph_paths(str(tmp_path), nbg, 32)
    with pytest.raises(InputError, match=r"is not prepared: run the prepare step \(`build_graph.py 6000 --prepare`"):
        build(tmp_path, nbg, "--shard", "0/3", "--chunk_rows", "700")
    build(tmp_path, nbg, "--prepare", "--chunk_rows", "700")
    plan = ivf_build.read_plan(p["work"])
    assert plan["nchunks"] == 9
    prepared = {f: open(os.path.join(p["work"], f), "rb").read() for f in os.listdir(p["work"])}
    with pytest.raises(InputError, match="force with a shard would delete the chunks of the other shards"):
        build(tmp_path, nbg, "--shard", "1/3", "--force")
    for i in (2, 0):               # shards in any order; shard 1 left out: the plain run does it
        build(tmp_path, nbg, "--shard", "%d/3" % i)
        assert not os.path.exists(p["I"])
    done = sorted(f for f in os.listdir(p["work"]) if f.startswith("chunk") and f.endswith(".D"))
    assert done == ["chunk%05d.D" % j for j in (0, 2, 3, 5, 6, 8)]
    # a chunk killed between its two renames (I alone), or cut short, is computed again
    os.remove(ivf_build.chunk_paths(p["work"], 3)["D"])
    with open(ivf_build.chunk_paths(p["work"], 5)["I"], "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    build(tmp_path, nbg)
    assert "4 of 9 chunks already done" in capsys.readouterr().out
    sharded = [open(p[k], "rb").read() for k in ("I", "D")]
    # the same prepared files, all chunks in one process
    os.makedirs(p["work"])
    for f, b in prepared.items():
        with open(os.path.join(p["work"], f), "wb") as out:
            out.write(b)
    os.remove(p["I"])
    build(tmp_path, nbg)
    assert [open(p[k], "rb").read() for k in ("I", "D")] == sharded
    # the parameters of a prepared folder are checked
    build(tmp_path, nbg, "--prepare", "--force")
    with pytest.raises(InputError, match="prepared with nprobe = 5, not 6"):
        build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "ivf", "--nprobe", "6", "--shard", "0/2"])


def test_killed_build_resumes_to_identical_bytes(tmp_path):
    """SIGKILL in the middle of the table, then a rerun: it removes the dead run's temporaries, keeps
    the finished chunks and ends with the bytes of an uninterrupted build of the same plan."""
    import shutil
    # 100 chunks of a table that scans every list: long enough (seconds) to be interrupted twice
    nbg = 80000
    make_bg_ddir(tmp_path, nbg, d=64, nclust=60)
    cmd = [sys.executable, os.path.join(ROOT, "build_graph.py"), str(nbg), "--ddir", str(tmp_path),
           "--recall_nq", "0", "--method", "ivf", "--nlist", "50", "--nprobe", "50", "--chunk_rows", "800"]
    p = stored_graph.graph_paths(str(tmp_path), nbg, 32)
    r = subprocess.run(cmd + ["--prepare"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.copytree(p["work"], str(tmp_path / "prepared"))

    def chunks_done():
        return sorted(f for f in os.listdir(p["work"]) if f.startswith("chunk") and f.endswith(".D"))

    def interrupt(sig):
        before = len(chunks_done())
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 120 and len(chunks_done()) <= before:
            time.sleep(0.01)
        assert proc.poll() is None, "the build ended before it could be interrupted"
        proc.send_signal(sig)
        return proc.wait()

    # SIGTERM (a Slurm time limit): exits through the cleanup, no temporary left
    assert interrupt(signal.SIGTERM) == 128 + signal.SIGTERM
    assert not [f for f in os.listdir(p["work"]) if ".tmp" in f]
    assert interrupt(signal.SIGKILL) == -signal.SIGKILL
    assert not os.path.exists(p["I"])
    assert 2 <= len(chunks_done()) < 100
    # a dead writer's temporary (as SIGKILL leaves them) goes; a live process' one would stay
    from lowshot.common import _host
    dead = os.path.join(p["work"], ".chunk00099.D.tmp%d-%s" % (2**22 + 12345, _host()))
    live = os.path.join(p["work"], ".chunk00098.D.tmp%d-%s" % (os.getpid(), _host()))
    for f in (dead, live):
        open(f, "wb").close()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "removed %s" % dead in r.stdout and "chunks already done" in r.stdout
    resumed = [open(p[k], "rb").read() for k in ("I", "D")]
    assert [len(b) for b in resumed] == [nbg * 32 * 4] * 2
    # uninterrupted, from the same prepared files
    os.remove(p["I"])
    shutil.copytree(str(tmp_path / "prepared"), p["work"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [open(p[k], "rb").read() for k in ("I", "D")] == resumed


def test_killed_prepare_reuses_kmeans_and_probes(tmp_path, monkeypatch):
    """A prepare step killed after its probes: the rerun reuses the k-means centroids and the probes
    (neither is computed again) and ends with the bytes of an uninterrupted build."""
    nbg = 6000
    make_bg_ddir(tmp_path, nbg, d=16, nclust=40)
    p = stored_graph.graph_paths(str(tmp_path), nbg, 32)
    build(tmp_path, nbg, "--chunk_rows", "700")
    uninterrupted = [open(p[k], "rb").read() for k in ("I", "D", "index")]
    os.remove(p["I"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ivf_build, "_write_lists", killed)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, nbg, "--chunk_rows", "700")
    assert {"quantizer.index", "probes.int32"} <= set(os.listdir(p["work"]))
    monkeypatch.undo()

    def redone(*args, **kwargs):
        raise AssertionError("k-means or the probes computed again")

    monkeypatch.setattr(ivf_build, "kmeans", redone)
    monkeypatch.setattr(ivf_build, "_write_probes", redone)
    build(tmp_path, nbg, "--chunk_rows", "700")
    assert [open(p[k], "rb").read() for k in ("I", "D", "index")] == uninterrupted


def test_disk_error_in_prepare_leaves_no_work_folder(tmp_path, monkeypatch):
    """A prepare step failing on the disk (full: a one-line error) before any chunk removes the work
    folder it created: no empty ``.work`` is left behind."""
    nbg = 3000
    make_bg_ddir(tmp_path, nbg, d=16, nclust=40)
    p = stored_graph.graph_paths(str(tmp_path), nbg, 32)

    def full(*args, **kwargs):
        raise InputError("%s: cannot write: no space left on the device" % p["work"])

    monkeypatch.setattr(ivf_build, "_write_probes", full)
    with pytest.raises(InputError, match="no space left"):
        build(tmp_path, nbg)
    assert not os.path.exists(p["work"])


def test_table_and_merge_report_progress_within_chunks(tmp_path, monkeypatch, capsys):
    """The table and the merge log done / total, rate and ETA as they go, not only per chunk: with
    no minimum interval, a line for every list scanned and every block copied, up to the total."""
    import re
    from lowshot.progress import Progress
    nbg = 3000
    make_bg_ddir(tmp_path, nbg, d=16, nclust=40)
    monkeypatch.setattr(ivf_build, "Progress", lambda *args, **kwargs: Progress(*args, **kwargs, every=0))
    build(tmp_path, nbg, "--chunk_rows", "1000")
    out = capsys.readouterr().out
    table = [float(v) for v in re.findall(r"  table: (\d+) / 3000 rows \(\S+ rows/s, ETA \S+ s\)", out)]
    assert len(table) > 3 * 40 and table == sorted(table) and table[-1] == nbg    # 3 chunks of 40 lists
    merged = re.findall(r"  merge: (\d+) / (\d+) bytes", out)
    assert merged and merged[-1][0] == merged[-1][1] == str(nbg * 32 * 8 + nbg * 16 * 4)
