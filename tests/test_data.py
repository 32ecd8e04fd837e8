"""Protocol, file reading and metric of lowshot.data / lowshot.evaluate against hand-worked examples,
independent loops and brute force; every bad input gives an InputError naming the file."""
import json
import os

import h5py
import numpy as np
import pytest

from lowshot import data, evaluate, stored_graph
from lowshot.common import InputError


def write_split(path, base1, novel1, base2=None, novel2=None, **extra):
    top = max(list(base1) + list(novel1))       # default test split: classes the validation split lacks
    d = {"base_classes_1": list(base1), "novel_classes_1": list(novel1),
         "base_classes_2": list(base2 or [top + 1]), "novel_classes_2": list(novel2 or [top + 2])}
    d.update(extra)
    with open(path, "w") as f:
        json.dump(d, f)
    return str(path)


def write_h5(path, X, y, count=None, pad=0, pad_value=np.nan):
    """hdf5 in the published layout; ``pad`` padding rows past count hold ``pad_value``."""
    n, D = X.shape
    with h5py.File(path, "w") as f:
        f["all_feats"] = np.vstack([X, np.full((pad, D), pad_value, dtype=X.dtype)])
        f["all_labels"] = np.concatenate([y, np.zeros(pad, dtype=y.dtype)])
        f["count"] = np.array([n if count is None else count], dtype=np.int64)
    return str(path)


# ------------------------------------------------------------------ split


def test_load_split_default_imagenet():
    s = data.load_split(None, "val")
    assert (s.base.size, s.novel.size, s.nclass) == (193, 300, 493)
    t = data.load_split(data.DEFAULT_SPLIT, "test")
    assert (t.base.size, t.novel.size, t.nclass) == (196, 311, 507)
    raw = json.load(open(data.DEFAULT_SPLIT))
    assert t.classes.tolist() == sorted(c - 1 for c in raw["base_classes_2"] + raw["novel_classes_2"])
    assert t.is_novel.sum() == 311
    assert all(t.is_novel[c] == (t.classes[c] + 1 in raw["novel_classes_2"]) for c in range(t.nclass))


def test_split_remap(tmp_path):
    s = data.load_split(write_split(tmp_path / "s.json", [2, 5], [1, 4, 7]), "val")
    assert s.classes.tolist() == [0, 1, 3, 4, 6]
    assert s.is_novel.tolist() == [True, False, True, False, True]
    assert s.remap([6, 0, 2, 3, -1, 9, 4]).tolist() == [4, 0, -1, 2, -1, -1, 3]


@pytest.mark.parametrize("content, msg", [
    ("{not json", "not valid JSON"),
    (json.dumps({"base_classes_1": [1, 2]}), "novel_classes_1"),
    (json.dumps({"base_classes_1": [0, 2], "novel_classes_1": [3]}), "1-based"),
    (json.dumps({"base_classes_1": [1, 2], "novel_classes_1": [2, 3]}), "in both"),
    (json.dumps({"base_classes_1": [1, 1], "novel_classes_1": [3]}), "twice"),
    (json.dumps({"base_classes_1": ["a"], "novel_classes_1": [3]}), "integer"),
    (json.dumps({"base_classes_1": [1], "novel_classes_1": [3], "label_names": ["a", "b"]}),
     "label_names"),
])
def test_bad_split(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(InputError, match=msg) as e:
        data.load_split(str(p), "val")
    assert str(p) in str(e.value)


def test_bad_split_mode_and_missing(tmp_path):
    with pytest.raises(InputError, match="mode"):
        data.load_split(None, "train")
    with pytest.raises(InputError, match="does not exist"):
        data.load_split(str(tmp_path / "nope.json"), "val")


# ------------------------------------------------------------------ protocol


def reference_selection(labels_orig, split_json, mode, nl, seed):
    """An independent loop in the shape of the published protocol: label map by presence, one
    RandomState, ``(y == c).nonzero()``, novel classes shuffled (here with permutation)."""
    d = json.load(open(split_json))
    k = "1" if mode == "val" else "2"
    keep = set(c - 1 for c in d["base_classes_" + k] + d["novel_classes_" + k])
    novel = set(c - 1 for c in d["novel_classes_" + k])
    mask = np.array([l in keep for l in labels_orig])
    yk = labels_orig[mask]
    label_map = np.cumsum(np.bincount(yk).astype(bool)) - 1
    y = label_map[yk]
    novel_remapped = {int(label_map[c]) for c in novel}
    rs = np.random.RandomState(seed)
    base, lab, rest = [], [], []
    for c in range(y.max() + 1):
        imnos = (y == c).nonzero()[0]
        if c in novel_remapped:
            imnos = imnos[rs.permutation(imnos.size)]
            lab += list(imnos[:nl])
            rest += list(imnos[nl:])
        else:
            base += list(imnos)
    return y, np.array(base + lab), np.array(rest)


def test_select_labelled_hand_worked(tmp_path):
    # 1-based split: base {2, 5}, novel {1, 4, 7}; original label 2 (0-based) is outside the split
    sp = write_split(tmp_path / "s.json", [2, 5], [1, 4, 7])
    s = data.load_split(sp, "val")
    labels = np.array([0, 1, 3, 0, 2, 6, 1, 0, 3, 4, 6, 0, 3, 2, 6])
    y = s.remap(labels)
    y = y[y >= 0]
    # kept rows: labels 0 1 3 0 6 1 0 3 4 6 0 3 6 -> remapped 0 1 2 0 4 1 0 2 3 4 0 2 4
    assert y.tolist() == [0, 1, 2, 0, 4, 1, 0, 2, 3, 4, 0, 2, 4]
    lab, rest = data.select_labelled(y, s, 2, seed=1)
    # RandomState(1) shuffles class 0's indices [0, 3, 6, 10], then class 2's [2, 7, 11],
    # then class 4's [4, 9, 12]; the legacy generator, whose stream numpy keeps fixed, draws the
    # permutations [3, 2, 0, 1], [0, 2, 1], [0, 2, 1]: [10, 6, 0, 3]; [2, 11, 7]; [4, 12, 9]
    rs = np.random.RandomState(1)
    assert rs.permutation(4).tolist() == [3, 2, 0, 1]
    assert rs.permutation(3).tolist() == [0, 2, 1]
    assert rs.permutation(3).tolist() == [0, 2, 1]
    # base classes 1 ([1, 5]) and 3 ([8]) first, then the first 2 of each novel class
    assert lab.tolist() == [1, 5, 8, 10, 6, 2, 11, 4, 12]
    assert rest.tolist() == [0, 3, 7, 9]
    assert lab.dtype == np.int64 and rest.dtype == np.int64
    yr, lab_ref, rest_ref = reference_selection(labels, sp, "val", 2, 1)
    assert (yr == y).all() and lab.tolist() == lab_ref.tolist() and rest.tolist() == rest_ref.tolist()


@pytest.mark.parametrize("nl, seed", [(1, 1), (2, 3), (5, 7)])
def test_select_labelled_vs_reference_loop(tmp_path, nl, seed):
    rng = np.random.default_rng(seed)
    sp = write_split(tmp_path / "s.json", [1, 3, 8, 9, 12], [2, 5, 6, 11], [4, 7], [10, 13])
    labels = rng.integers(0, 13, size=400)
    for mode in ("val", "test"):
        s = data.load_split(sp, mode)
        y = s.remap(labels)
        y = y[y >= 0]
        lab, rest = data.select_labelled(y, s, nl, seed)
        yr, lab_ref, rest_ref = reference_selection(labels, sp, mode, nl, seed)
        assert (yr == y).all()
        assert lab.tolist() == lab_ref.tolist() and rest.tolist() == rest_ref.tolist()
        nov = s.is_novel[y[lab]]
        assert not nov[:(~nov).sum()].any()         # base images first
        assert (np.bincount(y[lab][nov], minlength=s.nclass)[s.is_novel] == nl).all()


def test_select_labelled_too_few(tmp_path):
    s = data.load_split(write_split(tmp_path / "s.json", [1], [2]), "val")
    with pytest.raises(InputError, match="novel class 2 .* 3 images, fewer than nlabeled = 5"):
        data.select_labelled(np.array([0, 1, 1, 1, 0]), s, 5, 1, source="feature file x.hdf5")
    with pytest.raises(InputError, match="outside"):
        data.select_labelled(np.array([0, 2]), s, 1, 1)


# ------------------------------------------------------------------ feature files


def test_load_features_and_read_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sp = write_split(tmp_path / "s.json", [2, 5], [1, 4, 7])
    s = data.load_split(sp, "val")
    labels = rng.integers(0, 8, size=300)
    labels[:8] = np.arange(8)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    X[labels == 2] = np.nan   # class outside the split: never read, never an error
    path = write_h5(tmp_path / "train.hdf5", X, labels, pad=17)  # NaN padding past count
    monkeypatch.setattr(data, "_READ_ROWS", 7)  # many blocks
    Xs, ys = data.load_features(path, s)
    keep = np.isin(labels, s.classes)
    assert np.array_equal(Xs, X[keep]) and Xs.dtype == np.float32
    assert ys.dtype == np.int64
    assert ys.tolist() == [s.classes.tolist().index(l) for l in labels[keep]]
    rows = np.flatnonzero(keep)[[250 % keep.sum(), 3, 3, 120, 0, -1, 5]]
    assert np.array_equal(data.read_rows(path, rows), X[rows])


def test_load_lowshot(tmp_path):
    rng = np.random.default_rng(1)
    sp = write_split(tmp_path / "s.json", [2, 5], [1, 4, 7])
    f = data.feature_paths(str(tmp_path))
    os.makedirs(os.path.dirname(f["train"]))
    ltr = np.repeat(np.arange(8), 6)
    Xtr = rng.standard_normal((ltr.size, 5)).astype(np.float32)
    lte = np.repeat(np.arange(8), 2)
    Xte = rng.standard_normal((lte.size, 5)).astype(np.float32)
    write_h5(f["train"], Xtr, ltr, pad=3)
    write_h5(f["val"], Xte, lte)
    d = data.load_lowshot(str(tmp_path), sp, "val", 2, 4, indomain=True)
    yr, lab_ref, rest_ref = reference_selection(ltr, sp, "val", 2, 4)
    Xk = Xtr[np.isin(ltr, d.split.classes)]
    assert np.array_equal(d.Xl, Xk[lab_ref]) and np.array_equal(d.yl, yr[lab_ref])
    assert np.array_equal(d.Xu, Xk[rest_ref]) and np.array_equal(d.yu, yr[rest_ref])
    assert np.array_equal(d.Xte, Xte[np.isin(lte, d.split.classes)]) and d.D == 5


def h5_variants():
    X = np.ones((5, 3), np.float32)
    y = np.array([0, 1, 0, 1, 0])
    return {
        "count": (lambda f: (f.create_dataset("all_feats", data=X), f.create_dataset("all_labels", data=y),
                             f.create_dataset("count", data=[9])), "count = 9"),
        "nolabels": (lambda f: (f.create_dataset("all_feats", data=X), f.create_dataset("count", data=[5])),
                     "all_labels"),
        "feats1d": (lambda f: (f.create_dataset("all_feats", data=X[:, 0]), f.create_dataset("all_labels", data=y),
                               f.create_dataset("count", data=[5])), "shape"),
        "featsint": (lambda f: (f.create_dataset("all_feats", data=X.astype(np.int32)),
                                f.create_dataset("all_labels", data=y), f.create_dataset("count", data=[5])),
                     "dtype int32"),
        "labelsfloat": (lambda f: (f.create_dataset("all_feats", data=X), f.create_dataset("all_labels", data=y * 1.0),
                                   f.create_dataset("count", data=[5])), "all_labels"),
        "negative": (lambda f: (f.create_dataset("all_feats", data=X), f.create_dataset("all_labels", data=y - 1),
                                f.create_dataset("count", data=[5])), "negative"),
        "missingclass": (lambda f: (f.create_dataset("all_feats", data=X),
                                    f.create_dataset("all_labels", data=y * 0),
                                    f.create_dataset("count", data=[5])), "no row of 1 classes"),
        "nan": (lambda f: (f.create_dataset("all_feats", data=np.where(np.arange(5)[:, None] == 3, np.inf, X)),
                           f.create_dataset("all_labels", data=y), f.create_dataset("count", data=[5])),
                "row 3 holds NaN or inf"),
    }


@pytest.mark.parametrize("name", sorted(h5_variants()))
def test_bad_feature_files(tmp_path, name):
    make, msg = h5_variants()[name]
    path = str(tmp_path / ("%s.hdf5" % name))
    with h5py.File(path, "w") as f:
        make(f)
    s = data.load_split(write_split(tmp_path / "s.json", [1], [2]), "val")
    with pytest.raises(InputError, match=msg) as e:
        data.load_features(path, s)
    assert path in str(e.value)


def test_label_beyond_label_names(tmp_path):
    s = data.load_split(write_split(tmp_path / "s.json", [1], [2], label_names=["a", "b", "c"]), "val")
    path = write_h5(tmp_path / "f.hdf5", np.ones((4, 2), np.float32), np.array([0, 1, 3, 1]))
    with pytest.raises(InputError, match="label 3, beyond the 3 classes") as e:
        data.load_features(path, s)
    assert path in str(e.value)


def test_missing_and_unreadable_feature_file(tmp_path):
    s = data.load_split(write_split(tmp_path / "s.json", [1], [2]), "val")
    with pytest.raises(InputError, match="does not exist"):
        data.load_features(str(tmp_path / "nope.hdf5"), s)
    p = tmp_path / "garbage.hdf5"
    p.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="cannot be read as hdf5"):
        data.load_features(str(p), s)


# ------------------------------------------------------------------ background and PCA


def test_open_background(tmp_path):
    import faiss
    ddir = tmp_path / "ddir"
    files = data.feature_paths(str(ddir))
    os.makedirs(os.path.dirname(files["background"]))
    rng = np.random.default_rng(0)
    pca = faiss.PCAMatrix(16, 8, 0, True)
    pca.train(rng.standard_normal((100, 16)).astype(np.float32))
    faiss.write_VectorTransform(pca, files["pca"])
    B = rng.standard_normal((50, 8)).astype(np.float32)
    raw = files["background"]
    B.tofile(raw)
    m = data.open_background(str(ddir), 30)
    assert m.shape == (30, 8) and m.dtype == np.float32 and np.array_equal(m, B[:30])
    assert not m.flags.writeable
    assert data.open_background(str(raw)).shape == (50, 8)       # d from the .vt one folder up
    assert data.open_background(str(raw), d=4).shape == (100, 4)
    with pytest.raises(InputError, match="fewer than nbg = 51") as e:
        data.open_background(str(ddir), 51)
    assert str(raw) in str(e.value)
    with open(raw, "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(InputError, match="not a multiple of d\\*4 = 32"):
        data.open_background(str(ddir), 10)
    with pytest.raises(InputError, match="does not exist"):
        data.open_background(str(tmp_path / "none.raw"), 10, d=8)
    assert data.load_pca(files["pca"], 16).d_out == 8
    with pytest.raises(InputError, match="D = 32"):
        data.load_pca(files["pca"], 32)


def test_paths():
    p = stored_graph.graph_paths("/d", 1000000, 32)
    assert p["I"] == "/d/knngraph/ndis1000000_k32_I_11.int32"
    assert p["D"] == "/d/knngraph/ndis1000000_k32_D_11.float32"
    assert p["index"] == "/d/knngraph/ndis1000000.index"
    f = data.feature_paths("/d")
    assert f["background"] == "/d/features/f100m/concatenated_PCAR256.raw"
    assert f["pca"] == "/d/features/PCAR256.vt" and f["train"] == "/d/features/train.hdf5"


# ------------------------------------------------------------------ metric


def brute_top5(scores, y, is_novel):
    ok = []
    for s, t in zip(scores, y):
        ranked = sorted(range(len(s)), key=lambda j: (-s[j], j))
        ok.append(t in ranked[:5])
    ok = np.array(ok)
    return ok.mean(), ok[is_novel[y]].mean()


@pytest.mark.parametrize("C", [3, 5, 12, 40])
def test_top5_ties_vs_brute_force(C):
    rng = np.random.default_rng(C)
    scores = rng.integers(0, 4, size=(300, C)).astype(np.float32)  # many ties
    y = rng.integers(0, C, size=300)
    is_novel = rng.random(C) < 0.5
    is_novel[y[0]] = True
    a, n = evaluate.top5(scores, y, is_novel)
    ra, rn = brute_top5(scores, y, is_novel)
    assert a == pytest.approx(ra) and n == pytest.approx(rn)
    vals, ids = evaluate.topk(scores, 5)
    for i in range(0, 300, 17):
        ranked = sorted(range(C), key=lambda j: (-scores[i, j], j))[:5]
        assert ids[i].tolist() == ranked and vals[i].tolist() == scores[i, ranked].tolist()
    # from the top-5 ids alone (merged class slices): the same accuracies
    acc = evaluate.accuracies_from_ids(ids, y, is_novel)
    assert (acc["top5"], acc["top5_novel"]) == pytest.approx((ra, rn))


def test_top5_tie_rule_small():
    # true class 5 ties with classes 0..9: with the lowest-id rule it ranks 6th -> wrong
    s = np.zeros((2, 10), np.float32)
    y = np.array([5, 4])
    acc, acc_n = evaluate.top5(s, y, np.arange(10) == 5)
    assert acc == 0.5 and acc_n == 0.0


def numpy_topk(scores, y, is_novel, ks):
    """Dense reference: each row's classes sorted by (score decreasing, class id increasing) with
    numpy's lexsort, then the position of the true class."""
    n, C = scores.shape
    order = np.lexsort((np.broadcast_to(np.arange(C), (n, C)), -scores), axis=1)
    rank = np.argmax(order == y[:, None], axis=1)
    out = {}
    for k in ks:
        ok = rank < k
        out["top%d" % k], out["top%d_novel" % k] = ok.mean(), ok[is_novel[y]].mean()
    return out


@pytest.mark.parametrize("C", [3, 7, 40])
def test_accuracies_for_a_list_of_k_vs_numpy(C):
    rng = np.random.default_rng(10 + C)
    scores = rng.integers(0, 3, size=(500, C)).astype(np.float32)   # many ties
    y = rng.integers(0, C, size=500)
    is_novel = rng.random(C) < 0.5
    is_novel[y[0]] = True
    ref = numpy_topk(scores, y, is_novel, (1, 2, 5, 10))
    acc = evaluate.accuracies(scores, y, is_novel, ks=(1, 2, 5, 10))
    assert list(acc) == evaluate.metric_names((1, 2, 5, 10)) == list(ref)
    assert acc == pytest.approx(ref, abs=1e-12)
    assert evaluate.accuracies(scores, y, is_novel) == {m: acc[m] for m in evaluate.metric_names()}
    assert evaluate.top5(scores, y, is_novel) == (acc["top5"], acc["top5_novel"])
    # from each image's best 5 class ids (merged job-array slices): top-1 and top-5, not top-10
    _, ids = evaluate.topk(scores, 5)
    assert evaluate.accuracies_from_ids(ids, y, is_novel) == pytest.approx(
        {m: ref[m] for m in evaluate.metric_names()}, abs=1e-12)
    if C > 5:
        with pytest.raises(InputError, match="top-10 needs each test image's 10 best classes, the slices kept 5"):
            evaluate.accuracies_from_ids(ids, y, is_novel, ks=(1, 10))
    else:       # all C classes listed: top-10 is defined (every image counts)
        assert evaluate.accuracies_from_ids(ids, y, is_novel, ks=(10,))["top10"] == 1.0


def test_top1_tie_rule_hand_computed():
    # row 0: classes 0 and 2 tie at the top -> class 0 first; row 1: all equal -> class 0;
    # row 2: class 3 alone at the top; row 3: true class 1 is second of three equal scores
    s = np.array([[2, 1, 2, 0], [0, 0, 0, 0], [1, 1, 1, 5], [3, 3, 3, 0]], np.float32)
    y = np.array([2, 0, 3, 1])
    is_novel = np.array([False, False, True, True])    # rows 0 and 2 are of novel classes
    acc = evaluate.accuracies(s, y, is_novel, ks=(1, 2))
    assert acc == {"top1": 0.5, "top1_novel": 0.5, "top2": 1.0, "top2_novel": 1.0}
    assert evaluate.format_accuracies(acc) == "top-1 0.500 (0.500 on novel), top-2 1.000 (1.000 on novel)"
    with pytest.raises(InputError, match="k = 0 must be a positive integer"):
        evaluate.accuracies(s, y, is_novel, ks=(0,))


def test_top5_bad_input():
    with pytest.raises(InputError, match="NaN"):
        evaluate.top5(np.array([[np.nan, 1.0]]), np.array([0]), np.array([True, False]))
    with pytest.raises(InputError, match="outside"):
        evaluate.top5(np.zeros((1, 2)), np.array([2]), np.array([True, False]))
    with pytest.raises(InputError, match="expected 3 classes"):
        evaluate.top5(np.zeros((1, 2)), np.array([1]), np.array([True, False, True]))


def test_feature_paths_and_their_cli(capsys):
    """One function names the feature files; bash scripts ask it through `python -m lowshot.data`."""
    p = data.feature_paths("/d")
    assert p["train"] == "/d/features/train.hdf5" and p["blocks"] % 7 == "/d/features/f100m/block7.hdf5"
    assert p["background"] == "/d/features/f100m/concatenated_PCAR256.raw"
    data.main(["path", "/d", "blocks", "3"])
    data.main(["path", "/d", "pca"])
    assert capsys.readouterr().out.split() == ["/d/features/f100m/block3.hdf5", "/d/features/PCAR256.vt"]
    with pytest.raises(SystemExit):
        data.main(["path", "/d", "model"])
