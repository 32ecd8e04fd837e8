"""The Python API (lowshot.LabelDiffusion, lowshot.knn_graph) against diffusion.py, a dense numpy
statement of the method, brute-force k-NN, and scikit-learn's estimator checks."""
import json
import os
import pickle
import re
import subprocess
import sys
import warnings

import faiss
import numpy as np
import pytest

import diffusion
from lowshot import KnnGraph, LabelDiffusion, api, data, knn_graph, stored_graph
from lowshot import diffuse as dif
from test_diffusion import K_GRAPH, common_args, run_json, tiny_ddir  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clustered(n, d, nclass, seed, spread=0.6):
    """Points around nclass random unit centres (no equal similarities), and their classes."""
    rs = np.random.RandomState(seed)
    centres = rs.randn(nclass, d)
    y = rs.randint(nclass, size=n)
    return (centres[y] + spread * rs.randn(n, d)).astype(np.float32), y


def brute_knn(x, k):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.argsort(-(u.astype(np.float64) @ u.T.astype(np.float64)), axis=1, kind="stable")[:, :k]


def dense_L(I, lab_nodes, y_lab, nclass, niter):
    """The method as dense numpy: W = rownorm(W0 + W0^T), L0 one-hot colnorm, L <- colnorm(W L)."""
    n = len(I)
    W0 = np.zeros((n, n))
    for i, row in enumerate(I):
        W0[i, row] = 1
    W = W0 + W0.T
    W /= W.sum(axis=1, keepdims=True)
    L = np.zeros((n, nclass))
    L[lab_nodes, y_lab] = 1
    for t in range(niter + 1):
        L = L if t == 0 else W @ L
        L /= np.where(L.sum(axis=0) == 0, 1, L.sum(axis=0))
    return L


def rownorm(S):
    s = S.sum(axis=1, keepdims=True)
    return np.where(s > 0, S / np.where(s > 0, s, 1), 1.0 / S.shape[1])


def test_same_scores_as_diffusion_py(tiny_ddir, tmp_path, capsys):
    """LabelDiffusion on diffusion.py's inputs (PCA'd labelled images, the raw background file, the
    test images) gives diffusion.py --storeL's scores, scaled to sum 1 per row."""
    root = tiny_ddir
    res = run_json(diffusion.main, common_args(root, "--storeL", str(tmp_path / "S.npy")), capsys)
    S = np.load(tmp_path / "S.npy")
    d = data.load_lowshot(root, root + "/label_idx.json", "test", 2, 3)
    vt = faiss.read_VectorTransform(data.feature_paths(root)["pca"])
    bg = data.open_background(root, 500, d=vt.d_out)
    assert isinstance(bg, np.memmap)
    clf = LabelDiffusion(k=K_GRAPH, niter=3).fit(vt.apply(d.Xl), d.yl, background=bg)
    assert np.array_equal(clf.classes_, np.arange(d.split.nclass))
    assert clf.graph_info_["nodes"] == res["graph"]["nodes"] and clf.graph_info_["W_nnz"] == res["graph"]["W_nnz"]
    P = clf.predict_proba(vt.apply(d.Xte))
    np.testing.assert_allclose(P, rownorm(S), rtol=1e-4, atol=1e-6)
    assert np.array_equal(clf.predict(vt.apply(d.Xte)), np.argmax(S, axis=1))


@pytest.mark.parametrize("exact_rows", [None, 100])
def test_transduction_equals_dense_reference(monkeypatch, exact_rows):
    """label_distributions_ are the rows of the dense method's L over the exact k-NN graph of all
    rows; with exact_rows = 100, X's unlabelled rows take the other path (a graph of their own,
    completed with the labelled rows), which must give the same graph."""
    if exact_rows:
        monkeypatch.setattr(api, "EXACT_ROWS", exact_rows)
    X, y = clustered(400, 12, 5, seed=1)
    rs = np.random.RandomState(2)
    y_few = np.full_like(y, -1)
    lab = np.sort(rs.choice(400, 20, replace=False))
    y_few[lab] = y[lab]
    clf = LabelDiffusion(k=7, niter=4, graph_method="exact").fit(X.astype(np.float64), y_few)
    order = np.concatenate([lab, np.setdiff1d(np.arange(400), lab)])       # the estimator's node order
    I = brute_knn(X[order], 7)
    L = dense_L(I, np.arange(20), np.searchsorted(np.unique(y[lab]), y[lab]), len(np.unique(y[lab])), 4)
    ref = np.empty_like(L)
    ref[order] = L
    np.testing.assert_allclose(clf.label_distributions_, rownorm(ref), rtol=1e-4, atol=1e-6)
    assert np.array_equal(clf.transduction_, clf.classes_[np.argmax(ref, axis=1)])
    assert (clf.background_graph_ is not None) == bool(exact_rows)
    assert (clf.transduction_ == y).mean() > 0.8


def test_diffuse_knn_renumbering_keeps_node_order():
    X, y = clustered(300, 8, 4, seed=3)
    I = brute_knn(X, 6).astype(np.int32)
    It = brute_knn(X[:50], 6).astype(np.int32)
    out = {}
    for renumber in ("off", "on"):
        out[renumber] = dif.diffuse_knn(I, It, y[:30], 4, 3, renumber=renumber, lslice=3, keep_L=True)
    np.testing.assert_allclose(out["on"][1], out["off"][1], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out["on"][1], dense_L(I, np.arange(30), y[:30], 4, 3), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["on"][0][-1], out["off"][0][-1], rtol=1e-5, atol=1e-8)


def test_knn_graph_against_brute_force_save_load_and_reuse(tmp_path):
    X, y = clustered(1200, 16, 6, seed=4)
    g = knn_graph(X, k=10, method="exact", device="cpu")
    assert (g.n, g.K, g.method) == (1200, 16, "exact") and g.recall is None
    np.testing.assert_array_equal(g.I, brute_knn(X, 16))
    u = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(g.D, np.take_along_axis(u @ u.T, g.I.astype(np.int64), axis=1), atol=1e-5)
    # the published layout: diffusion.py's reader finds it, and a loaded graph serves a fit
    paths = g.save(str(tmp_path))
    assert os.path.basename(paths["I"]) == "ndis1200_k16_I_11.int32"
    g2 = KnnGraph.load(str(tmp_path), 1200, k=10)
    np.testing.assert_array_equal(np.asarray(g2.I), g.I)
    Xl, yl = clustered(60, 16, 6, seed=5)
    ref = LabelDiffusion(k=10, niter=2).fit(Xl, yl, background=X)
    fitted = LabelDiffusion(k=10, niter=2).fit(Xl, yl, background=X, background_graph=g2)
    np.testing.assert_allclose(fitted.predict_proba(X[:100]), ref.predict_proba(X[:100]), rtol=1e-6)
    # a fitted estimator with its faiss index pickles
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.predict_proba(X[:100]), fitted.predict_proba(X[:100]))
    # torch tensors and float64 give the float32 result
    torch = pytest.importorskip("torch")
    t = LabelDiffusion(k=10, niter=2).fit(torch.from_numpy(Xl.astype(np.float64)), torch.from_numpy(yl),
                                          background=torch.from_numpy(X))
    np.testing.assert_allclose(t.predict_proba(torch.from_numpy(X[:100])), ref.predict_proba(X[:100]), rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit the background"):
        LabelDiffusion(k=10).fit(Xl, yl, background=X[:1000], background_graph=g)


def test_knn_graph_ivf_path_with_recall(tmp_path):
    """Above the exact limit the resumable IVF build runs (forced here); recall is measured."""
    X, _ = clustered(6000, 16, 20, seed=6)
    g = knn_graph(X, k=8, method="ivf", device="cpu", path=str(tmp_path), recall_nq=200)
    assert g.method == "ivf" and isinstance(g.I, np.memmap) and 0.8 < g.recall <= 1.0
    assert os.path.isfile(stored_graph.graph_paths(str(tmp_path), 6000, 8)["index"])


def test_bad_inputs_one_line_errors():
    X, y = clustered(100, 8, 3, seed=7)
    cases = [
        (dict(), X[:, 0], y, "2D array"),
        (dict(), X, y[:50], "inconsistent numbers of samples"),
        (dict(), X, np.full(100, -1), "no labelled row"),
        (dict(k=0), X, y, "k must be a positive integer"),
        (dict(niter=-1), X, y, "niter must be None or an integer"),
        (dict(device="tpu"), X, y, "device must be one of"),
        (dict(graph_method="lsh"), X, y, "graph_method must be"),
        (dict(), np.where(X > 1, np.nan, X), y, "NaN"),
    ]
    for params, Xc, yc, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            LabelDiffusion(**params).fit(Xc, yc)
        if msg not in ("2D array", "NaN"):        # scikit-learn's own messages run over several lines
            assert "\n" not in str(e.value).strip(), str(e.value)
    with pytest.raises(ValueError, match="background has 5 columns, X has 8"):
        LabelDiffusion().fit(X, y, background=np.ones((50, 5), np.float32))
    with pytest.raises(ValueError, match="background_graph is given without its background"):
        LabelDiffusion().fit(X, y, background_graph=object())
    with pytest.raises(ValueError, match="k = 30 needs K = 32 stored neighbours but X has only 20 rows"):
        knn_graph(X[:20], k=30)
    clf = LabelDiffusion(k=5).fit(X, y)
    with pytest.raises(ValueError, match="X has 7 features, but LabelDiffusion is expecting 8"):
        clf.predict(X[:, :7])


def test_zero_rows_warn_and_small_data_reduces_k():
    X, y = clustered(40, 6, 2, seed=8)
    X[3] = 0
    with pytest.warns(UserWarning, match="1 row\\(s\\) that are all zeros"):
        LabelDiffusion(k=5).fit(X, y)
    with pytest.warns(UserWarning, match="k = 30 but the graph has only 20 nodes: k = 19 is used"):
        clf = LabelDiffusion().fit(X[20:], y[20:])
    assert clf.predict_proba(X).shape == (40, 2)


def test_scikit_learn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(LabelDiffusion(), on_fail=None, expected_failed_checks={
            "check_classifiers_classes": "-1 marks unlabelled rows (scikit-learn's semi-supervised convention)"})
    bad = [(r["check_name"], str(r["exception"])[:200]) for r in results
           if r["status"] == "failed"]
    assert not bad
    assert sum(r["status"] == "passed" for r in results) >= 45


def test_pipeline_and_grid_search():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = load_digits(return_X_y=True)
    search = GridSearchCV(make_pipeline(StandardScaler(), LabelDiffusion(niter=2)),
                          {"labeldiffusion__k": [5, 15]}, cv=3).fit(X[:900], y[:900])
    assert search.best_params_["labeldiffusion__k"] in (5, 15)
    assert search.score(X[900:], y[900:]) > 0.85
    assert search.best_estimator_[-1].get_params()["k"] == search.best_params_["labeldiffusion__k"]


def test_help_explains_every_parameter():
    import inspect
    import lowshot
    doc = lowshot.LabelDiffusion.__doc__
    for name in inspect.signature(LabelDiffusion.__init__).parameters:
        if name != "self":
            assert re.search(r"^    %s : " % name, doc, re.M), name
    for name in inspect.signature(knn_graph).parameters:
        assert re.search(r"^    %s : " % name, knn_graph.__doc__, re.M), name


def test_import_changes_no_global_state():
    """Importing lowshot and its API leaves threads, OpenMP settings, logging and the environment alone."""
    code = """
import json, logging, os, sys
import numpy, scipy, faiss, sklearn, threadpoolctl
def state():
    info = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    return {"threads": info, "env": dict(os.environ), "root": len(logging.getLogger().handlers),
            "lowshot": len(logging.getLogger("lowshot").handlers), "level": logging.getLogger().level}
before = state()
import lowshot
from lowshot import LabelDiffusion, knn_graph
import graph_utils
after = state()
# libraries loaded by the import (graph_utils' OpenMP) may join; none already loaded changes
after["threads"] = {p: n for p, n in after["threads"].items() if p in before["threads"]}
print(json.dumps(before == after or [before, after]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True, out.stdout


def readme_example():
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- api-example:begin -->\n```python\n(.*?)```\n(.*?)<!-- api-example:end -->", text, re.S)
    assert m, "README's Python example (between the api-example markers) not found"
    return m.group(1), m.group(2)


def test_readme_example_runs_and_prints_what_the_readme_says(tmp_path):
    code, after = readme_example()
    assert len(code.strip().splitlines()) <= 12
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                         check=True).stdout.strip()
    assert out and out in after, (out, after)


@pytest.mark.parametrize("variant", ["spreading", "propagation"])
def test_variants_equal_scikit_learn_through_the_estimator(variant):
    """LabelDiffusion(variant=...) with its defaults (niter, tol) is scikit-learn's estimator of the
    same name on the same graph (unit rows: Euclidean neighbours are the cosine ones)."""
    from sklearn.semi_supervised import LabelPropagation, LabelSpreading
    X, y = clustered(500, 10, 4, seed=11)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y_few = np.full_like(y, -1)
    y_few[np.random.RandomState(12).choice(500, 24, replace=False)] = y[:24]
    ref = (LabelSpreading if variant == "spreading" else LabelPropagation)(kernel="knn", n_neighbors=8)
    ref.fit(X.astype(np.float64), y_few)
    clf = LabelDiffusion(k=8, variant=variant).fit(X, y_few)
    np.testing.assert_allclose(clf.label_distributions_, ref.label_distributions_, rtol=1e-3, atol=1e-5)
    assert (clf.transduction_ == ref.transduction_).mean() > 0.99
    Xq, _ = clustered(50, 10, 4, seed=13)
    np.testing.assert_allclose(clf.predict_proba(Xq), ref.predict_proba(Xq), rtol=1e-3, atol=1e-5)


def test_scripts_make_waiting_openmp_threads_sleep_soon():
    """Every stage script imports lowshot.omp_env before anything else (GOMP_SPINCOUNT=1000 unless the
    user set it or OMP_WAIT_POLICY: the runtimes read it when they load); importing the library alone
    does not."""
    import ast
    for script in ("build_graph.py", "diffusion.py", "logreg.py", "save_features.py", "train_apply_pca.py",
                   "own_data.py", "fusion.py", "generate_ddir.py"):
        tree = ast.parse(open(os.path.join(ROOT, script)).read())
        first = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
        assert isinstance(first, ast.Import) and first.names[0].name == "lowshot.omp_env", script
    code = "import os, lowshot.omp_env; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(env, **extra)).stdout.split()
    assert run() == ["1000", "None"]
    assert run(GOMP_SPINCOUNT="50") == ["50", "None"]
    assert run(OMP_WAIT_POLICY="active") == ["None", "active"]
    out = subprocess.run([sys.executable, "-c", "import os, lowshot; from lowshot import api; "
                          "print(os.environ.get('GOMP_SPINCOUNT'))"], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "None"
