"""Graph completion, diffusion, slicing and fusion against brute force / dense numpy references."""
import json
import os

import faiss
import numpy as np
import pytest

import build_graph
import diffusion
import fusion
from lowshot import completion, data, evaluate, stored_graph
from lowshot import diffuse as dif
from lowshot.common import InputError
from lowshot.generate import generate_ddir

K_GRAPH = 6


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_union_knn(xq, xnodes, k):
    """Ids of the k most similar rows of xnodes for each row of xq (float64 numpy)."""
    S = xq.astype(np.float64) @ xnodes.T.astype(np.float64)
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


def dense_diffusion(I_nodes, I_test, y_lab, nclass, niter):
    """The diffusion written as dense numpy: W = rownorm(W0 + W0^T), L <- colnorm(W L)."""
    n = I_nodes.shape[0]
    W0 = np.zeros((n, n))
    for i, row in enumerate(I_nodes):
        W0[i, row[row >= 0]] = 1
    W = W0 + W0.T
    W /= W.sum(axis=1, keepdims=True)
    T = np.zeros((I_test.shape[0], n))
    for i, row in enumerate(I_test):
        T[i, row] = 1
    L = np.zeros((n, nclass))
    L[np.arange(len(y_lab)), y_lab] = 1

    def colnorm(L):
        s = L.sum(axis=0)
        s[s == 0] = 1
        return L / s
    L = colnorm(L)
    out = [T @ L]
    for _ in range(niter):
        L = colnorm(W @ L)
        out.append(T @ L)
    return out


def test_complete_graph_brute_force():
    rs = np.random.RandomState(0)
    d, n0, nbg, nt, k = 12, 40, 300, 25, 7
    x0, xb, xt = (rs.randn(n, d).astype(np.float32) for n in (n0, nbg, nt))
    xbn = unit(xb)
    index = faiss.IndexFlatIP(d)
    index.add(xbn)
    Dbg, Ibg = index.search(xbn, 8)
    for node_index in ("exact", "ivf"):
        bg = completion.Background(xb, index, Dbg, Ibg.astype(np.int32), exact_index=True)
        I_nodes, I_test, info = completion.complete_graph(unit(x0), unit(xt), k, bg, node_index=node_index,
                                                          bs=64)
        assert bg.index is None   # released once searched
        allx = np.vstack([unit(x0), xbn])
        np.testing.assert_array_equal(I_nodes, brute_union_knn(allx, allx, k))
        np.testing.assert_array_equal(I_test, brute_union_knn(unit(xt), allx, k))
        if node_index == "ivf":     # approximate: its recall is measured (here every list is probed)
            assert info["node_index_recall@10"] == 1.0
    # without background: a graph over the labelled set only
    I_nodes, I_test, _ = completion.complete_graph(unit(x0), unit(xt), k)
    np.testing.assert_array_equal(I_nodes, brute_union_knn(unit(x0), unit(x0), k))
    with pytest.raises(InputError, match="k = 40 but the graph has only 40 nodes"):
        completion.complete_graph(unit(x0), unit(xt), 40)


def _bg_files(tmp_path, xb, K=8):
    """The background as diffusion.py reads it: a raw memmap and an exact index with its table."""
    path = str(tmp_path / "bg.raw")
    xb.tofile(path)
    x = np.memmap(path, dtype=np.float32, mode="r", shape=xb.shape)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(unit(xb))
    D, I = index.search(unit(xb), K)
    return lambda: completion.Background(x, index, D, I.astype(np.int32), exact_index=True)


def test_completion_cache_equals_brute_force(tmp_path, capsys):
    """The searches into the base-class rows come from the cache: built by the first run, read by
    the next ones (other novel rows), never served for other inputs, rebuilt when damaged; the
    graph equals brute force every time."""
    rs = np.random.RandomState(3)
    d, nB, nR, nbg, nt, k = 16, 70, 12, 500, 30, 7
    xB, xb = unit(rs.randn(nB, d)), rs.randn(nbg, d).astype(np.float32)
    xt = unit(rs.randn(nt, d))
    bg = _bg_files(tmp_path, xb)
    root = str(tmp_path / "cache")

    def run(x0, xt, **kw):
        I_nodes, I_test, info = completion.complete_graph(x0, xt, k, bg(), nbase=nB, cache_root=root, bs=128, **kw)
        allx = np.vstack([x0, unit(xb)])
        np.testing.assert_array_equal(I_nodes, brute_union_knn(allx, allx, k))
        np.testing.assert_array_equal(I_test, brute_union_knn(xt, allx, k))
        return info

    x0 = np.vstack([xB, unit(rs.randn(nR, d))])
    info = run(x0, xt)
    assert info["cache_built"] and os.path.isdir(info["cache"])
    assert sorted(os.listdir(os.path.dirname(info["cache"]))) == sorted(
        [os.path.basename(info["cache"]), os.path.basename(info["cache"]) + ".lock"])
    # another run of the split (other labelled novel images, in-domain rows): the same cache
    x0b = np.vstack([xB, unit(rs.randn(3 * nR, d))])
    assert run(x0b, xt)["cache_built"] is False
    # without the cache: the same graph
    I1 = completion.complete_graph(x0b, xt, k, bg(), nbase=nB, cache_root=None)[0]
    np.testing.assert_array_equal(I1, completion.complete_graph(x0b, xt, k, bg(), nbase=nB, cache_root=root)[0])
    # other inputs (test vectors, base rows) get their own folder
    info2 = run(x0, unit(rs.randn(nt, d)))
    assert info2["cache_built"] and info2["cache"] != info["cache"]
    # a damaged file is detected and the cache computed again
    with open(os.path.join(info["cache"], "1.I"), "r+b") as f:
        f.truncate(100)
    assert run(x0, xt)["cache_built"]
    # a dead build's temporary folder is removed by the next build
    dead = os.path.join(root, "completion", "." + os.path.basename(info["cache"]) + ".tmp999999-host")
    os.makedirs(dead)
    import shutil
    shutil.rmtree(info["cache"])
    capsys.readouterr()
    assert run(x0, xt)["cache_built"] and not os.path.exists(dead)
    assert "removed %s" % dead in capsys.readouterr().out


def test_completion_cache_on_a_read_only_root(tmp_path, capsys, monkeypatch):
    """A root that cannot be written (a read-only data root; simulated: tests run as root, where
    permissions do not block writes): a complete cache there is read; without one the run goes
    without it, says so, and writes nothing; the graph equals brute force either way."""
    rs = np.random.RandomState(5)
    d, nB, nR, nbg, nt, k = 16, 60, 10, 400, 20, 6
    x0 = np.vstack([unit(rs.randn(nB, d)), unit(rs.randn(nR, d))])
    xb, xt = rs.randn(nbg, d).astype(np.float32), unit(rs.randn(nt, d))
    bg = _bg_files(tmp_path, xb)
    root = str(tmp_path / "cache")
    allx = np.vstack([x0, unit(xb)])

    def run():
        I_nodes, I_test, info = completion.complete_graph(x0, xt, k, bg(), nbase=nB, cache_root=root)
        np.testing.assert_array_equal(I_nodes, brute_union_knn(allx, allx, k))
        np.testing.assert_array_equal(I_test, brute_union_knn(xt, allx, k))
        return info

    monkeypatch.setattr(completion, "_writable", lambda path: False)
    capsys.readouterr()
    info = run()
    assert "cache" not in info and not os.path.exists(root)
    assert "is not writable" in capsys.readouterr().out
    monkeypatch.undo()
    built = run()                                       # a writable root: the cache is written
    assert built["cache_built"]
    monkeypatch.setattr(completion, "_writable", lambda path: False)
    info = run()
    assert info["cache"] == built["cache"] and not info["cache_built"]
    assert "is not writable" not in capsys.readouterr().out


def test_equal_similarities_keep_the_background_candidate(tmp_path):
    """As the 2018 merge (strict >): a labelled and a background candidate with the same similarity
    at the k-th place, the background one stays (products exact in every precision here)."""
    e = np.eye(4, dtype=np.float32)
    x0 = np.vstack([e[0], e[3]])                       # labelled: e1 (node 0), e4 (node 1)
    xb = np.vstack([e[0], e[1], -e[0], -e[1], -e[2]])  # background: e1 (node 2), e2 (node 3), ...
    xt = np.array([[0.5, 0.75, 0, 0]], dtype=np.float32)  # 0.75 with e2, then 0.5 with both e1
    bg = _bg_files(tmp_path, xb, K=4)
    for nbase, root in ((0, None), (1, str(tmp_path / "cache"))):
        I_nodes, I_test, _ = completion.complete_graph(x0, xt, 2, bg(), nbase=nbase, cache_root=root)
        assert I_test.tolist() == [[3, 2]]
        assert I_nodes[0].tolist() == [2, 0]            # labelled e1: the background e1 first


def test_completion_cache_concurrent_builders(tmp_path):
    """Two processes needing the same cache at once: one computes it, the other waits and reads it."""
    import subprocess
    import sys
    rs = np.random.RandomState(4)
    np.save(str(tmp_path / "xB.npy"), unit(rs.randn(3000, 32)))
    np.save(str(tmp_path / "xt.npy"), unit(rs.randn(500, 32)))
    rs.randn(20000, 32).astype(np.float32).tofile(str(tmp_path / "bg.raw"))
    script = (
        "import json, sys, numpy as np\n"
        "from lowshot import completion\n"
        "t = str(sys.argv[1])\n"
        "x = np.memmap(t + '/bg.raw', dtype=np.float32, mode='r', shape=(20000, 32))\n"
        "tables, info = completion.base_searches(t + '/cache', np.load(t + '/xB.npy'), np.load(t + '/xt.npy'), x)\n"
        "print(json.dumps([info['cache_built'], int(np.asarray(tables['1'][1]).sum())]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(r[0] for r in res) == [False, True]
    assert res[0][1] == res[1][1]


def test_diffuse_dense_and_lslice():
    rs = np.random.RandomState(1)
    import graph_utils
    n, nl, nt, k, C, niter = 120, 30, 20, 5, 7, 4
    I_nodes = np.array([rs.choice(n, k, replace=False) for _ in range(n)], dtype=np.int32)
    I_nodes[3, 2] = -1   # a missing neighbour is skipped
    I_test = np.array([rs.choice(n, k, replace=False) for _ in range(nt)], dtype=np.int32)
    y_lab = rs.randint(C - 1, size=nl)   # class C-1 has no labelled node: its column stays 0
    W = graph_utils.knn_to_graph(I_nodes, n)
    T = graph_utils.csr_from_knn(I_test, n)
    ref = dense_diffusion(I_nodes, I_test, y_lab, C, niter)
    full = dif.diffuse(W, T, y_lab, C, niter)
    for a, b in zip(full, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not full[-1][:, C - 1].any()
    sliced = dif.diffuse(W, T, y_lab, C, niter, lslice=3)
    for a, b in zip(full, sliced):
        np.testing.assert_array_equal(a, b)
    part = dif.diffuse(W, T, y_lab, C, niter, class_range=(2, 6), lslice=3)
    for a, b in zip(full, part):
        np.testing.assert_array_equal(a[:, 2:6], b)
    # breadth-first renumbering: same scores (sums in another order), labelled nodes moved
    W2, T2, new_id = dif.reorder(W, T)
    lab_nodes = new_id[:nl]
    assert sorted(set(lab_nodes.tolist())) == sorted(lab_nodes.tolist()) and len(lab_nodes) == nl
    for a, b in zip(dif.diffuse(W2, T2, y_lab, C, niter, lab_nodes=lab_nodes), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sparse_first_iterations():
    """Few labelled nodes in a large graph: the first iterations run on a sparse L (spgemm), then
    dense blocks; the same scores as the dense numpy loop and as all-dense, whatever the blocks."""
    rs = np.random.RandomState(5)
    import graph_utils
    n, nl, nt, k, C, niter = 3000, 12, 40, 4, 10, 5
    I_nodes = np.array([rs.choice(n, k, replace=False) for _ in range(n)], dtype=np.int32)
    I_test = np.array([rs.choice(n, k, replace=False) for _ in range(nt)], dtype=np.int32)
    y_lab = rs.randint(C - 1, size=nl)     # class C-1 has no labelled node
    W = graph_utils.knn_to_graph(I_nodes, n)
    T = graph_utils.csr_from_knn(I_test, n)
    ref = dense_diffusion(I_nodes, I_test, y_lab, C, niter)
    stored = {}
    t0, _ = dif.sparse_iterations(W, T, y_lab, None, 0, C, niter, [np.empty((nt, C), np.float32)] * (niter + 1))
    assert 1 <= t0 < niter                   # both phases run
    got = dif.diffuse(W, T, y_lab, C, niter, lslice=4, on_iter=lambda t, b0, b1, L: stored.__setitem__((t, b0), L.copy()))
    dense = dif.diffuse(W, T, y_lab, C, niter, lslice=4, sparse_start=False)
    for a, b, r in zip(got, dense, ref):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert not got[-1][:, C - 1].any()
    # on_iter: every iteration and block once, dense (n, block) with columns summing to 1 (or 0)
    assert sorted(stored) == [(t, b) for t in range(niter + 1) for b in (0, 4, 8)]
    for (t, b0), L in stored.items():
        assert L.shape == (n, min(C, b0 + 4) - b0)
        s = L.sum(0)
        assert np.allclose(s[s > 0], 1, rtol=1e-5)
    with pytest.raises(dif.InputError, match="labelled node ids must lie in 0..2999, got 5..3000"):
        dif.diffuse(W, T, y_lab[:2], C, niter, lab_nodes=np.array([5, 3000]))
    # class slices give the same scores
    part = dif.diffuse(W, T, y_lab, C, niter, class_range=(3, 9), lslice=2)
    for a, b in zip(got, part):
        np.testing.assert_allclose(a[:, 3:9], b, rtol=1e-6, atol=1e-9)


def test_auto_lslice():
    # 128 columns, fewer when two (n, lslice) float32 blocks would exceed 4 GiB, multiples of 16
    assert dif.auto_lslice(10**6, 507) == 128
    assert dif.auto_lslice(10**7, 507) == 48
    assert dif.auto_lslice(10**8, 507) == 16
    assert dif.auto_lslice(500, 7) == 7
    n = 10**7
    assert 2 * 4 * n * dif.auto_lslice(n, 507) <= dif.LSLICE_BYTES < 2 * 4 * n * (dif.auto_lslice(n, 507) + 16)


def test_merge_slice_tops_ties():
    # ties broken by the lowest class id, across slices
    S = np.array([[1, 3, 3, 0, 3, 3, 3, 2],
                  [0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    parts = [dif.slice_top([S[:, a:b]], a) for a, b in ((0, 3), (3, 5), (5, 8))]
    ids = dif.merge_slice_tops(parts)[0]
    np.testing.assert_array_equal(ids, [[1, 2, 4, 5, 6], [0, 1, 2, 3, 4]])


@pytest.fixture(scope="module")
def tiny_ddir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ddir"))
    generate_ddir(root, nclass=24, ntrain=8, ntest=4, D=32, d=16, nbg=500, nclutter=6, block=256)
    build_graph.main(["500", "--ddir", root, "--method", "exact", "--recall_nq", "0"])
    return root


def run_json(main, argv, capsys):
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def common_args(root, *extra):
    return ["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
            "--nlabeled", "2", "--seed", "3", "--k", str(K_GRAPH), "--nbg", "500",
            "--niter", "3", *extra]


def test_diffusion_end_to_end(tiny_ddir, tmp_path, capsys):
    root = tiny_ddir
    res = run_json(diffusion.main, common_args(root, "--storeL", str(tmp_path / "L.npy"),
                                               "--storeLname", str(tmp_path / "h.pkl"),
                                               "--storeLiters", str(tmp_path / "L_%d_%d_%d.npy"),
                                               "--result", str(tmp_path / "r.json")), capsys)
    assert json.load(open(tmp_path / "r.json")) == res
    # independent reference: brute-force graph over labelled U background, dense diffusion
    d = data.load_lowshot(root, root + "/label_idx.json", "test", 2, 3)
    vt = faiss.read_VectorTransform(data.feature_paths(root)["pca"])
    x0 = unit(vt.apply(d.Xl))
    xt = unit(vt.apply(d.Xte))
    xb = unit(np.fromfile(data.feature_paths(root)["background"], dtype=np.float32).reshape(500, 16))
    allx = np.vstack([x0, xb])
    ref = dense_diffusion(brute_union_knn(allx, allx, K_GRAPH), brute_union_knn(xt, allx, K_GRAPH),
                          d.yl, d.split.nclass, 3)
    np.testing.assert_allclose(np.load(tmp_path / "L.npy"), ref[-1], rtol=1e-5, atol=1e-7)
    # --storeLname: the 2018 pickle of every iteration's test scores
    import pickle
    hist = pickle.load(open(tmp_path / "h.pkl", "rb"))
    assert len(hist) == 4
    for S, R in zip(hist, ref):
        np.testing.assert_allclose(S, R, rtol=1e-5, atol=1e-7)
    # --storeLiters: the full node matrix after each step s, file pattern % (s, first class, end class);
    # the test images' scores are the sums of its rows over their neighbours
    T = np.zeros((len(xt), len(allx)))
    for i, row in enumerate(brute_union_knn(xt, allx, K_GRAPH)):
        T[i, row] = 1
    C = d.split.nclass
    for step in range(3):
        L = np.load(tmp_path / ("L_%d_0_%d.npy" % (step, C)))
        assert L.shape == (len(allx), C)
        np.testing.assert_allclose(T @ L, ref[step + 1], rtol=1e-4, atol=1e-6)
    assert [it["iter"] for it in res["iters"]] == [0, 1, 2, 3]
    novel = d.split.is_novel[d.yte]
    for it, S in zip(res["iters"], ref):
        assert (it["top5"], it["top5_novel"]) == evaluate.top5(S, d.yte, d.split.is_novel)
        # top-1: numpy's argmax takes the first maximum, the lowest class id, as the tie rule
        hit = np.argmax(S, axis=1) == d.yte
        assert (it["top1"], it["top1_novel"]) == pytest.approx((hit.mean(), hit[novel].mean()), abs=1e-12)
    for m in ("top1", "top1_novel", "top5", "top5_novel"):
        assert res[m] == res["iters"][-1][m]
    assert res["top5"] > res["iters"][0]["top5"]   # diffusion reaches test images

    # renumbering the nodes (automatic only on large graphs) gives the same scores, and --storeLiters
    # stores L in graph order whatever the renumbering
    run_json(diffusion.main, common_args(root, "--reorder", "on", "--storeL", str(tmp_path / "Lr.npy"),
                                         "--storeLiters", str(tmp_path / "Lr_%d_%d_%d.npy")), capsys)
    np.testing.assert_allclose(np.load(tmp_path / "Lr.npy"), ref[-1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(tmp_path / ("Lr_2_0_%d.npy" % C)), np.load(tmp_path / ("L_2_0_%d.npy" % C)),
                               rtol=1e-5, atol=1e-9)

    # --lslice gives the same scores
    run_json(diffusion.main, common_args(root, "--lslice", "4", "--storeL", str(tmp_path / "L4.npy")),
             capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "L4.npy"), np.load(tmp_path / "L.npy"))

    # job-array slices merged == one run
    C = d.split.nclass
    cuts = [0, 3, C // 2, C]
    slices = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        slices.append(str(tmp_path / ("s%d.npz" % a)))
        run_json(diffusion.main, common_args(root, "--class_range", "%d:%d" % (a, b),
                                             "--store_slice", slices[-1]), capsys)
    merged = run_json(diffusion.main, ["--merge_slices", *slices[::-1]], capsys)
    for key in ("iters", "top1", "top1_novel", "top5", "top5_novel", "k", "nbg", "niter", "seed", "mode"):
        assert merged[key] == res[key], key
    with pytest.raises(InputError, match="a slice is missing"):
        diffusion.main(["--merge_slices", slices[0], slices[2]])


def test_diffusion_indomain(tiny_ddir, capsys):
    res = run_json(diffusion.main, common_args(tiny_ddir, "--indomain"), capsys)
    d = data.load_lowshot(tiny_ddir, tiny_ddir + "/label_idx.json", "test", 2, 3, indomain=True)
    assert res["indomain"] and res["graph"]["nodes"] == len(d.yl) + len(d.yu) + 500


def test_diffusion_bad_inputs(tiny_ddir, tmp_path):
    root = tiny_ddir
    args = common_args(root)
    with pytest.raises(InputError, match=r"k = 60 but the graph has only 54 nodes"):
        diffusion.main(args + ["--k", "60", "--nbg", "0"])
    with pytest.raises(InputError, match=r"fewer than nbg = 600"):
        diffusion.main(args + ["--nbg", "600"])
    with pytest.raises(InputError, match=r"ndis400_k8_I_11.int32.*python build_graph.py 400 --ddir"):
        diffusion.main(args + ["--nbg", "400"])
    with pytest.raises(InputError, match=r"--class_range needs --store_slice"):
        diffusion.main(args + ["--class_range", "0:2"])
    with pytest.raises(InputError, match=r"argument --lslice: must be >= 0, got -5"):
        diffusion.main(args + ["--lslice", "-5"])
    # --storeLiters keeps its 2018 meaning: the comma list of earlier versions is refused
    with pytest.raises(InputError, match=r"--storeLiters '0,2': this flag takes the 2018 code's printf"):
        diffusion.main(args + ["--storeLiters", "0,2"])
    with pytest.raises(InputError, match=r"expected a printf pattern with three integers"):
        diffusion.main(args + ["--storeLiters", str(tmp_path / "L_%d.npy")])
    with pytest.raises(InputError, match=r"must use the step"):
        diffusion.main(args + ["--storeLiters", str(tmp_path / "L_%0.0s%d_%d.npy")])


def test_damaged_background_table(tiny_ddir, tmp_path):
    """A k-NN table holding an id outside the background: one-line error naming the file."""
    import shutil
    root = str(tmp_path / "ddir")
    shutil.copytree(tiny_ddir, root)
    from lowshot import data
    p = stored_graph.graph_paths(root, 500, 32)        # build_graph.py's default K
    I = np.fromfile(p["I"], dtype=np.int32).reshape(500, 32)
    I[56, 3] = 123456843                       # a column the run reads (k = 6)
    I.tofile(p["I"])
    with pytest.raises(InputError, match=r"ndis500_k32_I_11.int32: I\[56, 3\] = 123456843 is neither -1 nor a "
                                         r"background id \(< 500\).*build_graph.py 500 --force"):
        diffusion.main(common_args(root))


def test_fusion_hand_computed(tiny_ddir, tmp_path, capsys):
    root = tiny_ddir
    split = data.load_split(root + "/label_idx.json", "test")
    y, _ = data.load_labels(data.feature_paths(root)["val"], split)
    nt, C = y.size, split.nclass
    rs = np.random.RandomState(5)
    P = rs.dirichlet(np.ones(C), size=nt).astype(np.float32)
    S = (rs.rand(nt, C) * 7).astype(np.float32)
    S[0] = 0                                    # an image the diffusion did not reach
    np.save(tmp_path / "p.npy", P)
    np.save(tmp_path / "s.npy", S)
    ws = [0.0, 0.25, 1.0]
    res = run_json(fusion.main, ["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                                 "--logreg_scores", str(tmp_path / "p.npy"),
                                 "--diffusion_scores", str(tmp_path / "s.npy"),
                                 "--weights", "0,0.25,1"], capsys)
    assert res["weights"] == ws
    for j, w in enumerate(ws):
        ahead = []
        for i in range(nt):
            s = S[i].astype(np.float64)
            s = s / s.sum() if s.sum() > 0 else s
            f = (1 - w) * P[i] / P[i].astype(np.float64).sum() + w * s
            ahead.append(sum(1 for c in range(C) if f[c] > f[y[i]] or (f[c] == f[y[i]] and c < y[i])))
        for k in (1, 5):
            hits = np.array(ahead) < k
            assert res["top%d" % k][j] == pytest.approx(hits.mean(), abs=1e-12)
            assert res["top%d_novel" % k][j] == pytest.approx(hits[split.is_novel[y]].mean(), abs=1e-12)
    assert res["metric"] == "top5" and res["best_weight"] == ws[int(np.argmax(res["top5"]))]
    res1 = run_json(fusion.main, ["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                                  "--logreg_scores", str(tmp_path / "p.npy"), "--metric", "top1",
                                  "--diffusion_scores", str(tmp_path / "s.npy"), "--weights", "0,0.25,1"], capsys)
    assert res1["best_weight"] == ws[int(np.argmax(res["top1"]))] and res1["best_top1"] == max(res["top1"])
    np.save(tmp_path / "bad.npy", P[:, :-1])
    with pytest.raises(InputError, match="bad.npy has shape"):
        fusion.main(["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                     "--logreg_scores", str(tmp_path / "bad.npy"),
                     "--diffusion_scores", str(tmp_path / "s.npy")])
    # a 2018 logreg score file holds log-probabilities: read as such, the same fusion
    np.save(tmp_path / "logp.npy", np.log(P))
    capsys.readouterr()
    res2 = run_json(fusion.main, ["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                                  "--logreg_scores", str(tmp_path / "logp.npy"),
                                  "--diffusion_scores", str(tmp_path / "s.npy"),
                                  "--weights", "0,0.25,1"], capsys)
    for a, b in zip(res2["top5"], res["top5"]):
        assert a == b                              # exp(log(p)) = p up to rounding: the same ranks
    mixed = np.log(P)
    mixed[0, 0] = 1
    np.save(tmp_path / "mixed.npy", mixed)
    with pytest.raises(InputError, match="mixed.npy holds negative scores: expected probabilities"):
        fusion.main(["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                     "--logreg_scores", str(tmp_path / "mixed.npy"), "--diffusion_scores", str(tmp_path / "s.npy")])
    with pytest.raises(InputError, match="logp.npy holds negative scores: expected diffusion mass"):
        fusion.main(["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                     "--logreg_scores", str(tmp_path / "p.npy"), "--diffusion_scores", str(tmp_path / "logp.npy")])


def test_default_niter_is_the_2018_validated_table(tiny_ddir, capsys):
    """Without --niter: the iterations the 2018 run_diffusion.bash validated (k = 30), else 3."""
    assert dif.default_niter(10**6, 2, 30)[0] == 3 and dif.default_niter(10**6, 20, 30)[0] == 2
    assert dif.default_niter(10**7, 2, 30)[0] == 4 and dif.default_niter(10**7, 10, 30)[0] == 3
    assert dif.default_niter(10**8, 1, 30)[0] == 7 and dif.default_niter(10**8, 20, 30)[0] == 4
    assert dif.default_niter(0, 5, 30)[0] == 1 and dif.default_niter(10**5, 2, 30)[0] == 3
    assert dif.default_niter(10**6, 2, 20) == (3, dif.default_niter(10**6, 2, 20)[1])   # other k: 3
    assert "no validated value" in dif.default_niter(500, 2, 30)[1]
    args = common_args(tiny_ddir)
    i = args.index("--niter")
    del args[i:i + 2]
    res = run_json(diffusion.main, args, capsys)
    assert res["niter"] == 3


def test_graph_files_named_as_the_2018_code(tiny_ddir, tmp_path, capsys):
    """The background table under the 2018 code's other names (.npy, .int{K} / .float{K}) is read
    as the project's own, with the same result."""
    import shutil
    ref = run_json(diffusion.main, common_args(tiny_ddir), capsys)
    root = str(tmp_path / "ddir")
    shutil.copytree(tiny_ddir, root)
    shutil.rmtree(os.path.join(root, "cache"), ignore_errors=True)
    p32, p = stored_graph.graph_paths(root, 500, 32), stored_graph.graph_paths(root, 500, 8)
    I = np.fromfile(p32["I"], dtype=np.int32).reshape(500, 32)[:, :8].copy()   # the 8 nearest
    D = np.fromfile(p32["D"], dtype=np.float32).reshape(500, 32)[:, :8].copy()
    os.remove(p32["I"])
    os.remove(p32["D"])
    I.tofile(p["I"][:-len("int32")] + "int8")          # the 2018 raw names for K = 8
    D.tofile(p["D"][:-len("float32")] + "float8")
    res = run_json(diffusion.main, common_args(root), capsys)
    assert res["iters"] == ref["iters"]
    for f in (p["I"][:-len("int32")] + "int8", p["D"][:-len("float32")] + "float8"):
        os.remove(f)
    np.save(p["I"][:-len("int32")] + "npy", I.astype(np.int64))   # np.save'd, ids int64
    np.save(p["D"][:-len("float32")] + "npy", D)
    res = run_json(diffusion.main, common_args(root), capsys)
    assert res["iters"] == ref["iters"]
    np.save(p["D"][:-len("float32")] + "npy", D[:100])
    with pytest.raises(InputError, match=r"_D_11.npy holds float32 \(100, 8\), expected"):
        diffusion.main(common_args(root))
