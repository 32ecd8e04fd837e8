"""logreg: SGD steps against a hand-written numpy gradient, the class-balanced sampler against the
uniform law, learning a separable problem, and the script's outputs against lowshot.evaluate."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from scipy import stats

import logreg as logreg_script
from lowshot import data, evaluate, logreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_ddir(path, nclass=20, ntrain=12, ntest=6, D=10, sep=6.0, seed=0):
    """Well separated Gaussian blobs (one per class) in the published hdf5 layout + a split."""
    rng = np.random.default_rng(seed)
    mu = sep * rng.standard_normal((nclass, D)).astype(np.float32)
    files = data.feature_paths(path)
    os.makedirs(os.path.dirname(files["train"]), exist_ok=True)
    for name, per in (("train", ntrain), ("val", ntest)):
        y = rng.permutation(np.repeat(np.arange(nclass), per))
        X = mu[y] + rng.standard_normal((y.size, D)).astype(np.float32)
        with h5py.File(files[name], "w") as f:
            f["all_feats"] = np.vstack([X, np.zeros((2, D), np.float32)])
            f["all_labels"] = np.concatenate([y, [0, 0]])
            f["count"] = [y.size]
    ids = rng.permutation(nclass) + 1
    h = nclass // 4
    sp = {"base_classes_1": ids[:h].tolist(), "novel_classes_1": ids[h:2 * h].tolist(),
          "base_classes_2": ids[2 * h:3 * h].tolist(), "novel_classes_2": ids[3 * h:].tolist()}
    with open(os.path.join(path, "split.json"), "w") as f:
        json.dump(sp, f)
    return os.path.join(path, "split.json")


def test_sgd_steps_vs_numpy_gradient():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 7)).astype(np.float32)
    y = rng.integers(0, 5, 30)
    lr, wd, mom, B, seed = 0.1, 0.01, 0.9, 16, 3
    model = logreg.train(X, y, 5, lr, wd, mom, B, 2, seed, verbose=0)
    # the same initialisation and batches, then two SGD steps written out in numpy
    torch.manual_seed(seed)
    init = torch.nn.Linear(7, 5)
    W, b = init.weight.detach().numpy().astype(np.float64), init.bias.detach().numpy().astype(np.float64)
    sampler = logreg.BalancedSampler(y, torch.Generator().manual_seed(seed))
    bufW = bufb = None
    for _ in range(2):
        idx = sampler.sample(B).numpy()
        x, t = X[idx].astype(np.float64), y[idx]
        z = x @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(B), t] -= 1
        gW, gb = p.T @ x / B + wd * W, p.sum(0) / B + wd * b
        bufW = gW if bufW is None else mom * bufW + gW
        bufb = gb if bufb is None else mom * bufb + gb
        W, b = W - lr * bufW, b - lr * bufb
    assert np.allclose(model.weight.detach().numpy(), W, atol=1e-5)
    assert np.allclose(model.bias.detach().numpy(), b, atol=1e-5)


def test_balanced_sampler_frequencies():
    sizes = [1, 3, 10, 50, 200]
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(5), sizes))
    s = logreg.BalancedSampler(y, torch.Generator().manual_seed(7))
    idx = torch.cat([s.sample(1000) for _ in range(50)]).numpy()
    cls = np.bincount(y[idx], minlength=5)
    # classes uniform, whatever their size
    assert stats.chisquare(cls).pvalue > 1e-3, cls
    # images uniform inside a class
    for c in (1, 2, 3):
        rows = np.flatnonzero(y == c)
        cnt = np.bincount(idx, minlength=y.size)[rows]
        assert stats.chisquare(cnt).pvalue > 1e-3, (c, cnt)
    assert np.isin(idx, np.arange(y.size)).all()


def test_default_hparams_table():
    assert logreg.default_hparams(2) == (dict(lr=0.001, wd=0.01, batchsize=128, maxiter=29500), 2)
    assert logreg.default_hparams(5)[0]["maxiter"] == 70500
    assert logreg.default_hparams(3)[1] == 2 and logreg.default_hparams(15)[1] == 20
    assert logreg.default_hparams(50)[1] == 20


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy"))
    return d, make_ddir(d)


def test_learns_separable_problem_and_outputs(toy, tmp_path, capsys):
    ddir, split = toy
    L, M, R = str(tmp_path / "L.npy"), str(tmp_path / "m.pt"), str(tmp_path / "r.json")
    logreg_script.main(["--ddir", ddir, "--split", split, "--mode", "test", "--nlabeled", "2",
                        "--seed", "1", "--maxiter", "600", "--lr", "0.05", "--wd", "0",
                        "--batchsize", "32", "--storeL", L, "--storemodel", M, "--result", R,
                        "--verbose", "200", "--threads", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res == json.load(open(R))
    assert res["script"] == "logreg" and res["mode"] == "test" and res["maxiter"] == 600
    assert res["lr"] == 0.05 and res["batchsize"] == 32 and res["mom"] == 0.0
    assert [e["iter"] for e in res["evals"]] == [600]
    ld = data.load_lowshot(ddir, split, "test", 2, 1)
    P = np.load(L)
    assert P.shape == (ld.yte.size, ld.split.nclass) and P.dtype == np.float32
    assert np.allclose(P.sum(1), 1, atol=1e-4)
    a, an = evaluate.top5(P, ld.yte, ld.split.is_novel)
    assert (a, an) == (res["top5"], res["top5_novel"])
    # separable: top-1 far above chance (1/10), for novel classes too (2 labelled images each)
    top1 = P.argmax(1) == ld.yte
    assert top1.mean() > 0.9 and top1[ld.split.is_novel[ld.yte]].mean() > 0.8
    assert (res["top1"], res["top1_novel"]) == pytest.approx((top1.mean(), top1[ld.split.is_novel[ld.yte]].mean()))
    sd = torch.load(M)
    assert sd["weight"].shape == (ld.split.nclass, 10) and sd["bias"].shape == (ld.split.nclass,)
    W = sd["weight"].numpy()
    assert np.allclose(np.log(P), torch.log_softmax(torch.from_numpy(ld.Xte @ W.T + sd["bias"].numpy()),
                                                    1).numpy(), atol=1e-3)


def test_val_mode_evals(toy, capsys):
    ddir, split = toy
    logreg_script.main(["--ddir", ddir, "--split", split, "--mode", "val", "--nlabeled", "1",
                        "--seed", "2", "--maxiter", "1100", "--lr", "0.05", "--batchsize", "8",
                        "--verbose", "0", "--threads", "1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["iter"] for e in res["evals"]] == [500, 1000, 1100]
    assert res["wd"] == 0.1                           # validated setting of n=1 for the missing flag
    assert res["top5"] == res["evals"][-1]["top5"] and res["top1"] == res["evals"][-1]["top1"]
    assert all(set(e) == {"iter", "top1", "top1_novel", "top5", "top5_novel"} for e in res["evals"])


def test_bad_inputs(toy, tmp_path):
    ddir, split = toy
    r = subprocess.run([sys.executable, os.path.join(ROOT, "logreg.py"), "--ddir", ddir, "--split", split,
                        "--nlabeled", "50", "--maxiter", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "fewer than nlabeled = 50" in r.stderr and "train.hdf5" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        from lowshot.common import run_main
        run_main(logreg_script.main, ["--ddir", ddir, "--split", split, "--pcadim", "2048", "--maxiter", "1"])
    assert e.value.code == 2
    with pytest.raises(Exception, match="does not exist"):
        logreg_script.main(["--ddir", str(tmp_path / "none"), "--split", split])
    # flags that must be positive (or non-negative) and finite are refused before any work
    from lowshot.common import InputError
    for flag, value, msg in (("--lr", "-1", "--lr -1.0: must be > 0"), ("--lr", "nan", "--lr nan: must be > 0"),
                             ("--maxiter", "0", "--maxiter 0: must be > 0"),
                             ("--batchsize", "-4", "--batchsize -4: must be > 0"),
                             ("--wd", "-0.1", "--wd -0.1: must be >= 0"), ("--mom", "1", "--mom 1.0: must be < 1")):
        with pytest.raises(InputError, match=msg):
            logreg_script.main(["--ddir", str(tmp_path / "none"), "--split", split, flag, value])


def test_split_defaults_to_the_data_roots_own(toy, tmp_path, capsys):
    """Without --split: $DDIR/label_idx.json when it exists (the log says so), and a note that the
    ImageNet settings are used for the flags not given."""
    import shutil
    ddir, split = toy
    root = str(tmp_path / "ddir")
    shutil.copytree(ddir, root)
    shutil.copy(split, os.path.join(root, "label_idx.json"))
    res = run_main_json(["--ddir", root, "--mode", "test", "--nlabeled", "2", "--seed", "1", "--maxiter", "50",
                         "--verbose", "0", "--threads", "1"], capsys)
    out = res["_log"]
    assert "split file %s (the data root's own)" % os.path.join(root, "label_idx.json") in out
    assert "note: --lr, --wd, --batchsize not given: the settings validated on ImageNet" in out
    assert data.resolve_split(None, str(tmp_path)) == data.DEFAULT_SPLIT      # no split in the root


def run_main_json(argv, capsys):
    logreg_script.main(argv)
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    res["_log"] = out
    return res
