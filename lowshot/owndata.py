"""Your own images as a data root in the published layout (``own_data.py``).

Input: a folder of class sub-folders (``PHOTOS/<class>/<image>``), optionally folders of unlabelled
images (the background, the stand-in for the paper's YFCC100M). Output, under the data root::

    lists/{train,test,background}.json   image lists for save_features.py (absolute paths, 0-based
                                         labels, -1 for the background)
    label_idx.json                       the class split (1-based ids, label_names), as data/label_idx.json
    own_data.json                        what was found and drawn: classes, groups, images per side

The split, with one ``np.random.RandomState(seed)``:
- images: within every class, the images are grouped (``group``: a regular expression on the file
  name; its first group, or its whole match, names the group; without it each image is its own
  group), and a ``test_fraction`` of the groups (at least one) gives the test images, the others
  the training images, so near-duplicates of one group never straddle the two;
  (``max_train_per_class``/``max_test_per_class`` cap a side, taking the images round-robin over
  its groups: a capped class keeps the variety of its groups);
- classes: a ``val_fraction`` of them form the validation split, the others the test split; in
  each, a ``novel_fraction`` (at least one) are novel classes, the others base classes. The novel
  classes of both splits are drawn first, among the classes with at least ``min_novel_train``
  training images (n labelled images must exist for the largest n of the protocol), then the base
  classes among the others. A class that cannot be split is left out, named with its reason in the
  log (a ``WARNING:`` line) and in own_data.json: no image file in its folder, every image unreadable,
  fewer than two groups. The class ids (1-based in label_idx.json, 0-based labels in the lists and
  feature files) number the kept classes only, so ``label_names`` lists exactly the classes of the
  feature files, as data/label_idx.json does.

What would make the numbers mislead is logged as a ``WARNING:`` line and kept in own_data.json's
``warnings``: a ``group`` expression that matches no file name or few of them, a split with at most 5
classes (top-5 is then 100%), a class holding most of a split's test images.

Over 400 lines: the split, the files it writes, and the phases config made for the split (its n
values and metric follow from the split's classes); own_data.py is the one caller of all three. The
phases config (phases_config, set_metric, phases_from_template) is the seam if it grows.
"""
import json
import os
import re
import time

import numpy as np

from lowshot.common import InputError, logger, write_json
from lowshot.phase_config import read_mapping

log = logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_files(folder):
    """The image files under ``folder`` (recursively, by extension), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def scan_classes(folder):
    """[(class name, [image paths])] of the sub-folders of ``folder``, sorted by name; a sub-folder
    without image files has an empty list (:func:`make_split` leaves it out and says so)."""
    if not os.path.isdir(folder):
        raise InputError("image folder %s does not exist" % folder)
    classes = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            classes.append((name, [os.path.abspath(f) for f in image_files(path)]))
    if not any(files for _, files in classes):
        raise InputError("image folder %s has no class sub-folder with images (%s)" % (
            folder, ", ".join(IMAGE_EXTENSIONS)))
    return classes


# JPEGs are checked at a reduced scale (PIL's draft mode: the whole file is still decoded, faster)
_CHECK_SIZE = 256


def unreadable_images(paths, what="images"):
    """The files among ``paths`` that PIL cannot decode (empty, truncated, corrupt, not an image), as
    {path: reason}; logged with their names. save_features.py would compute them on a black image: a
    labelled one would be a wrong training or test image, so :func:`make_split` leaves them out."""
    from PIL import Image
    t0, bad = time.time(), {}
    for p in paths:
        try:
            with Image.open(p) as img:
                img.draft(None, (_CHECK_SIZE, _CHECK_SIZE))
                img.load()
        except Exception as e:         # anything PIL raises on a bad file
            bad[p] = " ".join(("%s: %s" % (type(e).__name__, e)).split())
    log("checked that the %d %s can be read: %.1f s, %d unreadable" % (len(paths), what, time.time() - t0, len(bad)))
    for p, reason in sorted(bad.items())[:20]:
        log("WARNING: unreadable image %s (%s): left out" % (p, reason))
    if len(bad) > 20:
        log("WARNING: and %d more unreadable images, left out (own_data.json lists them)" % (len(bad) - 20))
    return bad


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def group_of(path, group):
    """The group of an image: the first group (or the whole match) of ``group`` searched in its file
    name without the extension; an image whose name it does not match is its own group."""
    stem = _stem(path)
    if group is None:
        return stem
    m = group.search(stem)
    if m is None:
        return stem
    return m.group(1) if m.groups() else m.group(0)


def _group_warning(pattern, names):
    """The warning for a ``--group`` expression that matches no file name, or fewer than half of them
    (naming one it does not match), or None."""
    missed = [f for f in names if pattern.search(_stem(f)) is None]
    if not names or len(missed) * 2 <= len(names):
        return None
    example = os.path.basename(missed[0])
    hint = ""
    if pattern.search(example):
        hint = " (it matches %r with its extension: leave the extension out of the expression)" % example
    how = "matches no file name" if len(missed) == len(names) else "matches only %d of the %d file names" % (
        len(names) - len(missed), len(names))
    return ("group %r %s: it is searched (re.search) in the name without its extension, e.g. %r for %s, "
            "which it does not match%s; an image whose name it does not match is its own group, so "
            "near-duplicates can land on both sides of the training/test split" % (
                pattern.pattern, how, _stem(missed[0]), example, hint))


def _round_robin(lists):
    """Interleave lists: the first element of each, then the second of each, ..."""
    return [x[i] for i in range(max(map(len, lists), default=0)) for x in lists if i < len(x)]


def _check_split_args(test_fraction, val_fraction, novel_fraction, group, min_novel_train, max_train_per_class,
                      max_test_per_class):
    """Check :func:`make_split`'s parameters; return ``group`` compiled (None without it)."""
    for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction),
                    ("novel_fraction", novel_fraction)):
        if not 0 < v < 1:
            raise InputError("%s %g: must be between 0 and 1" % (name, v))
    for name, v in (("max_train_per_class", max_train_per_class), ("max_test_per_class", max_test_per_class)):
        if v is not None and v < 1:
            raise InputError("%s %d: must be at least 1" % (name, v))
    if max_train_per_class is not None and max_train_per_class < min_novel_train:
        raise InputError("max_train_per_class %d is below min_novel_train %d: no class could be novel"
                         % (max_train_per_class, min_novel_train))
    if not group:
        return None
    try:
        return re.compile(group)
    except re.error as e:
        raise InputError("group %r is not a regular expression: %s" % (group, e))


def _drop_reason(files, nbad, keys, key):
    """Why a class with fewer than two groups is left out (``files``: its readable images)."""
    if nbad and not files:
        reason = "its %d images are all unreadable" % nbad
    elif not files:
        reason = "empty: no image (%s)" % ", ".join(IMAGE_EXTENSIONS) if not key else "empty: no row"
    elif len(files) == 1:
        reason = "1 image: a class needs two, one for training and one for test"
    else:
        reason = ("its %d images are one group, %r (%s): a class needs two groups, one for "
                  "training and one for test" % (len(files), keys[0], "groups" if key else "group"))
    return reason + (" (and %d unreadable)" % nbad if nbad and files else "")


def _split_images(groups, rs, test_fraction, max_train_per_class, max_test_per_class):
    """One class's groups ({group: images}) drawn into (training images, test images, test groups)."""
    keys = sorted(groups)
    keys = [keys[i] for i in rs.permutation(len(keys))]
    ntest = min(len(keys) - 1, max(1, int(round(test_fraction * len(keys)))))
    shuffled = [[groups[k][i] for i in rs.permutation(len(groups[k]))] for k in keys]
    te = _round_robin(shuffled[:ntest])[:max_test_per_class]
    tr = _round_robin(shuffled[ntest:])[:max_train_per_class]
    return tr, te, ntest


def _class_roles(kept, info, rs, val_fraction, novel_fraction, min_novel_train):
    """The kept classes (0-based ids) drawn into the four parts of label_idx.json (1-based ids)."""
    nval = min(len(kept) - 2, max(2, int(round(val_fraction * len(kept)))))
    sizes = [nval, len(kept) - nval]
    nnov = [min(m - 1, max(1, int(round(novel_fraction * m)))) for m in sizes]
    ntrain = {c["id"] - 1: c["train"] for c in info}
    big = [c for c in kept if ntrain[c] >= min_novel_train]
    if len(big) < sum(nnov):
        raise InputError("only %d classes have >= %d training images (min_novel_train), %d novel classes "
                         "are needed: lower it or novel_fraction" % (len(big), min_novel_train, sum(nnov)))
    novel = [big[i] for i in rs.permutation(len(big))[:sum(nnov)]]
    rest = sorted(set(kept) - set(novel))
    base = [rest[i] for i in rs.permutation(len(rest))]
    parts = {"base_classes_1": base[:nval - nnov[0]], "novel_classes_1": novel[:nnov[0]],
             "base_classes_2": base[nval - nnov[0]:], "novel_classes_2": novel[nnov[0]:]}
    return {g: sorted(c + 1 for c in ids) for g, ids in parts.items()}


def make_split(classes, seed=0, test_fraction=0.3, val_fraction=0.5, novel_fraction=0.5, group=None,
               key=None, min_novel_train=0, max_train_per_class=None, max_test_per_class=None, unreadable=None):
    """Draw the split of :func:`scan_classes`' classes (see the module docstring). ``classes`` may
    also hold rows of a feature matrix (:func:`feature_classes`) with ``key`` giving each row's group.

    ``min_novel_train``: novel classes are drawn among the classes with at least that many training
    images (the largest n of the protocol needs them). ``max_train_per_class``/``max_test_per_class``
    (None: no cap): images kept per class and side, taken round-robin over its groups.
    ``unreadable``: {path: reason} of images left out (:func:`unreadable_images`).

    Returns
    -------
    dict: ``train``, ``test`` (lists of (path, 0-based class id of the kept classes)), ``label_idx``
    (the split file's content), ``classes`` (per kept class: name, split group, groups and images per
    side), ``dropped`` (per class left out: name and reason), ``warnings`` (also logged),
    ``unreadable``.
    """
    pattern = _check_split_args(test_fraction, val_fraction, novel_fraction, group, min_novel_train,
                                max_train_per_class, max_test_per_class)
    rs = np.random.RandomState(seed)
    unreadable = unreadable or {}
    train, test, kept, dropped, info, warnings = [], [], [], [], [], []
    for name, files in classes:
        nbad = sum(f in unreadable for f in files)
        files = [f for f in files if f not in unreadable]
        groups = {}
        for f in files:
            groups.setdefault(key(f) if key else group_of(f, pattern), []).append(f)
        if len(groups) < 2:
            dropped.append({"name": name, "reason": _drop_reason(files, nbad, sorted(groups), key)})
            log("WARNING: class %r left out: %s" % (name, dropped[-1]["reason"]))
            continue
        cid = len(kept)
        tr, te, ntest = _split_images(groups, rs, test_fraction, max_train_per_class, max_test_per_class)
        train += [(f, cid) for f in sorted(tr)]
        test += [(f, cid) for f in sorted(te)]
        kept.append(cid)
        info.append({"name": name, "id": cid + 1, "groups": len(groups), "test_groups": ntest,
                     "train": len(tr), "test": len(te)})
    if len(kept) < 4:
        raise InputError("%d classes have images in two groups or more (%s left out): the split needs 4 "
                         "(validation and test, base and novel)" % (
                             len(kept), "; ".join("%s: %s" % (d["name"], d["reason"]) for d in dropped) or "none"))
    if pattern is not None:
        warnings.append(_group_warning(pattern, [f for _, files in classes for f in files if f not in unreadable]))
    parts = _class_roles(kept, info, rs, val_fraction, novel_fraction, min_novel_train)
    role = {c: g for g, ids in parts.items() for c in ids}
    for c in info:
        c["group"] = role[c["id"]]
    label_idx = dict(parts, base_classes=sorted(parts["base_classes_1"] + parts["base_classes_2"]),
                     label_names=[c["name"] for c in info])
    warnings += _split_warnings(parts, info)
    warnings = [w for w in warnings if w]
    for w in warnings:
        log("WARNING: " + w)
    return {"train": train, "test": test, "label_idx": label_idx, "classes": info, "dropped": dropped,
            "warnings": warnings, "unreadable": {f: unreadable[f] for f in sorted(unreadable)}}


# a split with this many classes or fewer has top-5 = 100% whatever the method
TOP5_CERTAIN = 5
# a class holding more than this share of a split's test images (and twice an even share) is named
DOMINANT_SHARE = 0.3


def _split_warnings(parts, info):
    """Warnings on the evaluation splits: at most TOP5_CERTAIN classes, one class holding most of the
    test images."""
    out = []
    byid = {c["id"]: c for c in info}
    for s, what in (("1", "validation"), ("2", "test")):
        ids = parts["base_classes_" + s] + parts["novel_classes_" + s]
        if len(ids) <= TOP5_CERTAIN:
            out.append("the %s split has %d classes (<= %d): top-5 accuracy is 100%% for every method there, "
                       "read top-1 (phase 2 chooses on top-1, metric top1, when the test split has fewer than "
                       "%d classes)" % (what, len(ids), TOP5_CERTAIN, FEW_CLASSES))
        ntest = sum(byid[c]["test"] for c in ids)
        big = max(ids, key=lambda c: byid[c]["test"])
        share = byid[big]["test"] / max(1, ntest)
        if share > DOMINANT_SHARE and share > 2.0 / len(ids):
            out.append("class %r holds %d of the %d test images of the %s split (%.0f%%): its accuracy "
                       "dominates the all-classes numbers (--max_test_per_class evens the classes)" % (
                           byid[big]["name"], byid[big]["test"], ntest, what, 100 * share))
    return out


def write_lists(ddir, split, unlabelled, params=None):
    """The image lists, label_idx.json and own_data.json of a split under ``ddir`` (``params``: the
    split's parameters, recorded); unreadable unlabelled images are left out. Returns the number of
    background images."""
    background = [os.path.abspath(f) for folder in unlabelled for f in image_files(folder)]
    for folder in unlabelled:
        if not os.path.isdir(folder):
            raise InputError("unlabelled image folder %s does not exist" % folder)
    if background:
        bad = unreadable_images(background, "unlabelled images")
        background = [f for f in background if f not in bad]
        split = dict(split, unreadable=dict(split.get("unreadable") or {}, **bad))
    for part, items in (("train", split["train"]), ("test", split["test"]),
                        ("background", [(f, -1) for f in background])):
        write_json(os.path.join(ddir, "lists", part + ".json"),
                   {"image_names": [f for f, _ in items], "image_labels": [int(c) for _, c in items]})
    write_split(ddir, split, len(background), params)
    return len(background)


def write_split(ddir, split, nbackground, params=None):
    """label_idx.json and own_data.json (what was found and drawn, and ``params``, the parameters the
    split was drawn with: :func:`check_split_params`) of a split under ``ddir``."""
    write_json(os.path.join(ddir, "label_idx.json"), split["label_idx"])
    write_json(os.path.join(ddir, "own_data.json"), {
        "classes": split["classes"], "dropped": split["dropped"], "ntrain": len(split["train"]),
        "ntest": len(split["test"]), "nbackground": nbackground, "split_params": params,
        "warnings": split.get("warnings", []), "unreadable": split.get("unreadable", {})})
    log("%d classes (%d left out), %d training, %d test and %d background images or rows%s" % (
        len(split["classes"]), len(split["dropped"]), len(split["train"]), len(split["test"]), nbackground,
        "; %d unreadable images left out" % len(split["unreadable"]) if split.get("unreadable") else ""))


def recorded_unreadable(ddir):
    """{path: reason} of the images own_data.json records as unreadable (left out of the split when it
    was drawn: a rerun leaves out the same ones without reading every image again)."""
    with open(os.path.join(ddir, "own_data.json")) as f:
        return json.load(f).get("unreadable") or {}


def check_split_params(ddir, params):
    """A data root that has a split keeps it; the parameters given now must be the ones it was drawn
    with (a one-line InputError naming the difference and how to draw another one)."""
    path = os.path.join(ddir, "own_data.json")
    try:
        with open(path) as f:
            recorded = json.load(f).get("split_params")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError("%s cannot be read (%s): remove the data root %s to start again" % (path, e, ddir))
    if recorded is None:
        log("WARNING: %s does not record the parameters of its split (an earlier version wrote it): the split "
            "is kept as it is, whatever --seed and the fractions given now" % path)
        return
    diff = ["--%s %s (the split's: %s)" % (k, v, recorded.get(k)) for k, v in sorted(params.items())
            if recorded.get(k) != v]
    if diff:
        raise InputError("%s already has a split, drawn with other parameters than %s: it is kept only with "
                         "its own; to draw another, use a new data root (or remove %s and what was made from "
                         "it)" % (ddir, ", ".join(diff), ddir))


def read_vector(path, what):
    """A 1-D array from a .npy file (``--labels``, ``--groups``): a one-line InputError when it is
    missing, not a .npy array (pickles are refused) or not one value per row."""
    if not os.path.isfile(path):
        raise InputError("%s %s does not exist" % (what, path))
    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError("%s %s is not a .npy array (%s)" % (what, path, " ".join(str(e).split())))
    if not isinstance(v, np.ndarray) or v.ndim != 1:
        raise InputError("%s %s must hold one value per row (a 1-D array), not %s" % (
            what, path, getattr(v, "shape", type(v).__name__)))
    return v


def phases_config(ddir, nbg, split, kmax=30):
    """A phases config for the data root: small grids (as configs/demo.yaml), n up to what the smallest
    novel class allows, k = 30 or less when the graph (or the stored background graph's kmax) is
    small, the background if there is one, and the in-domain columns (the novel classes' training
    images beyond the n labelled ones as unlabelled nodes) when there are such images."""
    ntrain = {c["id"]: c["train"] for c in split["classes"]}
    li = split["label_idx"]
    novel = li["novel_classes_1"] + li["novel_classes_2"]
    nmin = min(ntrain[c] for c in novel)
    nlabeled = [n for n in (1, 2, 5, 10, 20) if n <= nmin] or [1]
    indomain = [False, True] if any(ntrain[c] > nlabeled[0] for c in novel) else [False]
    # the smallest graph: one split's base images, one image per novel class, no background
    nodes = min(sum(ntrain[c] for c in li["base_classes_" + s]) + len(li["novel_classes_" + s]) for s in "12")
    return {
        "rundir": os.path.join(os.path.abspath(ddir), "runs"), "ddir": os.path.abspath(ddir),
        "split": os.path.join(os.path.abspath(ddir), "label_idx.json"),
        "seeds": [1, 2, 3, 4, 5], "nlabeled": nlabeled,
        "logreg": {"lr": [0.1, 0.01], "wd": [0, 0.1], "batchsize": [64], "maxiter": 1500},
        "diffusion": {"nbg": [0, nbg] if nbg else [0], "indomain": indomain,
                      "k": max(1, min(30, nodes - 1, kmax)), "niter": 20},
        "fusion": {"nbg": [nbg] if nbg else [0]},
        "local": {"threads_per_run": 1},
    }


# below this many test classes top-5 says little (5 of 9 classes: chance is 56%): phase 2 chooses on top-1
FEW_CLASSES = 10


def set_metric(cfg, nclass_test, where):
    """The config's ``metric`` (what phase 2 maximises), unless it (or ``choose_on``, its older name)
    is set already: top1 when the test split has fewer than :data:`FEW_CLASSES` classes, else top5
    (the paper's). Logs the choice; ``where`` names the config file."""
    given = cfg.get("metric", cfg.get("choose_on"))
    if given is not None:
        log("the test split has %d classes; metric: %s, as the template sets it" % (nclass_test, given))
        return
    if nclass_test < FEW_CLASSES:
        cfg["metric"] = "top1"
        log("the test split has %d classes, fewer than %d: phase 2 chooses on top-1 accuracy (metric: top1 "
            "in %s; top-5 is near-certain with so few classes)" % (nclass_test, FEW_CLASSES, where))
    else:
        cfg["metric"] = "top5"
        log("the test split has %d classes: phase 2 chooses on top-5 accuracy, as the paper (metric: top5 "
            "in %s)" % (nclass_test, where))


def phases_from_template(ddir, nbg, template):
    """A phases config from a template (your grids): ``ddir``, ``split`` and ``rundir`` pointing into
    ``ddir``, and the background size ``all`` in ``diffusion.nbg``/``fusion.nbg`` replaced by ``nbg``
    (the template's other keys are kept; the caller checks the result with phase_config.load_config)."""
    cfg = read_mapping(template, "phases template")
    ddir = os.path.abspath(ddir)
    cfg.update(ddir=ddir, split=os.path.join(ddir, "label_idx.json"), rundir=os.path.join(ddir, "runs"))

    def fill(values, key):
        if values is None:
            return None
        if not isinstance(values, list):
            raise InputError("phases template %s: %s must be a list of sizes or 'all'" % (template, key))
        out = [nbg if v == "all" else v for v in values]
        if any(not isinstance(v, int) or not 0 <= v <= nbg for v in out):
            raise InputError("phases template %s: %s %s: sizes must be 'all' or 0..%d (the unlabelled images)"
                             % (template, key, values, nbg))
        return list(dict.fromkeys(out))       # [0, all] without unlabelled images: one size, not two

    for sec in ("diffusion", "fusion"):
        if sec == "diffusion" or sec in cfg:
            if cfg.get(sec) is None:
                cfg[sec] = {}
            if not isinstance(cfg[sec], dict):
                raise InputError("phases template %s: %s must be a mapping of its keys" % (template, sec))
            cfg[sec]["nbg"] = fill(cfg[sec].get("nbg", ["all"] if sec == "diffusion" else None), sec + ".nbg")
    return cfg


def feature_classes(labels, names=None):
    """[(class name, [row numbers])] of a label vector (0-based class ids; rows of a feature matrix)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise InputError("labels must be one non-negative integer per row, not %s %s" % (
            labels.dtype, labels.shape))
    ncls = int(labels.max()) + 1 if labels.size else 0
    names = names or ["class%d" % c for c in range(ncls)]
    if len(names) < ncls:
        raise InputError("%d class names for %d classes" % (len(names), ncls))
    return [(names[c], [int(i) for i in np.flatnonzero(labels == c)]) for c in range(ncls)]


def write_features(path, X, labels):
    """An hdf5 feature file in the published layout (all_feats, all_labels, count), atomically."""
    import h5py
    from lowshot.common import atomic_output
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f["all_feats"] = np.ascontiguousarray(X, dtype=np.float32)
            f["all_labels"] = np.asarray(labels, dtype=np.int64)
            f["count"] = np.array([len(X)], dtype=np.int64)


def read_matrix(path, what):
    """A (rows, D) float32 matrix from a .npy file or a feature hdf5 (all_feats, first count rows),
    with the hdf5's all_labels when it has them."""
    if path.endswith(".npy"):
        try:
            X = np.load(path)
        except (OSError, ValueError) as e:
            raise InputError("%s %s is not a .npy array: %s" % (what, path, e))
        labels = None
    else:
        from lowshot import data
        n, _ = data.feature_shape(path)
        X = data.read_row_range(path, 0, n)
        import h5py
        with h5py.File(path, "r") as f:
            labels = np.asarray(f["all_labels"][:n]) if "all_labels" in f else None
    if X.ndim != 2 or not np.isfinite(X).all():
        raise InputError("%s %s must be a finite (rows, D) matrix, not %s" % (what, path, X.shape))
    return np.asarray(X, dtype=np.float32), labels

