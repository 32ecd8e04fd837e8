"""PCA-R: training against numpy's eigendecomposition, streamed and resumed apply against faiss."""
import functools
import os
import re

import faiss
import h5py
import numpy as np
import pytest

import train_apply_pca
from lowshot import data, pca
from lowshot.common import InputError
from lowshot.progress import Progress

D_IN, D_OUT = 48, 12


def write_block(path, x, extra_rows=0):
    """Feature hdf5 like save_features.py's; ``extra_rows`` unused rows after ``count``."""
    with h5py.File(path, "w") as f:
        f["all_feats"] = np.vstack([x, np.full((extra_rows, x.shape[1]), 1e6, dtype=np.float32)])
        f["all_labels"] = np.full(len(x) + extra_rows, -1, dtype=np.int32)
        f["count"] = np.array([len(x)], dtype=np.int32)


@pytest.fixture
def blocks(tmp_path):
    rng = np.random.RandomState(0)
    # anisotropic data so the principal subspace is well defined
    scales = np.linspace(3, 0.1, D_IN).astype(np.float32)
    xs = [(rng.randn(n, D_IN) * scales + 0.5).astype(np.float32) for n in (3000, 1700, 0, 2345)]
    blocks = data.feature_paths(str(tmp_path))["blocks"]
    os.makedirs(os.path.dirname(blocks))
    for b, x in enumerate(xs):
        write_block(blocks % b, x, extra_rows=5 if b == 1 else 0)
    return tmp_path, xs


def test_train_matches_numpy_pca(blocks):
    ddir, xs = blocks
    train_apply_pca.main(["train", "--ddir", str(ddir), "--dout", str(D_OUT)])
    vt = data.load_pca(data.feature_paths(str(ddir))["pca"])
    assert (vt.d_in, vt.d_out) == (D_IN, D_OUT)
    x = xs[0].astype(np.float64)
    mu = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(x - mu, rowvar=False, bias=True))
    top = evecs[:, ::-1][:, :D_OUT]
    y = vt.apply(xs[0]).astype(np.float64)
    # the output is a rotation of the projection on the top principal subspace, centred
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    proj = (x - mu) @ top
    np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True).trace(), evals[::-1][:D_OUT].sum(),
                               rtol=1e-4)
    rot, *_ = np.linalg.lstsq(proj, y, rcond=None)
    np.testing.assert_allclose(rot @ rot.T, np.eye(D_OUT), atol=1e-3)     # orthogonal
    assert np.abs(rot - np.eye(D_OUT)).max() > 0.1                        # random rotation is on
    np.testing.assert_allclose(proj @ rot, y, atol=1e-3)
    # same transform as faiss trained directly
    ref = faiss.PCAMatrix(D_IN, D_OUT, 0, True)
    ref.train(xs[0])
    np.testing.assert_allclose(vt.apply(xs[1]), ref.apply(xs[1]), rtol=1e-5, atol=1e-5)


def test_apply_equals_faiss_on_concatenation(blocks):
    ddir, xs = blocks
    vt = pca.train_pca(data.feature_paths(str(ddir))["blocks"] % 0, D_OUT)
    faiss.write_VectorTransform(vt, str(ddir / "pca.vt"))
    out = str(ddir / "out.raw")
    train_apply_pca.main(["apply", "--ddir", str(ddir), "--pcafile", str(ddir / "pca.vt"),
                          "--nblock", "4", "--outfile", out, "--chunk", "1000"])
    got = np.fromfile(out, dtype=np.float32).reshape(-1, D_OUT)
    want = vt.apply(np.vstack(xs))
    assert got.shape == (sum(len(x) for x in xs), D_OUT)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(ddir)) == ["features", "out.raw", "pca.vt"]
    # without --nblock: the blocks that exist (here 4), the same file
    os.remove(out)
    train_apply_pca.main(["apply", "--ddir", str(ddir), "--pcafile", str(ddir / "pca.vt"),
                          "--outfile", out, "--chunk", "1000"])
    np.testing.assert_array_equal(np.fromfile(out, dtype=np.float32).reshape(-1, D_OUT), got)


def test_apply_resumes_without_duplicates(blocks):
    ddir, xs = blocks
    vt = pca.train_pca(data.feature_paths(str(ddir))["blocks"] % 0, D_OUT)
    infiles = [data.feature_paths(str(ddir))["blocks"] % b for b in range(4)]
    ref = str(ddir / "ref.raw")
    pca.apply_pca(vt, infiles, ref, chunk_rows=700)

    class Stop(Exception):
        pass

    def stop_after(nblocks):
        if nblocks == 2:
            raise Stop

    out = str(ddir / "out.raw")
    with pytest.raises(Stop):
        pca.apply_pca(vt, infiles, out, chunk_rows=700, after_block=stop_after)
    assert not os.path.exists(out)
    # a kill in the middle of block 3 leaves rows after the last complete block
    with open(out + ".partial", "ab") as f:
        f.write(np.ones((123, D_OUT), dtype=np.float32).tobytes())
    res = pca.apply_pca(vt, infiles, out, chunk_rows=700)
    assert res["rows_this_run"] == len(xs[2]) + len(xs[3])
    with open(out, "rb") as f, open(ref, "rb") as g:
        assert f.read() == g.read()
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".partial.json")
    # a partial made from other inputs is refused
    with pytest.raises(Stop):
        pca.apply_pca(vt, infiles, out + "2", after_block=stop_after)
    with pytest.raises(InputError, match="other inputs"):
        pca.apply_pca(vt, infiles[:3], out + "2")


def test_dimension_mismatch(blocks, tmp_path):
    ddir, xs = blocks
    vt = faiss.PCAMatrix(D_IN + 1, D_OUT, 0, True)
    vt.train(np.random.RandomState(0).rand(500, D_IN + 1).astype(np.float32))
    with pytest.raises(InputError, match="has dimension 48, the PCA expects 49"):
        pca.apply_pca(vt, [data.feature_paths(str(ddir))["blocks"] % 0], str(tmp_path / "o"))
    with pytest.raises(InputError, match="must be in 1..48"):
        pca.train_pca(data.feature_paths(str(ddir))["blocks"] % 0, 64)


def test_apply_logs_progress_within_blocks(blocks, monkeypatch, capsys):
    ddir, xs = blocks
    vt = pca.train_pca(data.feature_paths(str(ddir))["blocks"] % 0, D_OUT)
    infiles = [data.feature_paths(str(ddir))["blocks"] % b for b in range(4)]
    # a line at every chunk instead of every 30 s
    monkeypatch.setattr(pca, "Progress", functools.partial(Progress, every=0.0))
    pca.apply_pca(vt, infiles, str(ddir / "out.raw"), chunk_rows=1000)
    out = capsys.readouterr().out
    total = sum(len(x) for x in xs)
    # chunks that end no block: rows done so far (the others end with a block line)
    within = [1000, 2000, 4000, 5700, 6700]
    got = [int(m) for m in re.findall(r"applying PCA: (\d+) / %d rows \(.* rows/s, ETA \d+ s\)" % total, out)]
    assert got == within
    ends = [int(m) for m in re.findall(r"block \d/4, (\d+)/%d rows, \d+ rows/s" % total, out)]
    assert ends == [3000, 4700, 4700, total]
