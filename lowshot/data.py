"""The benchmark's data: the class split, the feature files under ``$DDIR`` and the labelled-set protocol.

Files under ``$DDIR`` (names and layouts of the authors' published files):

=============================================  ====================================================
``features/train.hdf5``, ``features/val.hdf5``  ``all_feats`` (rows, D) float32 (rows past ``count``
                                                are padding), ``all_labels`` (rows,) int 0-based
                                                class, ``count`` (1,) int number of valid rows
``features/PCAR256.vt``                         faiss VectorTransform D -> d (PCA + random rotation)
``features/f100m/concatenated_PCAR256.raw``     raw float32 (N, d) row-major, no header; the first
                                                nbg rows are the background set "F{nbg}"
``knngraph/ndis{nbg}.index``                    faiss index of the first nbg background vectors
``knngraph/ndis{nbg}_k{K}_I_11.int32``          raw (nbg, K) int32 neighbour ids, background ->
                                                background (suffix 11: 0 labelled, 1 background,
                                                2 test)
``knngraph/ndis{nbg}_k{K}_D_11.float32``        raw (nbg, K) float32 similarities, decreasing
=============================================  ====================================================

The graph files are named, read and checked in :mod:`lowshot.stored_graph`.

The split file (``data/label_idx.json`` form) holds 1-based class ids: ``base_classes_1`` +
``novel_classes_1`` is the validation split (``--mode val``), ``base_classes_2`` + ``novel_classes_2``
the test split (``--mode test``). Inside the code classes are 0-based, and the classes of a split are
renumbered 0..C-1 in increasing original id order.

Nothing is read at import time. Every problem with the inputs raises :class:`lowshot.common.InputError`
with a one-line message naming the file.

Over 400 lines: the readers of the published files and the labelled-set protocol, which works on
those files' (rows, labels, count) layout and the split's class renumbering: every check of the
published files stays in one place.
"""
import json
import os

import numpy as np

from lowshot.common import InputError, require_file

DEFAULT_SPLIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "data", "label_idx.json")

# rows read from an hdf5 file at a time: bounds the temporary buffer (64 MiB at D=2048)
_READ_ROWS = 8192

_MODE_KEYS = {"val": ("base_classes_1", "novel_classes_1"),
              "test": ("base_classes_2", "novel_classes_2")}


class Split:
    """The classes of one evaluation split.

    Attributes
    ----------
    classes : ndarray, int64 (C,)
        Sorted 0-based original class ids; class ``classes[c]`` is remapped to ``c``.
    base, novel : ndarray, int64
        Sorted 0-based original ids of the base / novel classes.
    is_novel : ndarray, bool (C,)
        Over remapped ids: True for novel classes.
    nclass : int
        C.
    mode : str
        "val" or "test".
    path : str
        The split file.
    label_names : list of str or None
        ``label_names`` of the split file when present (indexed by 0-based original id).
    """

    def __init__(self, base, novel, mode="val", path="", label_names=None):
        self.base = np.sort(np.asarray(base, dtype=np.int64))
        self.novel = np.sort(np.asarray(novel, dtype=np.int64))
        self.classes = np.union1d(self.base, self.novel)
        self.is_novel = np.isin(self.classes, self.novel)
        self.nclass = int(self.classes.size)
        self.mode = mode
        self.path = path
        self.label_names = label_names

    def remap(self, labels):
        """Map 0-based original class ids to 0..C-1; ids outside the split map to -1.

        Parameters
        ----------
        labels : array_like of int, any shape

        Returns
        -------
        ndarray, int64, same shape
        """
        labels = np.asarray(labels, dtype=np.int64)
        pos = np.searchsorted(self.classes, labels)
        pos_c = np.minimum(pos, self.nclass - 1)
        inside = (labels >= 0) & (self.classes[pos_c] == labels)
        return np.where(inside, pos_c, -1)

    def __repr__(self):
        return "Split(%s, %d classes: %d base, %d novel, from %s)" % (
            self.mode, self.nclass, self.base.size, self.novel.size, self.path)


def _class_list(d, key, path):
    if key not in d:
        raise InputError("split file %s has no key %r" % (path, key))
    v = d[key]
    if not isinstance(v, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in v):
        raise InputError("split file %s: %r must be a list of integer class ids" % (path, key))
    a = np.array(v, dtype=np.int64)
    if a.size == 0:
        raise InputError("split file %s: %r is empty" % (path, key))
    if a.min() < 1:
        raise InputError("split file %s: %r holds class id %d; ids are 1-based" % (path, key, a.min()))
    if np.unique(a).size != a.size:
        raise InputError("split file %s: %r lists a class twice" % (path, key))
    return a - 1


def _check_no_leak(d, path):
    """The validation split (parameters are chosen on it) and the test split share no class: a test
    class seen in validation, as a base class above all, leaks test images' classes into the choice.
    Checked when the file has both splits' lists."""
    keys = _MODE_KEYS["val"] + _MODE_KEYS["test"]
    if not all(isinstance(d.get(k), list) for k in keys):
        return
    ids = {k: set(c for c in d[k] if isinstance(c, int)) for k in keys}
    for kv in _MODE_KEYS["val"]:
        for kt in _MODE_KEYS["test"]:
            both = sorted(ids[kv] & ids[kt])
            if both:
                raise InputError("split file %s: class %d is in both %s (validation) and %s (test): the "
                                 "splits must not share a class" % (path, both[0], kv, kt))


def resolve_split(path, ddir, log=None):
    """The split file a script uses: ``path`` when given, else the data root's ``label_idx.json``
    when it has one (a generated or your own data root), else :data:`DEFAULT_SPLIT` (ImageNet's).
    ``log`` is told which and why."""
    if path:
        how = "--split"
    elif os.path.isfile(os.path.join(ddir, "label_idx.json")):
        path, how = os.path.join(ddir, "label_idx.json"), "the data root's own"
    else:
        path, how = DEFAULT_SPLIT, "the paper's ImageNet split (the data root has no label_idx.json)"
    if log:
        log("split file %s (%s)" % (path, how))
    return path


def load_split(path=None, mode="val"):
    """Read the classes of one split from a ``label_idx.json``-style file.

    Parameters
    ----------
    path : str or None
        Split file; None means :data:`DEFAULT_SPLIT` (the ImageNet split of the paper).
    mode : {"val", "test"}
        "val": ``base_classes_1`` + ``novel_classes_1``; "test": ``base_classes_2`` +
        ``novel_classes_2``.

    Returns
    -------
    Split
    """
    path = path or DEFAULT_SPLIT
    if mode not in _MODE_KEYS:
        raise InputError("mode %r: expected one of %s" % (mode, ", ".join(_MODE_KEYS)))
    require_file(path, "split file")
    try:
        with open(path) as f:
            d = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError("split file %s is not valid JSON: %s" % (path, e))
    if not isinstance(d, dict):
        raise InputError("split file %s: expected a JSON object" % path)
    kb, kn = _MODE_KEYS[mode]
    base, novel = _class_list(d, kb, path), _class_list(d, kn, path)
    both = np.intersect1d(base, novel)
    if both.size:
        raise InputError("split file %s: class %d is in both %s and %s" % (path, both[0] + 1, kb, kn))
    _check_no_leak(d, path)
    names = d.get("label_names")
    if names is not None:
        if not isinstance(names, list):
            raise InputError("split file %s: label_names must be a list" % path)
        top = max(base.max(), novel.max())
        if top >= len(names):
            raise InputError("split file %s: class id %d is beyond the %d label_names" % (
                path, top + 1, len(names)))
    return Split(base, novel, mode=mode, path=path, label_names=names)


def write_score_record(path, meta):
    """``{path}.json`` beside a score file (``--storeL``): the script, ``mode``, n, seed and split of
    the scores, which fusion.py checks (:func:`check_score_record`)."""
    from lowshot.common import write_json
    write_json(path + ".json", {k: meta.get(k) for k in ("script", "mode", "nlabeled", "seed", "split")})


def check_score_record(path, mode):
    """A one-line InputError when the record of score file ``path`` (:func:`write_score_record`)
    says it holds the scores of the other ``--mode``: validation and test images must never mix.
    Score files without a record (the 2018 code's) pass."""
    try:
        with open(path + ".json") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(rec, dict) and rec.get("mode") not in (None, mode):
        raise InputError("score file %s holds the %s split's scores (%s.json, written by %s.py), not the %s split's" % (
            path, rec["mode"], path, rec.get("script"), mode))


# the published layout under a data root (the one place that names these files)
FEATURE_FILES = {"train": "features/train.hdf5", "val": "features/val.hdf5", "pca": "features/PCAR256.vt",
                 "background": "features/f100m/concatenated_PCAR256.raw",
                 "blocks": "features/f100m/block%d.hdf5"}


def feature_paths(ddir):
    """Paths of the feature files under a data root.

    Returns
    -------
    dict with keys ``train``, ``val`` (hdf5), ``pca`` (``features/PCAR256.vt``), ``background``
    (``features/f100m/concatenated_PCAR256.raw``), ``blocks`` (``features/f100m/block%d.hdf5``, a
    pattern of the background blocks' features).
    """
    return {key: os.path.join(ddir, *rel.split("/")) for key, rel in FEATURE_FILES.items()}


def _open_h5(path):
    import h5py
    require_file(path, "feature file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError("feature file %s cannot be read as hdf5: %s" % (path, e))


def _check_h5(f, path):
    """Validate the all_feats/all_labels/count layout; return (feats dataset, count, D)."""
    for k in ("all_feats", "all_labels", "count"):
        if k not in f:
            raise InputError("feature file %s has no dataset %r" % (path, k))
    feats, labels, count = f["all_feats"], f["all_labels"], f["count"]
    if feats.ndim != 2 or feats.shape[1] == 0:
        raise InputError("feature file %s: all_feats has shape %s, expected (rows, D)" % (
            path, feats.shape))
    if feats.dtype.kind != "f":
        raise InputError("feature file %s: all_feats has dtype %s, expected float32" % (
            path, feats.dtype))
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError("feature file %s: all_labels has shape %s dtype %s, expected (rows,) int" % (
            path, labels.shape, labels.dtype))
    if count.shape not in ((), (1,)) or count.dtype.kind not in "iu":
        raise InputError("feature file %s: count has shape %s dtype %s, expected (1,) int" % (
            path, count.shape, count.dtype))
    n = int(count[()] if count.shape == () else count[0])
    if n < 0 or n > feats.shape[0] or n > labels.shape[0]:
        raise InputError("feature file %s: count = %d but all_feats has %d rows and all_labels %d" % (
            path, n, feats.shape[0], labels.shape[0]))
    return feats, n, feats.shape[1]


def feature_shape(path):
    """``(n, D)`` of an hdf5 feature file read without its labels (a background block): ``count``
    rows (all rows of ``all_feats`` when there is no ``count``) of D floats."""
    with _open_h5(path) as f:
        if "all_feats" not in f:
            raise InputError("feature file %s has no dataset 'all_feats'" % path)
        shape = f["all_feats"].shape
        n = int(np.asarray(f["count"]).ravel()[0]) if "count" in f else (shape[0] if shape else 0)
    if len(shape) != 2 or not 0 <= n <= shape[0]:
        raise InputError("feature file %s: all_feats shape %s with count %d" % (path, shape, n))
    return n, shape[1]


def read_row_range(path, i0, i1):
    """Rows ``[i0, i1)`` of ``all_feats`` as float32, C-contiguous (i1 - i0, D)."""
    with _open_h5(path) as f:
        return np.ascontiguousarray(f["all_feats"][i0:i1], dtype=np.float32)


def load_labels(path, split, require_all=True):
    """Labels of the valid rows of an hdf5 feature file that belong to the split.

    Parameters
    ----------
    path : str
        hdf5 file with ``all_feats``/``all_labels``/``count``.
    split : Split
    require_all : bool
        Raise InputError when a class of the split has no row in the file (a class missing from
        the file would otherwise shift nothing but silently never be learnt or tested).

    Returns
    -------
    y : ndarray, int64 (n,)
        Remapped labels in 0..C-1, in file order.
    rows : ndarray, int64 (n,)
        The file rows they come from (increasing).
    """
    with _open_h5(path) as f:
        _, count, _ = _check_h5(f, path)
        labels = np.asarray(f["all_labels"][:count]).astype(np.int64)
    if count and labels.min() < 0:
        raise InputError("feature file %s: all_labels holds a negative label %d" % (path, labels.min()))
    if count and split.label_names is not None and labels.max() >= len(split.label_names):
        raise InputError("feature file %s: all_labels holds label %d, beyond the %d classes of split "
                         "file %s" % (path, labels.max(), len(split.label_names), split.path))
    y = split.remap(labels)
    rows = np.flatnonzero(y >= 0)
    y = y[rows]
    if require_all:
        present = np.bincount(y, minlength=split.nclass) > 0
        if not present.all():
            c = split.classes[~present]
            raise InputError("feature file %s has no row of %d classes of split %s (%s), e.g. "
                             "class %d (1-based)" % (path, c.size, split.mode, split.path, c[0] + 1))
    return y, rows


def read_rows(path, rows):
    """Read given rows of ``all_feats`` as float32, checking they are finite.

    Reads the file in blocks of consecutive rows, so the temporary memory is one block and the
    result is the only full-size array.

    Parameters
    ----------
    path : str
        hdf5 feature file.
    rows : array_like of int (m,)
        Row numbers < count, in any order (repeats allowed).

    Returns
    -------
    ndarray, float32 (m, D), row i = ``all_feats[rows[i]]``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    with _open_h5(path) as f:
        feats, count, D = _check_h5(f, path)
        X = np.empty((rows.size, D), dtype=np.float32)
        if rows.size == 0:
            return X
        if rows.min() < 0 or rows.max() >= count:
            raise InputError("feature file %s: row %d requested, the file has count = %d" % (
                path, rows.max(), count))
        order = np.argsort(rows, kind="stable")
        srows = rows[order]
        i = 0
        while i < srows.size:
            lo = srows[i]
            j = np.searchsorted(srows, lo + _READ_ROWS, side="left")
            hi = srows[j - 1] + 1
            block = np.asarray(feats[lo:hi])
            sel = block[srows[i:j] - lo]
            if not np.isfinite(sel).all():
                bad = np.flatnonzero(~np.isfinite(sel).all(axis=1))[0]
                raise InputError("feature file %s: all_feats row %d holds NaN or inf" % (
                    path, srows[i + bad]))
            X[order[i:j]] = sel
            i = j
    return X


def load_features(path, split, require_all=True):
    """Features and remapped labels of the split's classes in an hdf5 feature file.

    Parameters
    ----------
    path : str
        hdf5 file (``all_feats`` (rows, D) float32, ``all_labels`` (rows,) int, ``count`` (1,)).
    split : Split

    Returns
    -------
    X : ndarray, float32 (n, D)
        Valid rows whose label is in the split, in file order.
    y : ndarray, int64 (n,)
        Their labels remapped to 0..C-1 (increasing original class order).
    """
    y, rows = load_labels(path, split, require_all=require_all)
    return read_rows(path, rows), y


def select_labelled(y, split, nlabeled, seed, source="training set"):
    """The labelled set of the low-shot protocol (same draws as the 2018 original).

    One ``np.random.RandomState(seed)``; classes in increasing remapped id; a base class
    contributes all its images; a novel class has its image indices shuffled by that generator
    and contributes the first ``nlabeled``.

    Parameters
    ----------
    y : ndarray, int (n,)
        Remapped training labels in 0..C-1 (file order, as :func:`load_features` returns).
    split : Split
    nlabeled : int
        Labelled images per novel class, >= 1.
    seed : int
    source : str
        Named in error messages (e.g. the feature file).

    Returns
    -------
    labelled_idx : ndarray, int64
        Indices into ``y``: all base images (class order, increasing index inside a class), then
        the ``nlabeled`` images of each novel class (class order, shuffled order inside a class).
    remaining_novel_idx : ndarray, int64
        The other images of the novel classes (class order, shuffled order): the "in-domain"
        unlabelled images.
    """
    y = np.asarray(y)
    if nlabeled < 1:
        raise InputError("nlabeled %d: need at least 1 labelled image per novel class" % nlabeled)
    if y.size and (y.min() < 0 or y.max() >= split.nclass):
        raise InputError("%s: label %d outside the split's %d classes" % (
            source, y.min() if y.min() < 0 else y.max(), split.nclass))
    # stable sort: inside a class, indices stay increasing, like np.nonzero(y == c)
    order = np.argsort(y, kind="stable").astype(np.int64)
    bounds = np.searchsorted(y[order], np.arange(split.nclass + 1))
    rs = np.random.RandomState(seed)
    base, novel, rest = [], [], []
    for c in range(split.nclass):
        imnos = order[bounds[c]:bounds[c + 1]]
        if not split.is_novel[c]:
            base.append(imnos)
            continue
        if imnos.size < nlabeled:
            raise InputError("%s: novel class %d (1-based) has %d images, fewer than nlabeled = %d" % (
                source, split.classes[c] + 1, imnos.size, nlabeled))
        imnos = imnos.copy()
        rs.shuffle(imnos)
        novel.append(imnos[:nlabeled])
        rest.append(imnos[nlabeled:])
    cat = lambda l: np.concatenate(l).astype(np.int64) if l else np.zeros(0, dtype=np.int64)
    return np.concatenate([cat(base), cat(novel)]), cat(rest)


class LowShotData:
    """What one experiment needs: labelled and test features of one split (see :func:`load_lowshot`).

    Attributes
    ----------
    split : Split
    Xl : ndarray, float32 (nl, D)   labelled images (base first, then novel)
    yl : ndarray, int64 (nl,)       their labels in 0..C-1
    Xte : ndarray, float32 (nte, D) test images (val.hdf5) of the split's classes
    yte : ndarray, int64 (nte,)
    Xu : ndarray, float32 (nu, D) or None  remaining novel training images (in-domain), if asked
    yu : ndarray, int64 (nu,) or None      their (hidden) labels
    D : int
    """


def load_lowshot(ddir, split_path, mode, nlabeled, seed, indomain=False, log=None):
    """Load the labelled set, the test set and optionally the in-domain unlabelled set.

    Reads only the rows it needs from ``features/train.hdf5`` and ``features/val.hdf5``.

    Parameters
    ----------
    ddir : str
        Data root.
    split_path : str or None
        Split file (None: :data:`DEFAULT_SPLIT`).
    mode : {"val", "test"}
    nlabeled, seed : int
        Protocol parameters (:func:`select_labelled`).
    indomain : bool
        Also return the remaining novel-class training images (``Xu``, ``yu``).
    log : callable or None
        Progress logger (e.g. :func:`lowshot.common.log`).

    Returns
    -------
    LowShotData
    """
    log = log or (lambda *a: None)
    paths = feature_paths(ddir)
    split = load_split(split_path, mode)
    log("split %s" % split)
    ytr, rows_tr = load_labels(paths["train"], split)
    lab, rest = select_labelled(ytr, split, nlabeled, seed, source="feature file %s" % paths["train"])
    d = LowShotData()
    d.split = split
    log("reading %d labelled rows of %s" % (lab.size, paths["train"]))
    d.Xl, d.yl = read_rows(paths["train"], rows_tr[lab]), ytr[lab]
    d.Xu = d.yu = None
    if indomain:
        log("reading %d in-domain unlabelled rows of %s" % (rest.size, paths["train"]))
        d.Xu, d.yu = read_rows(paths["train"], rows_tr[rest]), ytr[rest]
    log("reading test rows of %s" % paths["val"])
    d.Xte, d.yte = load_features(paths["val"], split)
    if d.Xte.shape[1] != d.Xl.shape[1]:
        raise InputError("feature file %s has D = %d but %s has D = %d" % (
            paths["val"], d.Xte.shape[1], paths["train"], d.Xl.shape[1]))
    d.D = d.Xl.shape[1]
    log("labelled %s, test %s, %d classes (%d novel)" % (
        d.Xl.shape, d.Xte.shape, split.nclass, split.is_novel.sum()))
    return d


def load_pca(path, D=None):
    """Read the faiss VectorTransform (``PCAR256.vt``) and check its input dimension.

    Parameters
    ----------
    path : str
    D : int or None
        Expected input dimension (the hdf5 features' D).

    Returns
    -------
    faiss.VectorTransform with ``d_in`` = D and ``d_out`` = d.
    """
    import faiss
    require_file(path, "PCA transform")
    try:
        vt = faiss.read_VectorTransform(path)
    except RuntimeError as e:
        raise InputError("PCA transform %s cannot be read by faiss: %s" % (
            path, str(e).strip().splitlines()[0] if str(e).strip() else "error"))
    if not vt.is_trained:
        raise InputError("PCA transform %s holds an untrained transform" % path)
    if D is not None:
        check_pca_input(vt, D, path)
    return vt


def check_pca_input(vt, D, path):
    """The PCA transform read from ``path`` applies to features of dimension D."""
    if vt.d_in != D:
        raise InputError("PCA transform %s maps %d -> %d dims but the features have D = %d" % (
            path, vt.d_in, vt.d_out, D))


def open_background(ddir_or_path, nbg=None, d=None):
    """Memory-map the background matrix read-only.

    Parameters
    ----------
    ddir_or_path : str
        The data root (then ``features/f100m/concatenated_PCAR256.raw``) or the raw file itself.
    nbg : int or None
        Number of rows to map (the first nbg); None: all.
    d : int or None
        Row dimension; None: ``d_out`` of the PCA transform (``features/PCAR256.vt`` of the data
        root, or the ``PCAR256.vt`` one folder above the raw file).

    Returns
    -------
    numpy.memmap, float32 (nbg, d), read-only.
    """
    if os.path.isdir(ddir_or_path):
        path = feature_paths(ddir_or_path)["background"]
        vt_path = feature_paths(ddir_or_path)["pca"]
    else:
        path = ddir_or_path
        vt_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "PCAR256.vt")
    require_file(path, "background file")
    if d is None:
        if not os.path.isfile(vt_path):
            raise InputError("background file %s: its dimension d comes from %s, which does not "
                             "exist" % (path, vt_path))
        d = load_pca(vt_path).d_out
    d = int(d)
    if d <= 0:
        raise InputError("background file %s: dimension d = %d" % (path, d))
    size = os.path.getsize(path)
    if size % (d * 4) != 0:
        raise InputError("background file %s: size %d bytes is not a multiple of d*4 = %d "
                         "(float32 rows of d = %d)" % (path, size, d * 4, d))
    nrow = size // (d * 4)
    if nrow == 0:
        raise InputError("background file %s is empty" % path)
    if nbg is None:
        nbg = nrow
    if nbg < 1:
        raise InputError("nbg %d: the background set needs at least 1 row (%s)" % (nbg, path))
    if nbg > nrow:
        raise InputError("background file %s has %d rows of d = %d, fewer than nbg = %d" % (
            path, nrow, d, nbg))
    return np.memmap(path, dtype=np.float32, mode="r", shape=(int(nbg), d))


def main(argv=None):
    """``python -m lowshot.data path DDIR KEY [BLOCK]``: print the path of a feature file (for bash
    scripts): KEY is train, val, pca, background, or blocks (with the block number)."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (3, 4) or argv[0] != "path" or argv[2] not in FEATURE_FILES:
        sys.exit("usage: python -m lowshot.data path DDIR {%s} [BLOCK]" % ",".join(FEATURE_FILES))
    p = feature_paths(argv[1])[argv[2]]
    print(p % int(argv[3]) if argv[2] == "blocks" else p)


if __name__ == "__main__":
    main()
