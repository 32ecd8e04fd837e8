"""lowshot-diffusion: low-shot learning with large-scale diffusion (Douze et al., CVPR'18), in Python 3.

The Python API (:mod:`lowshot.api`), loaded on first use so that ``import lowshot`` stays light and
changes no global state:

- :class:`LabelDiffusion`: the paper's method as a scikit-learn estimator (``fit(X, y)``, ``y == -1``
  for unlabelled rows, optional ``background``; ``predict``, ``predict_proba``, ``transduction_``);
- :func:`knn_graph`: the k-NN graph of a matrix (exact, or IVF at scale), a :class:`KnnGraph` that is
  saved to and loaded from the published ``.int32`` / ``.float32`` layout.

The stage scripts at the top of the repository (``build_graph.py``, ``diffusion.py``, ...) run the same
engine over the ``$DDIR`` file layout; see the README.
"""
__all__ = ["LabelDiffusion", "KnnGraph", "knn_graph"]


def __getattr__(name):
    if name in __all__:
        from lowshot import api
        return getattr(api, name)
    raise AttributeError("module 'lowshot' has no attribute %r" % name)


def __dir__():
    return sorted(list(globals()) + __all__)
