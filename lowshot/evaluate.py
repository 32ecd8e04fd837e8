"""The benchmark's metrics: top-k accuracy over all test images and over those of novel classes,
for every k of :data:`KS` (top-5 is the paper's metric; top-1 matters when there are few classes).

Ties between equal scores go to the lowest class id, so a result does not depend on the sort
algorithm: class j ranks before the true class y when score_j > score_y, or score_j == score_y and
j < y; the image counts as correct at k when fewer than k classes rank before y.

Every stage reports the mapping of :func:`accuracies`, ``{"top1", "top1_novel", "top5",
"top5_novel"}`` for ``ks = (1, 5)``; another k is one more entry of ``ks``.
"""
import numpy as np

from lowshot.common import InputError

# rows of the score matrix handled at a time (bounds the (rows, C) temporaries)
_CHUNK = 4096
# the top-k accuracies every stage reports (result JSONs, tables, validation's choices)
KS = (1, 5)


def metric_names(ks=KS):
    """Result keys of :func:`accuracies`: ``["top1", "top1_novel", "top5", "top5_novel"]``."""
    return [name for k in ks for name in ("top%d" % k, "top%d_novel" % k)]


def _check(scores, y, nclass=None):
    if scores.ndim != 2:
        raise InputError("scores have shape %s, expected (n_test, C)" % (scores.shape,))
    n, C = scores.shape
    y = np.asarray(y)
    if y.shape != (n,):
        raise InputError("labels have shape %s but scores have %d rows" % (y.shape, n))
    if n and (y.min() < 0 or y.max() >= C):
        raise InputError("label %d outside the %d score columns" % (
            y.min() if y.min() < 0 else y.max(), C))
    if nclass is not None and C != nclass:
        raise InputError("scores have %d columns, expected %d classes" % (C, nclass))
    return y.astype(np.int64)


def rank_of_true(scores, y):
    """Number of classes ranked before the true class, with the tie rule above.

    Parameters
    ----------
    scores : ndarray, float (n, C)
    y : ndarray, int (n,) in 0..C-1

    Returns
    -------
    ndarray, int64 (n,): 0 when the true class ranks first.
    """
    scores = np.asarray(scores)
    y = _check(scores, y)
    n, C = scores.shape
    rank = np.empty(n, dtype=np.int64)
    cols = np.arange(C)
    for i0 in range(0, n, _CHUNK):
        S = scores[i0:i0 + _CHUNK]
        yy = y[i0:i0 + _CHUNK]
        if not np.isfinite(S).all():
            raise InputError("scores hold NaN or inf (rows %d..%d)" % (i0, i0 + S.shape[0] - 1))
        sy = S[np.arange(S.shape[0]), yy][:, None]
        rank[i0:i0 + S.shape[0]] = ((S > sy) | ((S == sy) & (cols < yy[:, None]))).sum(axis=1)
    return rank


def accuracies(scores, y, is_novel_class, ks=KS):
    """Top-k accuracy for every k of ``ks``, over all test images and over novel-class ones.

    Parameters
    ----------
    scores : ndarray, float (n_test, C)
        Any monotone class scores (probabilities, log-probabilities, diffusion mass).
    y : ndarray, int (n_test,)
        True labels in 0..C-1.
    is_novel_class : ndarray, bool (C,)
    ks : tuple of int

    Returns
    -------
    dict : ``"top%d" % k`` and ``"top%d_novel" % k`` -> float in [0, 1], in the order of
    :func:`metric_names`; a novel value is nan when no test image is of a novel class.
    """
    is_novel_class = np.asarray(is_novel_class, dtype=bool)
    scores = np.asarray(scores)
    _check(scores, y, nclass=is_novel_class.size)
    return _by_k(rank_of_true(scores, y), y, is_novel_class, ks)


def accuracies_from_ids(top_ids, y, is_novel_class, ks=KS):
    """:func:`accuracies` given each test image's best class ids (n_test, m), best first (e.g.
    merged from class slices, lowshot.diffuse.merge_slice_tops); every k must be <= m, or m = C."""
    top_ids = np.asarray(top_ids)
    y = np.asarray(y, dtype=np.int64)
    kmax, m = max(ks), top_ids.shape[1]
    if m < min(kmax, np.size(is_novel_class)):
        raise InputError("top-%d needs each test image's %d best classes, the slices kept %d" % (kmax, kmax, m))
    hit = top_ids == y[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), top_ids.shape[1])
    return _by_k(rank, y, is_novel_class, ks)


def top5(scores, y, is_novel_class):
    """The paper's metric alone: (top-5 over all test images, over novel-class ones)."""
    acc = accuracies(scores, y, is_novel_class, ks=(5,))
    return acc["top5"], acc["top5_novel"]


def _by_k(rank, y, is_novel_class, ks):
    out = {}
    for k in ks:
        if int(k) != k or k < 1:
            raise InputError("top-k accuracy: k = %r must be a positive integer" % (k,))
        out["top%d" % k], out["top%d_novel" % k] = _accuracies(rank < k, y, is_novel_class)
    return out


def _accuracies(ok, y, is_novel_class):
    """Mean of ``ok`` (one bool per test image) over all images and over novel-class ones."""
    nov = np.asarray(is_novel_class, dtype=bool)[np.asarray(y, dtype=np.int64)]
    acc_all = float(ok.mean()) if ok.size else float("nan")
    acc_novel = float(ok[nov].mean()) if nov.any() else float("nan")
    return acc_all, acc_novel


def topk(scores, k=5):
    """The k best classes of each row, ties to the lowest class id.

    Parameters
    ----------
    scores : ndarray, float (n, C)
    k : int

    Returns
    -------
    values : ndarray (n, min(k, C)), same dtype as scores, decreasing along a row
    ids : ndarray, int64 (n, min(k, C))
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InputError("scores have shape %s, expected (n, C)" % (scores.shape,))
    n, C = scores.shape
    k = min(k, C)
    ids = np.empty((n, k), dtype=np.int64)
    for i0 in range(0, n, _CHUNK):
        S = scores[i0:i0 + _CHUNK]
        # a stable sort of the negated scores keeps equal scores in increasing class id
        ids[i0:i0 + S.shape[0]] = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def format_accuracies(acc):
    """The one-line form the logs print: ``top-1 0.480 (0.300 on novel), top-5 0.700 (0.565 on
    novel)``, for the k present in ``acc`` (a dict of :func:`accuracies`)."""
    ks = sorted(int(m[3:]) for m in acc if m.startswith("top") and not m.endswith("_novel"))
    return ", ".join("top-%d %.3f (%.3f on novel)" % (k, acc["top%d" % k], acc["top%d_novel" % k])
                     for k in ks)
