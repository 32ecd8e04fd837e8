"""A generated $DDIR read back exactly as a third party would (h5py, np.memmap, faiss), and its class
structure checked against brute-force nearest neighbours."""
import json
import os
import subprocess
import sys

import faiss
import h5py
import numpy as np
import pytest

import generate_ddir
from lowshot import data, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = dict(nclass=40, ntrain=8, ntest=5, D=48, d=24, nbg=3000, nclutter=20, pad=3, seed=5, block=700)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen"))
    generate_ddir.main([out] + ["--%s=%s" % kv for kv in P.items()])
    return out


def test_layout_third_party(gen):
    assert sorted(os.listdir(gen)) == ["features", "generate.json", "label_idx.json"]
    assert sorted(os.listdir(os.path.join(gen, "features"))) == [
        "PCAR256.vt", "f100m", "train.hdf5", "val.hdf5"]
    assert os.listdir(os.path.join(gen, "features", "f100m")) == ["concatenated_PCAR256.raw"]
    for name, per in (("train", P["ntrain"]), ("val", P["ntest"])):
        with h5py.File(os.path.join(gen, "features", name + ".hdf5"), "r") as f:
            n = P["nclass"] * per
            assert f["count"].shape == (1,) and f["count"][0] == n
            assert f["all_feats"].shape == (n + P["pad"], P["D"]) and f["all_feats"].dtype == np.float32
            assert f["all_labels"].shape == (n + P["pad"],) and f["all_labels"].dtype.kind == "i"
            X, y = f["all_feats"][:], f["all_labels"][:]
        assert (X[n:] == 0).all() and np.isfinite(X).all()
        assert (np.bincount(y[:n], minlength=P["nclass"]) == per).all()
        assert (np.diff(y[:n]) != 0).sum() > P["nclass"]            # classes interleaved in the file
    vt = faiss.read_VectorTransform(os.path.join(gen, "features", "PCAR256.vt"))
    pca = faiss.downcast_VectorTransform(vt)
    assert isinstance(pca, faiss.PCAMatrix)
    assert (pca.d_in, pca.d_out, pca.eigen_power, pca.random_rotation) == (P["D"], P["d"], 0, True)
    A = faiss.vector_to_array(pca.A).reshape(P["d"], P["D"])
    assert np.allclose(A @ A.T, np.eye(P["d"]), atol=1e-4)           # rotation of a PCA: no whitening
    raw = os.path.join(gen, "features", "f100m", "concatenated_PCAR256.raw")
    assert os.path.getsize(raw) == P["nbg"] * P["d"] * 4
    B = np.memmap(raw, dtype="float32", mode="r", shape=(P["nbg"], P["d"]))
    assert np.isfinite(B).all() and B.std() > 0
    sp = json.load(open(os.path.join(gen, "label_idx.json")))
    keys = ["base_classes_1", "novel_classes_1", "base_classes_2", "novel_classes_2"]
    allc = sorted(sum((sp[k] for k in keys), []))
    assert allc == list(range(1, P["nclass"] + 1))                   # 1-based partition
    assert sp["base_classes"] == sorted(sp["base_classes_1"] + sp["base_classes_2"])
    assert len(sp["label_names"]) == P["nclass"]
    assert [len(sp[k]) for k in keys] == [8, 12, 8, 12]               # ImageNet proportions
    assert json.load(open(os.path.join(gen, "generate.json")))["nbg"] == P["nbg"]


def test_read_with_lowshot_api(gen):
    ld = data.load_lowshot(gen, os.path.join(gen, "label_idx.json"), "test", 2, 1, indomain=True)
    assert ld.D == P["D"] and ld.split.nclass == 20
    assert ld.Xl.shape == (8 * P["ntrain"] + 12 * 2, P["D"]) and ld.Xte.shape == (20 * P["ntest"], P["D"])
    assert data.open_background(gen).shape == (P["nbg"], P["d"])
    assert data.load_pca(data.feature_paths(gen)["pca"], P["D"]).d_out == P["d"]


def test_class_structure(gen):
    """Brute-force nearest neighbours in the PCA space: test images find training images of their
    class far above chance, and background rows lie on the class curves (a test image's nearest
    background rows are closer than its nearest training image of another class)."""
    f = data.feature_paths(gen)
    split = data.load_split(os.path.join(gen, "label_idx.json"), "val")
    allsplit = data.Split(np.arange(P["nclass"]), [], path="all")
    Xtr, ytr = data.load_features(f["train"], allsplit)
    Xte, yte = data.load_features(f["val"], allsplit)
    vt = data.load_pca(f["pca"])
    Ptr, Pte = vt.apply(Xtr), vt.apply(Xte)
    B = np.array(data.open_background(gen))
    d2 = ((Pte[:, None, :] - Ptr[None]) ** 2).sum(-1)
    acc = (ytr[d2.argmin(1)] == yte).mean()
    assert acc > 10.0 / P["nclass"], acc
    other = np.where(ytr[None, :] != yte[:, None], d2, np.inf).min(1)
    dbg = ((Pte[:, None, :] - B[None]) ** 2).sum(-1).min(1)
    assert np.median(dbg) < np.median(other)
    assert split.nclass == 20


def test_deterministic_and_no_leftovers(gen, tmp_path):
    out = str(tmp_path / "again")
    generate.generate_ddir(out, **P)
    for rel in ("features/f100m/concatenated_PCAR256.raw", "label_idx.json"):
        assert open(os.path.join(out, rel), "rb").read() == open(os.path.join(gen, rel), "rb").read()
    for dirpath, _, files in os.walk(out):
        assert not [x for x in files if ".tmp" in x], files


def test_bad_parameters(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate_ddir.py"), str(tmp_path / "x"),
                        "--D", "16", "--d", "32"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: d 32 is larger than D 16"
    assert not os.path.exists(tmp_path / "x" / "features" / "train.hdf5")


def test_diffusion_over_background_helps(gen):
    """The generator's purpose: labels diffused over the background k-NN graph (a dense numpy/scipy
    loop, independent of lowshot.diffuse) classify novel test images better after 3 iterations than
    the labelled neighbours alone (iteration 0)."""
    import scipy.sparse as sp
    from lowshot import evaluate
    vt = data.load_pca(data.feature_paths(gen)["pca"])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    gain = []
    for seed in (1, 2, 3):
        ld = data.load_lowshot(gen, os.path.join(gen, "label_idx.json"), "test", 1, seed)
        G = unit(np.vstack([vt.apply(ld.Xl), np.array(data.open_background(gen))]))
        T = unit(vt.apply(ld.Xte))
        k, N, C = 10, G.shape[0], ld.split.nclass
        I = np.argsort(-(G @ G.T), axis=1, kind="stable")[:, :k]
        It = np.argsort(-(T @ G.T), axis=1, kind="stable")[:, :k]
        W0 = sp.csr_matrix((np.ones(N * k), I.ravel(), np.arange(0, N * k + 1, k)), shape=(N, N))
        W = W0 + W0.T
        W = sp.diags(1 / np.asarray(W.sum(1)).ravel()) @ W
        L = np.zeros((N, C))
        L[np.arange(ld.yl.size), ld.yl] = 1
        L /= L.sum(0)
        acc = []
        for it in range(4):
            acc.append(evaluate.top5(L[It].sum(1), ld.yte, ld.split.is_novel)[1])
            L = W @ L
            L /= np.maximum(L.sum(0), 1e-300)
        gain.append(acc[3] - acc[0])
    assert np.mean(gain) > 0.1, gain
