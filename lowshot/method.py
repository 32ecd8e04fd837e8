"""The method in one place: each variant's graph operator, initial label matrix and step.

Notation: ``I`` (n, k) the neighbours of every node (a node is its own first neighbour in exact
tables; -1: none), ``D`` (n, k) their cosine similarities; ``W0`` the directed k-NN graph with edge
weights ``w(D)``; ``Y`` (n, C) one-hot rows of the labelled nodes; ``L_t`` (n, C) the label matrix;
``T`` (nt, n) binary, the k graph neighbours of each image to score. Every variant scores by one hop,
as the 2018 code: ``scores_t = T out(L_t)``.

=============  =====================================================  ==========  =====================================
variant        operator A                                             L_0         L_{t+1} = post(A L_t); out(L)
=============  =====================================================  ==========  =====================================
douze18        rownorm(W0 + W0^T) (the paper; 2018 code)               colnorm(Y)  colnorm(A L_t); out = L
spreading      D^-1/2 (W0 - diag W0) D^-1/2, D the in-degrees          Y           alpha A L_t + (1 - alpha) Y;
               (Zhou et al. 2004 as scikit-learn's LabelSpreading)                 out = rownorm(L)
propagation    rownorm(W0) (Zhu and Ghahramani 2002 as scikit-learn's  Y           rownorm(A L_t), labelled rows reset
               LabelPropagation: hard clamping)                                    to Y; out = L
poisson        D^-1 W, W = sym(W0) - diag, D = rowsum(W) (Calder et    0           A L_t + D^-1 B, B = Y - the mean of
               al. 2020, graphlearning's gradient-descent solver)                  Y's labelled rows (on those rows)
=============  =====================================================  ==========  =====================================

colnorm / rownorm scale columns / rows to sum 1 (zero ones stay zero). sym(W0) is graphlearning's:
``max(W0, W0^T)`` for binary weights, ``(W0 + W0^T) / 2`` otherwise. Edge weights ``w``: ``binary`` (1,
the paper), ``similarity`` (``max(D, 0)^power``), ``gaussian`` (``exp(-4 |xi - xj|^2 / d_k(xi)^2)`` with
``|xi - xj|^2 = 2 - 2 D`` for unit vectors and ``d_k(xi)`` the distance to the row's last neighbour:
graphlearning's self-tuned kernel).

Classes never interact: a column of L only depends on its own column of Y. The row sums that
spreading's ``out`` and propagation's ``rownorm`` divide by do not depend on the classes either (by
linearity they are the same iteration applied to the labelled nodes' indicator), so each class block
carries that one extra column, and class blocks (``lslice``) and job-array slices (``class_range``)
give the result of one full run.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lowshot.common import InputError

VARIANTS = ("douze18", "spreading", "propagation", "poisson")
WEIGHTS = ("binary", "similarity", "gaussian")
# scikit-learn LabelSpreading's clamping factor
DEFAULT_ALPHA = 0.2
# cosine similarity to this power (Iscen et al., CVPR'17, weight their k-NN diffusion graph by s^3)
DEFAULT_POWER = 3.0
# iterations without --niter, per variant: douze18's come from the 2018 table (lowshot.diffuse); the
# others use their reference implementation's defaults (scikit-learn max_iter 30 and 1000 with tol
# 1e-3; graphlearning's Poisson gradient descent runs at least 50)
DEFAULT_NITER = {"spreading": 30, "propagation": 1000, "poisson": 50}
DEFAULT_TOL = {"spreading": 1e-3, "propagation": 1e-3, "poisson": None}


@dataclass(frozen=True)
class Method:
    """A variant and its parameters (the flags ``--variant --weights --alpha --power --tol``).

    ``tol``: stop a class block once the L1 change of L over an iteration falls below it (the later
    iterations' scores are the last ones); None: always ``niter`` iterations. With every class in one
    block, as scikit-learn stops."""
    variant: str = "douze18"
    weights: str = "binary"
    alpha: float = DEFAULT_ALPHA
    power: float = DEFAULT_POWER
    tol: Optional[float] = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise InputError("variant %r: one of %s" % (self.variant, ", ".join(VARIANTS)))
        if self.weights not in WEIGHTS:
            raise InputError("weights %r: one of %s" % (self.weights, ", ".join(WEIGHTS)))
        if not 0 < self.alpha < 1:
            raise InputError("alpha %r: must lie in (0, 1)" % (self.alpha,))
        if not self.power > 0:
            raise InputError("power %r: must be > 0" % (self.power,))
        if self.tol is not None and not self.tol >= 0:
            raise InputError("tol %r: must be >= 0 (or None)" % (self.tol,))

    def record(self):
        """What results files record: the variant, its weights and the parameters that apply."""
        rec = {"variant": self.variant, "weights": self.weights}
        if self.variant == "spreading":
            rec["alpha"] = self.alpha
        if self.weights == "similarity":
            rec["power"] = self.power
        if self.tol is not None:
            rec["tol"] = self.tol
        return rec


DOUZE18 = Method()


def edge_weights(D, weights, power=DEFAULT_POWER):
    """The (n, k) float32 weights of a k-NN table's edges (None for binary)."""
    if weights == "binary":
        return None
    D = np.asarray(D, dtype=np.float32)
    if weights == "similarity":
        return np.power(np.maximum(D, 0), np.float32(power))
    d2 = np.maximum(2 - 2 * D, 0)
    eps = d2[:, -1:]
    return np.exp(-4 * d2 / np.where(eps > 0, eps, 1)).astype(np.float32)


class Operator:
    """A variant's operator ``A`` (graph_utils.CSR (n, n)) with what its step needs (the degrees of
    Poisson's source term)."""

    def __init__(self, A, method=DOUZE18, degree=None):
        self.A, self.method, self.degree = A, method, degree
        self.shape, self.nnz = A.shape, A.nnz

    def permuted(self, perm):
        """The operator of the renumbered graph (new node i = old node perm[i])."""
        import graph_utils
        return Operator(graph_utils.permute(self.A, perm), self.method,
                        None if self.degree is None else self.degree[perm])


def build_operator(I, n, method=DOUZE18, D=None):
    """The variant's operator over the n nodes of the k-NN table I (similarities D for weights)."""
    import graph_utils
    import scipy.sparse as sp
    if method.variant == "douze18" and method.weights == "binary":
        return Operator(graph_utils.knn_to_graph(I, n), method)
    if method.weights != "binary" and D is None:
        raise ValueError("%s weights need the similarities D of the k-NN table" % method.weights)
    W0 = graph_utils.csr_from_knn(I, n, edge_weights(D, method.weights, method.power)).to_scipy().astype(np.float64)
    W0.sum_duplicates()
    degree = None
    if method.variant == "douze18":
        A = _scale_rows(W0 + W0.T)
    elif method.variant == "propagation":
        A = _scale_rows(W0)
    elif method.variant == "spreading":
        W0.setdiag(0)
        W0.eliminate_zeros()
        d = np.asarray(W0.sum(axis=0)).ravel()
        s = 1 / np.sqrt(np.where(d > 0, d, 1))
        A = sp.diags(s) @ W0 @ sp.diags(s)
    else:
        W = W0.maximum(W0.T) if method.weights == "binary" else (W0 + W0.T) / 2
        W.setdiag(0)
        W.eliminate_zeros()
        degree = np.asarray(W.sum(axis=1)).ravel()
        A = _scale_rows(W)
    A = sp.csr_matrix(A)
    A.sort_indices()
    return Operator(graph_utils.CSR.from_scipy(A), method, degree)


def _scale_rows(M):
    s = np.asarray(M.sum(axis=1)).ravel()
    import scipy.sparse as sp
    return sp.diags(np.where(s > 0, 1 / np.where(s > 0, s, 1), 0)) @ M


class Block:
    """The step of one class block [b0, b1) on a backend (``ops``: lowshot.diffuse._GraphUtilsOps or
    lowshot.torch_backend.TorchDiffusionOps): ``start``, ``step``, ``out`` as in the module's table."""

    def __init__(self, op, ops, y_lab, lab_nodes, b0, b1):
        self.op, self.ops, self.m = op, ops, op.method
        y_lab = np.asarray(y_lab, dtype=np.int64)
        lab_nodes = np.asarray(lab_nodes, dtype=np.int64)
        sel = (y_lab >= b0) & (y_lab < b1)
        self.c = b1 - b0
        self.rows, self.cols = ops.const(lab_nodes[sel]), ops.const(y_lab[sel] - b0)
        self.lab = ops.const(lab_nodes)
        indicator = np.zeros((op.shape[0], 1), dtype=np.float32)
        indicator[lab_nodes] = 1
        self.indicator = ops.const(indicator)
        self.mass = self.indicator          # spreading: row sums of L; propagation: rows reached
        self.one = ops.const(np.ones((1, 1), dtype=np.float32))
        if self.m.variant == "poisson":
            onehot = np.zeros((len(y_lab), self.c), dtype=np.float32)
            onehot[np.flatnonzero(sel), y_lab[sel] - b0] = 1
            mean = np.bincount(y_lab, minlength=b1)[b0:b1] / max(1, len(y_lab))
            B = (onehot - mean[None, :]) / op.degree[lab_nodes][:, None]
            self.source = ops.const(B.astype(np.float32))

    def start(self, buf):
        """L_0 in ``buf`` (n, c) float32 numpy (None: a new array), then on the backend."""
        if buf is None:
            buf = np.zeros((self.op.shape[0], self.c), dtype=np.float32)
        buf[:] = 0
        if self.m.variant != "poisson":
            buf[self.ops.numpy(self.rows), self.ops.numpy(self.cols)] = 1
        L = self.ops.start(buf)
        return self.ops.colnorm(L) if self.m.variant == "douze18" else L

    def step(self, L):
        """L_{t+1} from L_t (a new array; L_t stays valid)."""
        v, ops = self.m.variant, self.ops
        P = ops.product(L)
        if v == "douze18":
            return ops.colnorm(P)
        if v == "spreading":
            a = self.m.alpha
            P *= a
            P[self.rows, self.cols] += 1 - a
            self.mass = ops.product_new(self.mass) * a + self.indicator * (1 - a)
        elif v == "propagation":
            s = ops.product_new(self.mass)
            P *= _inverse(s)
            P[self.lab] = 0
            P[self.rows, self.cols] = 1
            self.mass = (s + self.indicator > 0) * self.one      # the rows reached (sum 1 after rownorm)
        else:
            P[self.lab] += self.source
        return P

    def out(self, L):
        """What is scored and stored: rownorm(L) for spreading, L itself otherwise."""
        if self.m.variant == "spreading":
            return L * _inverse(self.mass)
        return L


def _inverse(s):
    """1 / s where s > 0, else 0 (numpy or torch (n, 1))."""
    return (s > 0) / (s + (s <= 0))
