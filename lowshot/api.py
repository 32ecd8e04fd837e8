"""The Python API: k-NN graphs and the paper's label diffusion as a scikit-learn estimator.

    from lowshot import LabelDiffusion, knn_graph
    clf = LabelDiffusion(k=30).fit(X, y)            # y == -1 marks the unlabelled rows
    clf.transduction_                               # a label for every row of X
    clf.predict_proba(X_new)                        # new rows, scored by one hop (as in 2018)
    g = knn_graph(background, k=30)                 # a reusable graph of a large unlabelled set
    clf.fit(X, y, background=background, background_graph=g)

Both run the engine of the scripts: :func:`knn_graph` is ``build_graph.py``'s
:func:`lowshot.graph.build_background_graph` (exact search up to 50k rows on CPU, the resumable IVF
build above, torch or faiss-gpu on GPUs), and :meth:`LabelDiffusion.fit` is ``diffusion.py``'s graph
completion (:func:`lowshot.completion.complete_graph`) and diffusion
(:func:`lowshot.diffuse.diffuse_knn`). Given the same vectors, the same labelled rows and the same
background, ``predict_proba`` is ``diffusion.py --storeL``'s test scores scaled to sum 1 per row.

Graph nodes (the completion's sets, :mod:`lowshot.graph`): set 0, searched exactly, holds the labelled
rows of X and, when they are few (up to ``EXACT_ROWS`` rows of X without a background) or when a
background is given, X's unlabelled rows too (the paper's "in-domain" images); set 1 is the
background, or X's unlabelled rows when X is large and no background is given, whose graph comes
from :func:`knn_graph`. Put a large unlabelled collection in ``background`` (an array or a
memory-mapped file larger than RAM): set 0's exact search costs ``len(set 0)^2`` products.

Progress goes to the ``lowshot`` logger (``logging.basicConfig(level=logging.INFO)`` shows it);
importing the package changes no global state (threads, OpenMP, logging). ``device`` selects the
backend (:func:`lowshot.torch_backend.select`) that ``fit`` or :func:`knn_graph` passes down.

A little over 400 lines: the API is kept in one module, the page a user reads with ``help``.
"""
import shutil
import tempfile
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from lowshot.common import atomic_output, library_logging, logger

log = logger(__name__)

# Without a background, X is searched exactly as a whole up to this many rows (about 2 s on 2 cores);
# above, its unlabelled rows get a graph of their own (knn_graph: IVF) and only the labelled rows are
# searched exactly
EXACT_ROWS = 50000


def _from_torch(X):
    """A torch tensor as numpy (a view of a CPU tensor, a copy of a GPU one); anything else as is."""
    if type(X).__module__.split(".")[0] == "torch":
        return X.detach().cpu().numpy()
    return X


def _rows(X, name, d=None):
    """X as an (n, d) numpy array or memmap: torch tensors are viewed (CPU) or copied (GPU), in-RAM
    arrays of another float type are cast to float32, memory maps must already be float32."""
    X = _from_torch(X)
    if not isinstance(X, np.ndarray):
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError("%s must be 2-D (rows, dimensions), got shape %s" % (name, X.shape))
    if X.dtype.kind not in "fiu":
        raise TypeError("%s must hold real numbers, got dtype %s" % (name, X.dtype))
    if d is not None and X.shape[1] != d:
        raise ValueError("%s has %d columns, X has %d: they must be vectors of the same space" % (
            name, X.shape[1], d))
    if isinstance(X, np.memmap):
        if X.dtype != np.float32:
            raise TypeError("%s is a memory map of %s: float32 rows are expected (the published "
                            "raw layout)" % (name, X.dtype))
        return X
    return np.ascontiguousarray(X, dtype=np.float32)


def _zero_rows_warning(X, name):
    zero = int((~X.any(axis=1)).sum())
    if zero:
        warnings.warn("%s has %d row(s) that are all zeros: they have no direction, so their cosine "
                      "similarity to every row is 0 and their neighbours are arbitrary" % (name, zero),
                      stacklevel=3)


class KnnGraph:
    """The k-NN graph of the rows of a matrix, as :func:`knn_graph` builds it and ``build_graph.py``
    stores it.

    Attributes
    ----------
    I : ndarray or memmap, int32 (n, K)
        Neighbour ids, most similar first (-1: none); a row is its own first neighbour in exact graphs.
    D : ndarray or memmap, float32 (n, K)
        Inner products of the L2-normalised rows, decreasing.
    index : faiss.Index or None
        The index over the normalised rows, which searches new rows (:class:`LabelDiffusion` needs it).
    method : str
        ``exact``, ``ivf``, ``hnsw`` or ``nndescent`` (:mod:`lowshot.graph`).
    k : int
        Neighbours asked for; ``K = I.shape[1]`` is the next power of two, what ``build_graph.py`` stores.
    recall : float or None
        recall@10 against exact search on a sample of rows (approximate methods; None when not measured).
    stats : dict
        How it was built (times, IVF parameters).
    """

    def __init__(self, I, D, index, method, k, recall=None, stats=None):
        self.I, self.D, self.index, self.method, self.k = I, D, index, method, k
        self.recall, self.stats = recall, dict(stats or {})

    @property
    def n(self):
        """Rows (graph nodes)."""
        return self.I.shape[0]

    @property
    def K(self):
        """Stored neighbours per row."""
        return self.I.shape[1]

    def save(self, ddir):
        """Write the published layout under the data root ``ddir``: ``knngraph/ndis{n}.index``,
        ``knngraph/ndis{n}_k{K}_I_11.int32`` and ``_D_11.float32`` (raw row-major), each atomically.
        ``diffusion.py --nbg n`` reads them. Returns the paths."""
        import faiss
        from lowshot import stored_graph
        paths = stored_graph.graph_paths(ddir, self.n, self.K)
        for key, arr, dtype in (("I", self.I, np.int32), ("D", self.D, np.float32)):
            with atomic_output(paths[key]) as tmp:
                np.ascontiguousarray(arr, dtype=dtype).tofile(tmp)
        if self.index is not None:
            with atomic_output(paths["index"]) as tmp:
                faiss.write_index(_cpu_index(self.index), tmp)
        return {key: paths[key] for key in ("index", "I", "D")}

    @classmethod
    def load(cls, ddir, n, k=30):
        """The stored graph of ``n`` rows usable for ``k`` neighbours under the data root ``ddir``
        (any stored K >= k; the 2018 ``.npy`` and ``.int32`` names too), tables memory-mapped."""
        from lowshot import stored_graph
        index_path, D, I = stored_graph.find_background_graph(ddir, n, k)
        with library_logging():
            index = stored_graph.read_background_index(index_path, n, None)
        import faiss
        method = "exact" if isinstance(faiss.downcast_index(_cpu_index(index)), faiss.IndexFlat) else "stored"
        return cls(I, D, index, method, k)

    def __getstate__(self):
        """Pickles hold the index serialised by faiss (its SWIG object is not picklable)."""
        import faiss
        state = dict(self.__dict__)
        if self.index is not None:
            state["index"] = faiss.serialize_index(_cpu_index(self.index))
        return state

    def __setstate__(self, state):
        import faiss
        if state.get("index") is not None:
            state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update(state)

    def __repr__(self):
        return "KnnGraph(n=%d, K=%d, method=%s%s)" % (
            self.n, self.K, self.method, "" if self.recall is None else ", recall@10=%.4f" % self.recall)


def _cpu_index(index):
    import faiss
    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex) \
        else index


def knn_graph(X, k=30, method="auto", device="auto", path=None, recall_nq=1000):
    """The k-NN graph of the rows of X (cosine similarity), built as ``build_graph.py`` builds it.

    Parameters
    ----------
    X : array-like (n, d): numpy array (float32 or float64), torch tensor, or a read-only float32
        ``np.memmap`` larger than RAM (read block by block)
    k : int, default=30
        Neighbours per row; K, the next power of two, are stored (32 for 30).
    method : {"auto", "exact", "ivf", "hnsw", "nndescent"}, default="auto"
        auto: exact search up to 50k rows on CPU (1M with GPUs), IVF above (resumable on CPU).
    device : {"auto", "cpu", "cuda", "torch-cpu"}, default="auto"
        The backend (:func:`lowshot.torch_backend.select`): auto uses a GPU when torch or faiss sees one.
    path : str or None
        A data root: the graph is written there in the published layout (:meth:`KnnGraph.save`), an
        interrupted IVF build continues from its work folder, and the tables are memory-mapped.
        None: a temporary folder, removed once the tables are read into memory.
    recall_nq : int
        Sampled rows for the recall@10 of an approximate graph (0: not measured).

    Returns
    -------
    KnnGraph
    """
    from lowshot import graph, stored_graph, torch_backend
    X = _rows(X, "X")
    n, d = X.shape
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError("k must be a positive integer, got %r" % (k,))
    methods = ("auto",) + graph.METHODS
    if method not in methods:
        raise ValueError("method must be one of %s, got %r" % (", ".join(methods), method))
    K = stored_graph.graph_K(k)
    if K > n:
        raise ValueError("k = %d needs K = %d stored neighbours but X has only %d rows" % (k, K, n))
    if not isinstance(X, np.memmap):
        _zero_rows_warning(X, "X")
    with library_logging():
        backend = torch_backend.select(device)
        folder = path if path is not None else tempfile.mkdtemp(prefix="lowshot-knn-")
        try:
            paths = stored_graph.graph_paths(folder, n, K)
            stats = graph.build_background_graph(X, K, paths, method=None if method == "auto" else method,
                                                 backend=backend)
            index = stored_graph.read_background_index(paths["index"], n, d, backend=backend)
            if path is None:
                I = np.fromfile(paths["I"], dtype=np.int32).reshape(n, K)
                D = np.fromfile(paths["D"], dtype=np.float32).reshape(n, K)
            else:
                I = np.memmap(paths["I"], dtype=np.int32, mode="r", shape=(n, K))
                D = np.memmap(paths["D"], dtype=np.float32, mode="r", shape=(n, K))
        finally:
            if path is None:
                shutil.rmtree(folder, ignore_errors=True)
        recall = None
        if stats["method"] != "exact" and recall_nq:
            recall = graph.graph_recall(X, I, nq=recall_nq, backend=backend)
            log("graph recall@10 = %.4f (%d sampled rows, exact search)" % (recall, min(recall_nq, n)))
    return KnnGraph(I, D, index, stats["method"], k, recall=recall, stats=stats)


class LabelDiffusion(ClassifierMixin, BaseEstimator):
    """Label diffusion over a k-NN graph (Douze, Szlam, Hariharan, Jegou, CVPR'18).

    Every row of X (and of an optional ``background``) is a graph node linked to its ``k`` most
    similar nodes by cosine similarity; ``W`` is the row-normalised ``W0 + W0^T`` of the binary k-NN
    graph. The labels start as one-hot rows of the labelled nodes, each class' column normalised to
    sum 1; each iteration is ``L <- colnorm(W L)`` (no clamping: labelled rows change too). After
    ``niter`` iterations a row of X gets the class of its largest entry of L, and a new row the class
    with the most mass on its ``k`` neighbours among the nodes (one hop, as the 2018 code scores test
    images). ``variant`` runs the classic alternatives on the same graph and the same one-hop scoring
    (their formulas: :mod:`lowshot.method`).

    Parameters
    ----------
    k : int, default=30
        Neighbours per node (the paper's k).
    niter : int or None, default=None
        Diffusion iterations. None: for douze18, the count the 2018 code validated (k = 30, every
        class with the same number n in {1, 2, 5, 10, 20} of labelled rows, and 0, 1e5, 1e6, 1e7 or
        1e8 unlabelled rows: e.g. 3 at n = 2 with 1e6), else 3; for the other variants their reference
        implementation's default (spreading 30, propagation 1000, poisson 50). The value used is
        ``niter_``.
    variant : {"douze18", "spreading", "propagation", "poisson"}, default="douze18"
        douze18: the paper's; spreading: Zhou et al. 2004 (scikit-learn's ``LabelSpreading``);
        propagation: Zhu and Ghahramani 2002, hard clamping (scikit-learn's ``LabelPropagation``);
        poisson: Calder et al. 2020 (graphlearning's ``ssl.poisson``).
    weights : {"binary", "similarity", "gaussian"}, default="binary"
        Edge weights: 1 (the paper), cosine similarity to the power ``power``, or graphlearning's
        Gaussian self-tuned by each node's k-th neighbour.
    alpha : float, default=0.2
        spreading: ``L <- alpha A L + (1 - alpha) Y``, in (0, 1).
    power : float, default=3.0
        similarity weights: the power of the cosine.
    tol : float, None or "auto", default="auto"
        Stop once an iteration changes L by less than this (L1 over every entry); None: always
        ``niter`` iterations; auto: scikit-learn's 1e-3 for spreading and propagation, None otherwise.
    device : {"auto", "cpu", "cuda", "torch-cpu"}, default="auto"
        auto: torch on CUDA when torch sees a GPU (faiss-gpu for faiss' searches when faiss sees one),
        else graph_utils' C++ kernels; cpu: graph_utils only; torch-cpu: the torch code on the CPU.
    graph_method : {"auto", "exact", "ivf", "hnsw"}, default="auto"
        How the graph of the unlabelled set is built when it is not given (:func:`knn_graph`).
    lslice : int or None, default=None
        Classes diffused at a time (None: automatic, within 4 GiB; same result, less memory).

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
        The labels seen in ``y`` (``-1`` excluded), sorted.
    transduction_ : ndarray (n_samples,)
        The label of every row of X after the diffusion (labelled rows included: they are not clamped).
    label_distributions_ : ndarray float32 (n_samples, n_classes)
        Each row's diffused label mass scaled to sum 1 (rows the diffusion did not reach: uniform).
    niter_ : int
        Iterations run.
    n_features_in_ : int
    graph_info_ : dict
        Nodes, W's entries, the searches used, recalls of approximate ones, times.
    background_graph_ : KnnGraph or None
        The graph of the unlabelled set (given or built).

    Notes
    -----
    scikit-learn's ``check_estimator`` passes (tests/test_api.py) except one check that cannot
    apply: ``check_classifiers_classes`` fits a binary problem labelled -1 and 1, and ``-1`` marks an
    unlabelled row here (scikit-learn's semi-supervised convention), so ``classes_`` is ``[1]``.
    With fewer nodes than ``k + 1`` (tiny data), k is reduced to the number of nodes - 1, with a
    warning.

    Examples
    --------
    >>> clf = LabelDiffusion(k=10).fit(X, y)        # doctest: +SKIP
    >>> clf.predict(X_new)                           # doctest: +SKIP
    """

    def __init__(self, k=30, niter=None, variant="douze18", weights="binary", alpha=0.2, power=3.0, tol="auto",
                 device="auto", graph_method="auto", lslice=None):
        self.k = k
        self.niter = niter
        self.variant = variant
        self.weights = weights
        self.alpha = alpha
        self.power = power
        self.tol = tol
        self.device = device
        self.graph_method = graph_method
        self.lslice = lslice

    def _check_params(self):
        from lowshot import torch_backend
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError("k must be a positive integer, got %r" % (self.k,))
        if self.niter is not None and (not isinstance(self.niter, (int, np.integer)) or self.niter < 0):
            raise ValueError("niter must be None or an integer >= 0, got %r" % (self.niter,))
        if self.device not in torch_backend.DEVICES:
            raise ValueError("device must be one of %s, got %r" % (", ".join(torch_backend.DEVICES), self.device))
        if self.graph_method not in ("auto", "exact", "ivf", "hnsw"):
            raise ValueError("graph_method must be auto, exact, ivf or hnsw, got %r" % (self.graph_method,))
        if self.lslice is not None and (not isinstance(self.lslice, (int, np.integer)) or self.lslice < 0):
            raise ValueError("lslice must be None or an integer >= 0, got %r" % (self.lslice,))
        from lowshot import method
        if self.variant not in method.VARIANTS:
            raise ValueError("variant must be one of %s, got %r" % (", ".join(method.VARIANTS), self.variant))
        tol = method.DEFAULT_TOL.get(self.variant) if isinstance(self.tol, str) and self.tol == "auto" else self.tol
        try:
            return method.Method(self.variant, self.weights, float(self.alpha), float(self.power),
                                 None if tol is None else float(tol))
        except (TypeError, ValueError) as e:
            raise ValueError(str(e))

    def fit(self, X, y, background=None, background_graph=None):
        """Build the graph over X's rows (and the background), diffuse the labels of the rows whose
        ``y`` is not -1.

        Parameters
        ----------
        X : array-like (n_samples, n_features): numpy (float32 or float64) or a torch tensor
        y : array-like (n_samples,); -1 marks an unlabelled row
        background : array-like (n_background, n_features) or None
            More unlabelled rows (the paper's F1M..F100M): an array, a torch tensor, or a float32
            ``np.memmap`` larger than RAM. Nodes of the graph; no output row of their own.
        background_graph : KnnGraph or None
            The background's graph from :func:`knn_graph` (reused across fits); None: built here.

        Returns
        -------
        self
        """
        from lowshot import diffuse, search, torch_backend
        m = self._check_params()
        X, labelled, y_lab, background = self._validate(X, y, background, background_graph)
        rows = np.concatenate([np.flatnonzero(labelled), np.flatnonzero(~labelled)])   # node order
        nl, n_X = int(labelled.sum()), len(X)
        if background is None and n_X > EXACT_ROWS and n_X - nl > self.k:
            set1 = X[rows[nl:]]          # X's unlabelled rows: a graph of their own
            n0 = nl
        else:
            set1, n0 = background, n_X
        nodes = n0 + (0 if set1 is None else len(set1))
        k = int(self.k)
        if k >= nodes:
            warnings.warn("k = %d but the graph has only %d nodes: k = %d is used" % (k, nodes, nodes - 1),
                          stacklevel=2)
            k = nodes - 1
        with library_logging():
            self._backend = torch_backend.select(self.device)
            x0 = search.normalized(X[rows[:n0]], "X")
            g = background_graph if set1 is background else None
            I_nodes, D_nodes, info = self._graph(x0, set1, g, k, m.weights != "binary")
            self.niter_ = self.niter
            if self.niter_ is None:
                counts = np.bincount(y_lab)
                self.niter_, _ = diffuse.default_niter(nodes - nl, int(counts[0]) if (counts == counts[0]).all()
                                                       else -1, k, m.variant)
            _, L, dinfo = diffuse.diffuse_knn(I_nodes, np.zeros((0, k), np.int32), y_lab, len(self.classes_),
                                              self.niter_, lslice=self.lslice, keep_L=True, method=m,
                                              D_nodes=D_nodes, backend=self._backend)
        self.graph_info_ = dict(info, **dinfo)
        self._x0, self._k, self._L = x0, k, L
        dist = np.empty((n_X, L.shape[1]), dtype=np.float32)
        dist[rows] = L[:n_X]
        self.label_distributions_ = _rows_to_proba(dist)
        self.transduction_ = self.classes_[np.argmax(self.label_distributions_, axis=1)]
        return self

    def _validate(self, X, y, background, background_graph):
        """X float32 (n, d), which rows are labelled, their labels as ids into ``classes_`` (set
        here), the background as an (nbg, d) array or memmap (or None)."""
        X, y = validate_data(self, _from_torch(X), _from_torch(y), dtype=np.float32, order="C",
                             ensure_min_samples=2)
        check_classification_targets(y)
        labelled = ~(y == -1) if y.dtype.kind in "iuf" else np.ones(len(y), dtype=bool)
        if not labelled.any():
            raise ValueError("y has no labelled row: every entry is -1 (unlabelled)")
        self.classes_, y_lab = np.unique(y[labelled], return_inverse=True)
        _zero_rows_warning(X, "X")
        if background is not None:
            background = _rows(background, "background", X.shape[1])
            if not isinstance(background, np.memmap):
                _zero_rows_warning(background, "background")
        elif background_graph is not None:
            raise ValueError("background_graph is given without its background")
        return X, labelled, y_lab, background

    def _graph(self, x0, set1, g, k, with_D):
        """The k-NN graph over set 0 (``x0``, normalised) and set 1 (``set1`` or None; its graph
        ``g``, built here when None): I_nodes int32 (nodes, k), D_nodes float32 (nodes, k) or None
        (``with_D``: weights other than binary), the completion's info. Sets
        ``background_graph_``."""
        from lowshot import completion
        bg = None
        if set1 is not None:
            if g is None:
                g = knn_graph(set1, k, method=self.graph_method, device=self.device)
            elif g.n != len(set1) or g.K < k or g.index is None:
                raise ValueError("background_graph (%r, index %s) does not fit the background of %d rows "
                                 "and k = %d" % (g, "kept" if g.index is not None else "missing", len(set1), k))
            bg = completion.Background(set1, g.index, g.D, g.I, exact_index=g.method == "exact")
        self.background_graph_ = g
        nodes = len(x0) + (0 if set1 is None else len(set1))
        D_nodes = np.empty((nodes, k), dtype=np.float32) if with_D else None
        I_nodes, _, info = completion.complete_graph(x0, np.zeros((0, x0.shape[1]), np.float32), k, bg,
                                                     D_out=D_nodes, backend=self._backend)
        return I_nodes, D_nodes, info

    def _scores(self, X):
        """Diffused mass on the k neighbours of each new row, (n, n_classes) float32."""
        import graph_utils
        from lowshot import completion, search
        check_is_fitted(self)
        X = validate_data(self, _from_torch(X), dtype=np.float32, order="C", reset=False)
        _zero_rows_warning(X, "X")
        with library_logging():
            g = self.background_graph_
            I = completion.search_nodes(search.normalized(X, "X"), self._x0, self._k, g and g.index,
                                        backend=self._backend)
        T = graph_utils.csr_from_knn(I, self._L.shape[0])
        return graph_utils.spmm(T, self._L)

    def predict_proba(self, X):
        """Class probabilities of new rows: the diffused mass on their k neighbours among the graph's
        nodes, scaled to sum 1 (uniform where no neighbour holds any).

        Parameters
        ----------
        X : array-like (n, n_features)

        Returns
        -------
        ndarray float64 (n, n_classes), columns in the order of ``classes_``
        """
        return _rows_to_proba(self._scores(X)).astype(np.float64)

    def predict(self, X):
        """The class with the most diffused mass on each new row's k neighbours (ties: the first of
        ``classes_``)."""
        S = self._scores(X)
        return self.classes_[np.argmax(S, axis=1)]


def _rows_to_proba(S):
    """Rows scaled to sum 1; all-zero rows become uniform. Rows with negative scores (Poisson
    learning's) are first shifted to a minimum of 0: an order of the classes, not calibrated
    probabilities."""
    S = np.asarray(S, dtype=np.float32)
    if (S < 0).any():
        S = S - S.min(axis=1, keepdims=True)
    s = S.sum(axis=1, keepdims=True)
    out = np.where(s > 0, S / np.where(s > 0, s, 1), np.float32(1.0 / max(1, S.shape[1])))
    return out.astype(np.float32)
