"""The variants (lowshot.method) against their reference implementations on the same graph:
scikit-learn's LabelSpreading / LabelPropagation (kernel="knn"), graphlearning's Poisson learning and
k-NN weights, and a dense numpy statement of every formula; with class blocks, renumbering, tol and
the torch backend."""
import numpy as np
import pytest

from test_diffusion import tiny_ddir  # noqa: F401 (fixture)

import graph_utils
from lowshot import diffuse as dif
from lowshot import method, torch_backend
from lowshot.common import InputError


def unit_clusters(n, d, nclass, seed):
    """Unit vectors around nclass centres (Euclidean k-NN = cosine k-NN, no ties), and classes."""
    rs = np.random.RandomState(seed)
    y = rs.randint(nclass, size=n)
    x = rs.randn(nclass, d)[y] + 0.8 * rs.randn(n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def knn_table(x, k):
    """Brute-force k-NN (self first), float64, and the similarities."""
    S = x.astype(np.float64) @ x.T.astype(np.float64)
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return I.astype(np.int32), np.take_along_axis(S, I, axis=1).astype(np.float32)


def dense_reference(I, D, m, y, lab, niter, C=None):
    """Every variant written out densely (module table of lowshot.method), float64: out(L_niter)."""
    n, C = len(I), C or y.max() + 1
    W0 = np.zeros((n, n))
    w = np.ones(I.shape) if m.weights == "binary" else method.edge_weights(D, m.weights, m.power).astype(np.float64)
    for i in range(n):
        W0[i, I[i]] = w[i]
    Y = np.zeros((n, C))
    Y[lab, y[lab]] = 1

    def rownorm(M):
        s = M.sum(axis=1, keepdims=True)
        return np.where(s > 0, M / np.where(s > 0, s, 1), 0)

    def colnorm(M):
        s = M.sum(axis=0, keepdims=True)
        return np.where(s > 0, M / np.where(s > 0, s, 1), 0)
    if m.variant == "douze18":
        A, L = rownorm(W0 + W0.T), colnorm(Y)
        for _ in range(niter):
            L = colnorm(A @ L)
        return L
    if m.variant == "spreading":
        A0 = W0 - np.diag(np.diag(W0))
        d = A0.sum(axis=0)
        s = 1 / np.sqrt(np.where(d > 0, d, 1))
        A, L = s[:, None] * A0 * s[None, :], Y.copy()
        for _ in range(niter):
            L = m.alpha * A @ L + (1 - m.alpha) * Y
        return rownorm(L)
    if m.variant == "propagation":
        A, L = rownorm(W0), Y.copy()
        for _ in range(niter):
            L = rownorm(A @ L)
            L[lab] = Y[lab]
        return L
    W = np.maximum(W0, W0.T) if m.weights == "binary" else (W0 + W0.T) / 2
    W -= np.diag(np.diag(W))
    deg = W.sum(axis=1)
    B = np.zeros((n, C))
    B[lab] = Y[lab] - Y[lab].mean(axis=0)
    L = np.zeros((n, C))
    for _ in range(niter):
        L = (W @ L + B) / deg[:, None]
    return L


def run(I, D, m, y, lab, niter, lslice=0, renumber="off", class_range=None, backend=torch_backend.CPU):
    """lowshot's engine: the node matrix out(L_niter) (lab rows first in node order is not needed)."""
    n, C = len(I), y.max() + 1
    nodes = np.concatenate([lab, np.setdiff1d(np.arange(n), lab)])        # labelled nodes first
    pos = np.empty(n, dtype=np.int64)
    pos[nodes] = np.arange(n)
    In = np.where(I[nodes] >= 0, pos[I[nodes]], -1).astype(np.int32)
    _, L, _ = dif.diffuse_knn(In, In[:5], y[lab], C, niter, class_range=class_range, lslice=lslice,
                              renumber=renumber, keep_L=True, method=m, D_nodes=D[nodes], backend=backend)
    out = np.empty_like(L)
    out[nodes] = L
    return out


VARIANT_CASES = [method.Method(v, w) for v in method.VARIANTS for w in method.WEIGHTS] + [
    method.Method("spreading", alpha=0.6), method.Method("douze18", "similarity", power=1.0)]


@pytest.mark.parametrize("m", VARIANT_CASES, ids=lambda m: "-".join(map(str, m.record().values())))
def test_every_variant_equals_its_dense_formula(m):
    x, y = unit_clusters(240, 10, 5, seed=1)
    I, D = knn_table(x, 8)
    lab = np.sort(np.random.RandomState(2).choice(240, 25, replace=False))
    y[lab[:5]] = np.arange(5)                        # every class labelled
    ref = dense_reference(I, D, m, y, lab, 6)
    got = run(I, D, m, y, lab, 6)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-6)
    # class blocks, renumbering and a job-array class range give the same columns
    np.testing.assert_allclose(run(I, D, m, y, lab, 6, lslice=2, renumber="on"), got, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run(I, D, m, y, lab, 6, class_range=(1, 4)), got[:, 1:4], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["spreading", "propagation"])
def test_spreading_and_propagation_equal_scikit_learn(variant):
    from sklearn.semi_supervised import LabelPropagation, LabelSpreading
    x, y = unit_clusters(300, 12, 4, seed=3)
    rs = np.random.RandomState(4)
    y_few = np.full_like(y, -1)
    lab = np.sort(rs.choice(300, 16, replace=False))
    y_few[lab] = y[lab]
    k, niter = 7, 12
    cls = LabelSpreading if variant == "spreading" else LabelPropagation
    # tol 0: exactly niter iterations; unit vectors: Euclidean neighbours are the cosine ones
    ref = cls(kernel="knn", n_neighbors=k, max_iter=niter, tol=0).fit(x.astype(np.float64), y_few)
    I, D = knn_table(x, k)
    got = run(I, D, method.Method(variant), y_few, lab, niter)
    np.testing.assert_allclose(got, ref.label_distributions_, rtol=1e-4, atol=1e-6)
    assert np.array_equal(np.argmax(got, axis=1), ref.transduction_)
    # with scikit-learn's own stopping rule (tol 1e-3, all classes in one block)
    ref = cls(kernel="knn", n_neighbors=k).fit(x.astype(np.float64), y_few)
    m = method.Method(variant, tol=1e-3)
    got = run(I, D, m, y_few, lab, method.DEFAULT_NITER[variant])
    np.testing.assert_allclose(got, ref.label_distributions_, rtol=1e-3, atol=1e-5)
    # new rows by one hop: scikit-learn's predict_proba sums the distributions of their k neighbours
    xq, _ = unit_clusters(40, 12, 4, seed=5)
    Iq = np.argsort(-(xq @ x.T), axis=1, kind="stable")[:, :k]
    S = got[Iq].sum(axis=1)
    np.testing.assert_allclose(S / S.sum(axis=1, keepdims=True), ref.predict_proba(xq), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("weights", ["binary", "gaussian"])
def test_poisson_and_gaussian_weights_equal_graphlearning(weights):
    gl = pytest.importorskip("graphlearning")
    x, y = unit_clusters(300, 12, 4, seed=6)
    lab = np.sort(np.random.RandomState(7).choice(300, 12, replace=False))
    y[lab[:4]] = np.arange(4)
    k, niter = 8, 40
    I, D = knn_table(x, k + 1)                  # graphlearning's k neighbours besides the point itself
    dist = np.sqrt(np.maximum(2 - 2 * D.astype(np.float64), 0))
    W = gl.weightmatrix.knn(None, k, kernel="uniform" if weights == "binary" else "gaussian",
                            knn_data=(I.astype(np.int64), dist))
    model = gl.ssl.poisson(W, solver="gradient_descent", min_iter=niter, max_iter=niter)
    u = model.fit(lab, y[lab])
    got = run(I, D, method.Method("poisson", weights), y, lab, niter)
    np.testing.assert_allclose(got, u, rtol=1e-3, atol=1e-5 * np.abs(u).max())
    assert (np.argmax(got, axis=1) == np.argmax(u, axis=1)).mean() > 0.99


def test_variants_on_torch_equal_graph_utils():
    pytest.importorskip("torch")
    x, y = unit_clusters(200, 8, 4, seed=8)
    I, D = knn_table(x, 6)
    lab = np.arange(0, 200, 9)
    torch_cpu = torch_backend.select("torch-cpu")
    for m in (method.Method("spreading", "similarity"), method.Method("propagation"),
              method.Method("poisson", "gaussian")):
        ref = run(I, D, m, y, lab, 5, lslice=3)
        np.testing.assert_allclose(run(I, D, m, y, lab, 5, lslice=3, backend=torch_cpu), ref, rtol=1e-4, atol=1e-6)


def test_tol_stops_and_repeats_the_last_scores():
    x, y = unit_clusters(150, 8, 3, seed=9)
    I, D = knn_table(x, 6)
    A = method.build_operator(I, 150, method.Method("propagation", tol=1e-3))
    T = graph_utils.csr_from_knn(I[:10], 150)
    S, runs = dif.diffuse(A, T, y[:20], 3, 200, return_runs=True)
    assert 1 <= runs[0] < 200
    t = runs[0]
    assert all(np.array_equal(S[t], S[u]) for u in range(t, 201))


@pytest.mark.parametrize("flags", [["--variant", "spreading", "--weights", "gaussian"],
                                   ["--variant", "poisson", "--niter", "20"],
                                   ["--variant", "propagation", "--weights", "similarity", "--power", "2"]])
def test_diffusion_py_runs_every_variant(tiny_ddir, tmp_path, capsys, flags):
    """diffusion.py --variant/--weights: its test scores are T out(L) of the dense formula over the
    brute-force graph of labelled and background images, and the result records the method."""
    import faiss
    import diffusion
    from lowshot import data
    from test_diffusion import K_GRAPH, brute_union_knn, common_args, run_json, unit
    args = common_args(tiny_ddir, "--storeL", str(tmp_path / "S.npy"))
    if "--niter" in flags:                                  # the flags' count, not common_args' 3
        i = args.index("--niter")
        args = args[:i] + args[i + 2:]
    res = run_json(diffusion.main, args + flags, capsys)
    d = data.load_lowshot(tiny_ddir, tiny_ddir + "/label_idx.json", "test", 2, 3)
    vt = faiss.read_VectorTransform(data.feature_paths(tiny_ddir)["pca"])
    xb = unit(np.fromfile(data.feature_paths(tiny_ddir)["background"], dtype=np.float32).reshape(500, 16))
    allx = np.vstack([unit(vt.apply(d.Xl)), xb])
    I = brute_union_knn(allx, allx, K_GRAPH)
    D = np.take_along_axis(allx @ allx.T, I, axis=1)
    m = method.Method(res["variant"], res["weights"], power=res.get("power", 3.0), tol=res.get("tol"))
    y = np.zeros(len(allx), dtype=np.int64)
    y[:len(d.yl)] = d.yl
    L = dense_reference(I, D, m, y, np.arange(len(d.yl)), res["niter"], C=d.split.nclass)
    T = np.zeros((len(d.yte), len(allx)))
    for i, row in enumerate(brute_union_knn(unit(vt.apply(d.Xte)), allx, K_GRAPH)):
        T[i, row] = 1
    tol = 1e-3 if m.tol else 1e-5
    np.testing.assert_allclose(np.load(tmp_path / "S.npy"), T @ L, rtol=tol, atol=tol * 1e-2)
    assert res["niter"] == (20 if "--niter" in flags else 3)


def test_bad_method_values():
    for kw, msg in ((dict(variant="heat"), "variant 'heat'"), (dict(weights="cos"), "weights 'cos'"),
                    (dict(alpha=1.0), "alpha 1.0"), (dict(power=0), "power 0"), (dict(tol=-1), "tol -1")):
        with pytest.raises(InputError, match=msg):
            method.Method(**kw)
