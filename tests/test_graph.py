"""k-NN graph building (build_graph.py, lowshot.graph) and graph completion against brute force."""
import json
import os

import faiss
import numpy as np
import pytest

import build_graph
from lowshot import data, graph, ivf_build, search, stored_graph, torch_backend
from lowshot.common import InputError


def make_bg_ddir(root, nbg, d=16, nclust=20, seed=0):
    """A data root holding only what build_graph.py reads: a .vt (for d) and the background raw."""
    rs = np.random.RandomState(seed)
    f = data.feature_paths(str(root))
    os.makedirs(os.path.dirname(f["background"]), exist_ok=True)
    pca = faiss.PCAMatrix(2 * d, d)
    pca.train(rs.randn(200, 2 * d).astype(np.float32))
    faiss.write_VectorTransform(pca, f["pca"])
    centres = rs.randn(nclust, d).astype(np.float32)
    x = centres[rs.randint(nclust, size=nbg)] + 0.5 * rs.randn(nbg, d).astype(np.float32)
    x.astype(np.float32).tofile(data.feature_paths(str(root))["background"])
    return x


def brute_knn(xq, xb, k):
    """Exact k-NN by inner product of L2-normalised vectors, numpy only: (sims, ids)."""
    q = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    b = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    S = q.astype(np.float64) @ b.T.astype(np.float64)
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, I, axis=1), I


def read_tables(root, nbg, K):
    p = stored_graph.graph_paths(str(root), nbg, K)
    D = np.fromfile(p["D"], dtype=np.float32).reshape(nbg, K)
    I = np.fromfile(p["I"], dtype=np.int32).reshape(nbg, K)
    return D, I, p


def test_graph_K():
    assert [stored_graph.graph_K(k) for k in (1, 2, 3, 30, 32, 33)] == [1, 2, 4, 32, 32, 64]


def test_exact_search_of_raw_rows_is_brute_force():
    """The recall reference: raw rows streamed in blocks, equal to numpy in float64."""
    rs = np.random.RandomState(5)
    xb = rs.randn(5000, 32).astype(np.float32)
    xq = rs.randn(300, 32).astype(np.float32)
    xqn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    D, I, _ = search.exact_search(xqn, xb, 12, bs=700, raw_base=True)
    Dref, Iref = brute_knn(xq, xb, 12)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(D, Dref, atol=1e-5)


def test_build_exact_equals_brute_force(tmp_path, capsys):
    nbg, K = 700, 16
    x = make_bg_ddir(tmp_path, nbg)
    # small blocks: the streamed writing must glue blocks in order
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--k", "10", "--method", "exact",
                      "--bs", "128", "--recall_nq", "100"])
    out = capsys.readouterr().out.strip().splitlines()
    assert '"recall@10": 1.0' in out[-1]
    D, I, p = read_tables(tmp_path, nbg, K)
    Sref, Iref = brute_knn(x, x, K)
    np.testing.assert_allclose(D, Sref, atol=1e-5)
    # ids agree, except swaps between similarities equal to float32 rounding
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    mism = I != Iref
    sim_of_I = np.einsum("ijd,id->ij", xn[I], xn)
    assert mism.sum() <= 4, mism.sum()
    np.testing.assert_allclose(sim_of_I[mism], Sref[mism], atol=1e-5)
    index = faiss.read_index(p["index"])
    assert index.ntotal == nbg and index.d == x.shape[1]
    # no temporary files left behind
    assert sorted(os.listdir(tmp_path / "knngraph")) == sorted(
        os.path.basename(p[k]) for k in ("index", "I", "D", "record"))


@pytest.mark.parametrize("method", ["ivf", "hnsw", "nndescent"])
def test_build_approx_recall(tmp_path, method):
    nbg, K = 3000, 32
    x = make_bg_ddir(tmp_path, nbg, d=16, nclust=30)
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", method, "--nprobe", "16",
                      "--recall_nq", "0"])
    D, I, p = read_tables(tmp_path, nbg, K)
    _, Iref = brute_knn(x, x, 10)
    recall = np.mean([np.intersect1d(a[:10], b).size for a, b in zip(I, Iref)]) / 10
    assert recall >= 0.9, recall
    # stored similarities are the true inner products of the stored ids, decreasing
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    valid = I >= 0
    assert valid[:, :20].all()
    true = np.einsum("ijd,id->ij", xn[np.where(valid, I, 0)], xn)
    np.testing.assert_allclose(D[valid], true[valid], atol=1e-4)
    assert (np.diff(D[:, :20], axis=1) <= 1e-6).all()
    # graph_recall computes the same measure against its own exact search
    r2 = graph.graph_recall(np.memmap(data.feature_paths(str(tmp_path))["background"],
                                      dtype=np.float32, mode="r", shape=x.shape), I, nq=nbg)
    assert abs(r2 - recall) < 1e-6
    index = faiss.read_index(p["index"])
    assert index.ntotal == nbg
    if method != "nndescent":
        # the stored index also serves queries from outside the background (labelled and test
        # images in diffusion.py): new points of the same mixture, against brute force
        rs = np.random.RandomState(0)
        rs.randn(200, 32)                       # as make_bg_ddir: same centres, new points
        centres = rs.randn(30, 16)
        rs = np.random.RandomState(1)
        xq = centres[rs.randint(30, size=300)] + 0.5 * rs.randn(300, 16)
        xq = (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)
        _, Iq = brute_knn(xq, x, 10)
        _, Ia = index.search(xq, 10)
        ext = np.mean([np.intersect1d(a, b).size for a, b in zip(Ia, Iq)]) / 10
        assert ext >= 0.9, ext


def test_default_ivf_parameters():
    # CPU: 4 sqrt(N) lists, enough visited to scan ~IVF_SCAN vectors; GPUs: the 2018 original
    assert [ivf_build.default_nlist(n, ngpu=0) for n in (100, 10**5, 10**6)] == [40, 1265, 4000]
    assert ivf_build.default_nprobe(10**6, 4000, ngpu=0) == 64
    assert ivf_build.default_nprobe(10**5, 1265, ngpu=0) == 203
    assert ivf_build.default_nprobe(10**7, 12649, ngpu=0) == 30      # the scan grows as N^(1/6)
    assert ivf_build.default_nprobe(10**8, 40000, ngpu=0) == 14
    assert ivf_build.default_nprobe(3000, 110, ngpu=0) == 110          # small: every list
    assert ivf_build.default_nlist(10**6, ngpu=1) == 4000
    assert ivf_build.default_nprobe(10**6, 4000, ngpu=1) == 256
    assert graph.default_method(10**5) == "ivf"                        # the CPU backend
    assert graph.default_method(50000) == "exact"
    assert graph.default_method(10**6, torch_backend.Backend(faiss_gpus=1)) == "exact"


@pytest.mark.parametrize("bf16", [False, True])
def test_ivf_knn_equals_ivf_search(tmp_path, bf16):
    """ivf_knn (graph completion's many-query search) is the IVF index's own search: the same probed
    lists, exact products inside them, computed list by list; bf16: exact re-score of 16 extra
    candidates, the same but for near-ties."""
    import graph_utils
    if bf16 and not graph_utils.cpu_has_bf16():
        pytest.skip("no AVX512-BF16 on this CPU")
    nbg, K = 4000, 32
    x = make_bg_ddir(tmp_path, nbg, d=16, nclust=40)
    xb = np.memmap(data.feature_paths(str(tmp_path))["background"], dtype=np.float32, mode="r",
                   shape=x.shape)
    index = graph.make_background_index(xb, "ivf", K=K, nlist=50, nprobe=6)
    xq = search.normalized(np.random.RandomState(5).randn(1500, 16).astype(np.float32) + x[:1500])
    Dq, Iq, stats = search.ivf_knn(index, xq, K, bf16=bf16)
    Dqref, Iqref = index.search(xq, K)
    np.testing.assert_allclose(Dq, Dqref, atol=1e-5)
    mism = Iq != Iqref
    assert mism.mean() < 0.002, mism.mean()     # float ties only
    np.testing.assert_allclose(Dq[mism], Dqref[mism], atol=1e-5)
    # the pairs scored: each query against every vector of the lists it probes
    _, P = index.quantizer.search(xq, 6)
    assert stats["pairs_scored"] == sum(index.invlists.list_size(int(c)) for c in P.ravel())
    Dk, Ik = search.knn_search(index, xq, K)      # knn_search dispatches there from 1000 queries
    np.testing.assert_array_equal(Ik, search.ivf_knn(index, xq, K)[1])
    # fewer than K candidates: the missing entries are -inf / -1
    small = graph.make_background_index(xb[:300], "ivf", K=K, nlist=30, nprobe=1)
    xs = search.normalized(x[:300])
    D2, I2, _ = search.ivf_knn(small, xs, 64, bf16=bf16)
    D2ref, I2ref = small.search(xs, 64)
    assert (I2 == -1).any()
    np.testing.assert_array_equal(I2 == -1, I2ref == -1)
    assert np.isneginf(D2[I2 == -1]).all()


def test_reuse_larger_K(tmp_path, capsys):
    nbg = 300
    make_bg_ddir(tmp_path, nbg)
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--k", "64", "--recall_nq", "0"])
    capsys.readouterr()
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--k", "32", "--recall_nq", "0"])
    assert '"reused": true' in capsys.readouterr().out.splitlines()[-1]
    assert not os.path.exists(stored_graph.graph_paths(str(tmp_path), nbg, 32)["I"])
    idx, D, I = stored_graph.find_background_graph(str(tmp_path), nbg, 30)
    assert I.shape == (nbg, 64) and D.shape == (nbg, 64)


def test_bad_inputs(tmp_path):
    make_bg_ddir(tmp_path, 200)
    with pytest.raises(InputError, match="fewer than nbg = 500"):
        build_graph.main(["500", "--ddir", str(tmp_path)])
    with pytest.raises(InputError, match="K = 256 neighbours need more than N = 200"):
        build_graph.main(["200", "--ddir", str(tmp_path), "--k", "200"])
    with pytest.raises(InputError, match=r"python build_graph.py 200 --ddir"):
        stored_graph.find_background_graph(str(tmp_path), 200, 30)
    # a truncated table is refused, naming the file and the command that rebuilds it
    build_graph.main(["200", "--ddir", str(tmp_path), "--recall_nq", "0"])
    p = stored_graph.graph_paths(str(tmp_path), 200, 32)
    with open(p["D"], "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match="ndis200_k32_D_11.float32 has 100 bytes"):
        stored_graph.find_background_graph(str(tmp_path), 200, 30)
    # NaN rows in the background are reported, not propagated
    raw = data.feature_paths(str(tmp_path))["background"]
    x = np.fromfile(raw, dtype=np.float32)
    x[16 * 7 + 3] = np.nan
    x.tofile(raw)
    with pytest.raises(InputError, match="row 7 holds NaN"):
        build_graph.main(["200", "--ddir", str(tmp_path), "--force", "--recall_nq", "0"])


def test_stored_graph_names_how_it_was_built(tmp_path, capsys):
    """A stored graph is reused only for the parameters it was built with: asking for another method
    or parameter explicitly is a one-line error naming both; without explicit flags it is reused and
    the log says how it was built."""
    nbg = 2000
    make_bg_ddir(tmp_path, nbg, d=16, nclust=20)
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "exact", "--recall_nq", "200"])
    p = stored_graph.graph_paths(str(tmp_path), nbg, 32)
    rec = json.load(open(p["record"]))
    assert rec["method"] == "exact" and rec["recall@10"] == 1.0
    capsys.readouterr()
    build_graph.main([str(nbg), "--ddir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "built with method exact, recall@10 1.000: nothing to do" in out
    assert json.loads(out.strip().splitlines()[-1])["built_with"]["method"] == "exact"
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "exact"])     # the same: reused
    with pytest.raises(InputError, match=r"exists, built with method exact, recall@10 1.000; method hnsw was "
                                         r"asked: force \(build_graph.py --force\) rebuilds it"):
        build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "hnsw"])
    # the --flag=value form is the same request; an abbreviated flag is refused by every script's
    # parser (allow_abbrev=False), so no request can slip past the check
    with pytest.raises(InputError, match=r"method hnsw was asked"):
        build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method=hnsw"])
    with pytest.raises(InputError, match=r"unrecognized arguments: --meth"):
        build_graph.main([str(nbg), "--ddir", str(tmp_path), "--meth", "hnsw"])
    # a graph without a record (an earlier version, the 2018 files): named, refused for explicit flags
    os.remove(p["record"])
    with pytest.raises(InputError, match=r"without a record of its parameters.*method ivf, nprobe 4 was asked"):
        build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "ivf", "--nprobe", "4"])
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "ivf", "--nprobe", "4", "--force",
                      "--recall_nq", "0"])
    rec = json.load(open(p["record"]))
    assert rec["method"] == "ivf" and rec["nprobe"] == 4 and "recall@10" not in rec


def test_record_lands_with_the_graph(tmp_path, monkeypatch):
    """A run killed between the tables and its final record (the recall step) leaves the record
    pending beside the graph: the rerun reuses the graph for the same explicit flags and writes
    the record; a pending record of other tables (a build killed before they landed) is ignored."""
    nbg = 2000
    make_bg_ddir(tmp_path, nbg, d=16, nclust=20)
    p = stored_graph.graph_paths(str(tmp_path), nbg, 32)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graph, "graph_recall", killed)
    with pytest.raises(KeyboardInterrupt):
        build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "hnsw", "--hnsw_M", "8"])
    monkeypatch.undo()
    assert os.path.isfile(p["I"]) and not os.path.exists(p["record"])
    build_graph.main([str(nbg), "--ddir", str(tmp_path), "--method", "hnsw", "--hnsw_M", "8"])    # reused
    rec = json.load(open(p["record"]))
    assert rec["method"] == "hnsw" and rec["hnsw_M"] == 8 and not os.path.exists(p["record"] + ".pending")
    # a pending record naming another I file than the one in place describes nothing
    os.remove(p["record"])
    stored_graph.write_pending_record(p, {"method": "exact"}, p["D"])
    assert stored_graph.read_record(p) is None
