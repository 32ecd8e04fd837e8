"""A generated ``$DDIR``: the published file layout filled with synthetic features that have class
structure, so every stage runs (and diffusion has something to find) without ImageNet.

The model. A signal subspace of dimension r (< d) of R^D, with an orthonormal basis Q (D, r).
Every class k (the ``nclass`` classes, then ``nclutter`` unrelated "clutter" classes that play the
part of the YFCC content outside ImageNet) is a closed curve in that subspace::

    x(t) = Q S (z_k + sum_j g_j(t) a_kj) + N e,   t ~ U(0, 1),
    g(t) = (cos 2 pi t, sin 2 pi t, cos 4 pi t, sin 4 pi t),
    z_k ~ N(0, center_std^2 I_r),  a_kj ~ N(0, curve_std^2 I_r),  e ~ N(0, I_D)
    S = diag((j+1)^(-signal_decay/2), j < r),  N = noise_std diag((pi(j)+1)^(-noise_decay/2), j < D)

(pi a random permutation of the raw dimensions). Both spectra decay like power laws, as the PCA
spectrum of CNN features does: with the defaults the 256-d background has a participation ratio
(sum lambda)^2 / sum lambda^2 of ~22 and its top 10 PCA directions hold ~half the variance. A
flat spectrum (``signal_decay = noise_decay = 0``: isotropic noise in all D dimensions) gives
points whose neighbours are set by high-dimensional noise, which no approximate search handles
well (HNSW recall@10 0.89 at 100k rows against 0.98 with the defaults).

Labelled and test images of a class are points of its curve. The background holds images of all
``nclass`` classes (also those outside the split, like YFCC), images of the clutter classes and
isolated points (random S z, no curve). A few labelled images cover only part of a novel class's
curve; a linear classifier on them misses test images on the far side of the curve, while a k-NN
graph over a dense background follows the curve: this is the situation where diffusion helps.

Files written under ``out`` (names and layouts of the published ``$DDIR``):

- ``features/train.hdf5``: ``all_feats`` (nclass*ntrain + pad, D) float32, ``all_labels``
  (same rows,) int64 0-based class, ``count`` (1,) int64 = nclass*ntrain; rows in random class
  order; ``pad`` zero padding rows past ``count`` like the published files.
- ``features/val.hdf5``: same with ntest images per class (the test images).
- ``label_idx.json``: class split in the published form (1-based ids): ``base_classes_1``,
  ``novel_classes_1``, ``base_classes_2``, ``novel_classes_2``, ``base_classes``, ``label_names``,
  with the proportions of the ImageNet split (19.3% / 30% / 19.6% / 31.1% of the classes).
- ``features/PCAR256.vt``: faiss ``PCAMatrix(D, d, 0, True)`` (no whitening, random rotation)
  trained on a sample of generated background rows (20000, at least 2 d).
- ``features/f100m/concatenated_PCAR256.raw``: the background, raw float32 (nbg, d), no header:
  generated in D dims block by block, mapped through the .vt, appended; never held in memory.
- ``generate.json``: the parameters (written last: its presence means the directory is complete).
"""
import os
import time

import numpy as np

from lowshot.common import InputError, atomic_output, logger, write_json
from lowshot.data import feature_paths

log = logger(__name__)

# fractions of the ImageNet split (1000 classes: 193 / 300 / 196 / 311)
_SPLIT_FRACTIONS = (("base_classes_1", 0.193), ("novel_classes_1", 0.300),
                    ("base_classes_2", 0.196), ("novel_classes_2", 0.311))

DEFAULTS = dict(
    nclass=1000,        # classes of the generated "ImageNet"
    ntrain=50,          # training images per class (train.hdf5); ImageNet has ~1280
    ntest=50,           # test images per class (val.hdf5), as ImageNet's validation set
    D=2048,             # raw feature dimension (ResNet-50 pool5)
    d=256,              # PCA dimension of the graph / background
    nbg=1000000,        # background rows
    r=None,             # signal subspace dimension; None: min(192, 3 d / 4)
    nclutter=1000,      # unrelated classes that only appear in the background
    bg_class_frac=0.5,  # background fraction from the nclass classes
    bg_clutter_frac=0.3,  # background fraction from the clutter classes (the rest: isolated points)
    center_std=1.0,     # spread of class centres (per signal dimension)
    curve_std=1.0,      # size of a class curve (per signal dimension and harmonic)
    noise_std=0.3,      # noise std along the strongest noise direction
    signal_decay=1.0,   # variance of the j-th signal direction ~ (j+1)^-signal_decay
    noise_decay=1.0,    # variance of the j-th noise direction ~ (j+1)^-noise_decay
    pad=7,              # zero padding rows past count in the hdf5 files
    seed=0,
    block=32768,        # rows generated at a time (memory: block * D * 4 bytes, several times)
)


class ClassModel:
    """The curves of all classes (see the module docstring); draws images of given classes.

    Parameters
    ----------
    ncurves : int
        Number of curves (classes + clutter classes).
    D, r : int
        Raw and signal dimensions.
    center_std, curve_std, noise_std : float
    rng : numpy.random.Generator
    """

    nharm = 4

    def __init__(self, ncurves, D, r, center_std, curve_std, noise_std, rng, signal_decay=1.0,
                 noise_decay=1.0):
        self.D, self.r = D, r
        self.center_std = center_std
        self.Q = np.linalg.qr(rng.standard_normal((D, r)))[0].astype(np.float32)   # (D, r)
        # power-law spectra: the j-th signal / noise direction has std ~ (j+1)^(-decay/2)
        self.sig = (np.arange(1, r + 1) ** (-signal_decay / 2)).astype(np.float32)
        self.noise = (noise_std * np.arange(1, D + 1) ** (-noise_decay / 2)).astype(np.float32)
        self.noise = self.noise[rng.permutation(D)]
        self.z = (center_std * self.sig * rng.standard_normal((ncurves, r))).astype(np.float32)
        self.a = (curve_std * self.sig * rng.standard_normal((ncurves, self.nharm, r))).astype(np.float32)

    def sample(self, cls, rng):
        """Images of classes ``cls`` (int array (n,)); class -1 is an isolated point.

        Returns
        -------
        ndarray, float32 (n, D)
        """
        n = cls.size
        t = rng.random(n, dtype=np.float32) * np.float32(2 * np.pi)
        g = np.stack([np.cos(t), np.sin(t), np.cos(2 * t), np.sin(2 * t)], axis=1)   # (n, 4)
        c = np.maximum(cls, 0)
        s = self.z[c] + np.einsum("nj,njr->nr", g, self.a[c])
        iso = cls < 0
        if iso.any():
            s[iso] = self.center_std * self.sig * rng.standard_normal((iso.sum(), self.r),
                                                                       dtype=np.float32)
        X = rng.standard_normal((n, self.D), dtype=np.float32)
        X *= self.noise
        X += s @ self.Q.T
        return X


def make_split(nclass, rng):
    """A class split in ``label_idx.json`` form with the ImageNet split's proportions (1-based ids).

    Returns
    -------
    dict
    """
    perm = rng.permutation(nclass) + 1
    sizes = [max(1, int(round(f * nclass))) for _, f in _SPLIT_FRACTIONS]
    sizes[-1] = nclass - sum(sizes[:-1])
    if min(sizes) < 1:
        raise InputError("nclass %d is too small for a split with 4 non-empty class sets" % nclass)
    d, i = {}, 0
    for (k, _), s in zip(_SPLIT_FRACTIONS, sizes):
        d[k] = sorted(int(c) for c in perm[i:i + s])
        i += s
    d["base_classes"] = sorted(d["base_classes_1"] + d["base_classes_2"])
    d["label_names"] = ["gen%04d" % c for c in range(nclass)]
    return d


def _write_h5(path, model, labels, D, pad, rng, block):
    import h5py
    n = labels.size
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("all_feats", shape=(n + pad, D), dtype=np.float32)
            for i0 in range(0, n, block):
                i1 = min(i0 + block, n)
                feats[i0:i1] = model.sample(labels[i0:i1], rng)
            if pad:
                feats[n:] = 0
            f.create_dataset("all_labels", data=np.concatenate([labels, np.zeros(pad, np.int64)]))
            f.create_dataset("count", data=np.array([n], dtype=np.int64))


def _bg_classes(n, p, rng):
    """Background row sources: class id, clutter id (>= nclass) or -1 (isolated)."""
    nclass, nclutter, fc, fcl = p["nclass"], p["nclutter"], p["bg_class_frac"], p["bg_clutter_frac"]
    u = rng.random(n)
    cls = np.full(n, -1, dtype=np.int64)
    m = u < fc
    cls[m] = rng.integers(0, nclass, m.sum())
    if nclutter:
        m = (u >= fc) & (u < fc + fcl)
        cls[m] = nclass + rng.integers(0, nclutter, m.sum())
    return cls


def check_params(p):
    """Raise InputError on parameters that cannot make a valid directory."""
    for k in ("nclass", "ntrain", "ntest", "D", "d", "nbg", "block"):
        if p[k] < 1:
            raise InputError("%s %d: must be >= 1" % (k, p[k]))
    if p["nclass"] < 4:
        raise InputError("nclass %d: need at least 4 classes (2 base and 2 novel sets)" % p["nclass"])
    if p["d"] > p["D"]:
        raise InputError("d %d is larger than D %d" % (p["d"], p["D"]))
    if p["r"] < 1 or p["r"] > p["d"]:
        raise InputError("r %d: the signal dimension must be in 1..d = %d" % (p["r"], p["d"]))
    if not (0 <= p["bg_class_frac"] and 0 <= p["bg_clutter_frac"]
            and p["bg_class_frac"] + p["bg_clutter_frac"] <= 1):
        raise InputError("background fractions %g + %g must be in [0, 1]" % (
            p["bg_class_frac"], p["bg_clutter_frac"]))
    if p["nclutter"] < 0 or p["pad"] < 0:
        raise InputError("nclutter %d and pad %d must be >= 0" % (p["nclutter"], p["pad"]))


def _train_pca(model, p, ntrain, rng):
    """The PCA of the generated root, trained on a sample as large as the ``ntrain`` training and
    the background rows (at most 20000, at least 2 d rows)."""
    import faiss
    D, d = p["D"], p["d"]
    ns = max(2 * d, min(20000, ntrain + p["nbg"]))
    Xs = model.sample(_bg_classes(ns, p, rng), rng)
    log("training PCAMatrix(%d, %d, 0, True) on %d rows" % (D, d, ns))
    pca = faiss.PCAMatrix(D, d, 0, True)
    pca.train(Xs)
    return pca


def _write_background(raw, model, pca, p, rng):
    """The background rows, generated and reduced by ``pca`` block by block, into raw ``raw``."""
    D, d = p["D"], p["d"]
    log("generating background %s: %d x %d (from %d dims, blocks of %d)" % (raw, p["nbg"], d, D, p["block"]))
    tb, nb = time.time(), p["nbg"]
    with atomic_output(raw) as tmp:
        with open(tmp, "wb") as f:
            for i0 in range(0, nb, p["block"]):
                n = min(p["block"], nb - i0)
                X = model.sample(_bg_classes(n, p, rng), rng)
                pca.apply(X).astype(np.float32, copy=False).tofile(f)
                del X
                done = i0 + n
                if done == nb or (i0 // p["block"]) % 8 == 7:
                    el = time.time() - tb
                    log("  background %d / %d rows, %.0f rows/s" % (done, nb, done / max(el, 1e-9)))


def generate_ddir(out, **kw):
    """Write a complete generated ``$DDIR`` under ``out`` (see the module docstring).

    Parameters
    ----------
    out : str
        Output data root (created).
    **kw
        Any key of :data:`DEFAULTS`.

    Returns
    -------
    dict: the parameters used plus ``seconds`` (wall time).
    """
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError("unknown parameters %s" % sorted(unknown))
    p = dict(DEFAULTS, **kw)
    if p["r"] is None:
        p["r"] = min(192, max(1, 3 * p["d"] // 4))
    check_params(p)
    import faiss

    t0 = time.time()
    rng = np.random.default_rng(p["seed"])
    nclass, D = p["nclass"], p["D"]
    files = feature_paths(out)
    os.makedirs(os.path.dirname(files["background"]), exist_ok=True)

    split = make_split(nclass, rng)
    write_json(os.path.join(out, "label_idx.json"), split)

    model = ClassModel(nclass + p["nclutter"], D, p["r"], p["center_std"], p["curve_std"],
                       p["noise_std"], rng, p["signal_decay"], p["noise_decay"])
    ytr = rng.permutation(np.repeat(np.arange(nclass, dtype=np.int64), p["ntrain"]))
    yte = rng.permutation(np.repeat(np.arange(nclass, dtype=np.int64), p["ntest"]))
    log("generating features/train.hdf5: %d x %d" % (ytr.size, D))
    _write_h5(files["train"], model, ytr, D, p["pad"], rng, p["block"])
    log("generating features/val.hdf5: %d x %d" % (yte.size, D))
    _write_h5(files["val"], model, yte, D, p["pad"], rng, p["block"])

    pca = _train_pca(model, p, ytr.size, rng)
    with atomic_output(files["pca"]) as tmp:
        faiss.write_VectorTransform(pca, tmp)
    _write_background(files["background"], model, pca, p, rng)
    p["seconds"] = round(time.time() - t0, 2)
    write_json(os.path.join(out, "generate.json"), p)
    return p
