"""The torch backend: k-NN scans and the diffusion's sparse products on a CUDA GPU through torch
(no faiss-gpu needed), and the same code on torch CPU tensors, which is how CI tests it.

Which code runs is a :class:`Backend`, chosen by :func:`select` (the scripts' ``--device``) and
passed down to the functions that scan or diffuse (:data:`CPU`, graph_utils, when none is given):

  auto       torch on CUDA when torch sees a GPU, else the CPU kernels of graph_utils; and faiss-gpu,
             when faiss sees a GPU, for faiss' own index searches (the GPU paths of graph.py)
  cpu        graph_utils (bf16/float32 scans, hand-written sparse products), faiss on the CPU
  cuda       torch on the GPU (an error when torch sees none), faiss on the CPU
  torch-cpu  the torch code on CPU tensors (tests; comparisons against graph_utils)

Scans (:class:`TorchKnnScan`, the interface of ``graph_utils.KnnScan``): float32 products with
TF32 off, so every kept similarity is an exact float32 inner product; each query keeps its best
candidates by (score, then lower id) through one int64 key per candidate (order-preserving bits of
the score, then the inverted id), so ties are broken as graph_utils does. Diffusion
(:class:`TorchDiffusionOps`): W and T as ``torch.sparse_csr_tensor`` (cuSPARSE on CUDA), the
(n, lslice) label blocks on the device, column normalisation in torch.
"""
import dataclasses
import importlib.util
import os
import re
import sys
import warnings

import numpy as np

from lowshot.common import InputError, logger

log = logger(__name__)

DEVICES = ("auto", "cpu", "cuda", "torch-cpu")
# memory of one block of TorchKnnScan.add: (rows x candidates) pairs x BYTES_PER_PAIR (scores, their
# concatenation with the kept ones, ids, int64 keys) at most SCAN_BLOCK_BYTES
SCAN_BLOCK_BYTES = {"cuda": 4 * 2**30, "cpu": 512 * 2**20}
BYTES_PER_PAIR = 24


def _torch():
    import torch
    return torch


def torch_sees_cuda():
    """Whether torch sees a GPU, without importing torch where it is a CPU-only build (torch/version.py
    names neither CUDA nor ROCm): importing torch beside graph_utils costs ~1.5 s and brings a second
    OpenMP runtime into the process, which slowed the CPU diffusion's products (measured)."""
    if "torch" not in sys.modules:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return False
        try:
            with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
                text = f.read()
        except OSError:
            text = ""
        builds = re.findall(r"^(cuda|hip)(?::[^=]*)?\s*=\s*(.+)$", text, re.M)
        if builds and all(v.strip() == "None" for _, v in builds):
            return False
    return _torch().cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Backend:
    """Which code does the scans and the diffusion's products (:func:`select`).

    Attributes
    ----------
    device : str or None, the torch device ("cuda" or "cpu"), or None when graph_utils does the work
    why : str, the one-line description logged and written to the results
    faiss_gpus : int, GPUs for faiss' own index searches (the GPU paths of lowshot.graph)
    """
    device: str | None = None
    why: str = "graph_utils on the CPU (default)"
    faiss_gpus: int = 0

    def describe(self):
        return self.why

    def knn_scan(self, Qf, kp, bf16=None, deferred=False, floor=None):
        """A k-NN scan: graph_utils.KnnScan or :class:`TorchKnnScan` (same calls)."""
        if self.device is None:
            import graph_utils
            return graph_utils.KnnScan(Qf, kp, bf16=bf16, deferred=deferred, floor=floor)
        return TorchKnnScan(Qf, kp, floor=floor, device=self.device)

    def bf16_scan(self, d):
        """Whether scans of d-dimensional vectors use bfloat16 products: graph_utils on an
        AVX512-BF16 CPU with d even; never on torch (float32 products, exact)."""
        if self.device is not None:
            return False
        import graph_utils
        return graph_utils.cpu_has_bf16() and d % 2 == 0

    def exact_blocks(self, xb, K, bs, normalize):
        """:func:`exact_blocks` on this backend's torch device (CPU tensors without one)."""
        return exact_blocks(xb, K, bs, normalize, self.device or "cpu")

    def diffusion_ops(self, W, T):
        """:class:`TorchDiffusionOps` on this backend's torch device."""
        return TorchDiffusionOps(W, T, self.device or "cpu")


# graph_utils and faiss on the CPU: the backend of library calls given none
CPU = Backend()


def select(device="auto", faiss_gpus=None):
    """The backend for ``--device`` (or the API's ``device``); logs its one-line description.

    ``faiss_gpus``: GPUs faiss sees (None: ask faiss). With ``auto``, faiss-gpu keeps the GPU work
    it already does (faiss' own index searches) and torch on CUDA, when torch sees a GPU, does the
    scans and products; an explicit ``cuda`` leaves faiss on the CPU. torch is only imported when
    its code is chosen or may be (:func:`torch_sees_cuda`).

    Returns
    -------
    Backend
    """
    if device not in DEVICES:
        raise InputError("device %s: one of %s" % (device, ", ".join(DEVICES)))
    dev, nfaiss = None, 0
    if device == "cuda":
        try:
            torch = _torch()
        except ImportError as e:
            raise InputError("device cuda: torch cannot be imported (%s)" % e)
        if not torch.cuda.is_available():
            raise InputError("device cuda: torch sees no CUDA device (torch %s, built for CUDA %s)"
                             % (torch.__version__, torch.version.cuda))
        dev = "cuda"
    elif device == "torch-cpu":
        dev = "cpu"
    elif device == "auto":
        if faiss_gpus is None:
            import faiss
            faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        nfaiss = faiss_gpus
        if torch_sees_cuda():
            dev = "cuda"
    why = "graph_utils on the CPU"
    if dev is not None:
        torch = _torch()
        torch.backends.cuda.matmul.allow_tf32 = False    # exact float32 products
        torch.backends.cudnn.allow_tf32 = False
        why = "torch on %s" % (torch.cuda.get_device_name(0) if dev == "cuda" else "CPU tensors")
    if nfaiss:
        why += ", faiss-gpu (%d GPUs) for faiss' index searches" % nfaiss
    log("backend: %s (--device %s)" % (why, device))
    return Backend(dev, why, nfaiss)


def _tensor(torch, a, dtype):
    """A CPU tensor over the numpy array ``a`` (no copy when it already has the dtype and is
    contiguous; read-only arrays, e.g. memory maps, are only read)."""
    if torch.is_tensor(a):
        return a
    a = np.ascontiguousarray(a, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "not writable": the tensor is never written
        return torch.from_numpy(a)


def _keys(torch, S, ids):
    """int64 keys ordering (score descending, then id ascending): the score's bits made
    order-preserving in the high half, 2^32 - 1 - id in the low half."""
    b = (S + 0.0).contiguous().view(torch.int32).to(torch.int64)      # + 0.0: -0.0 becomes 0.0
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)           # negative floats: reverse their order
    return (b << 32) | (0xFFFFFFFF - (ids.to(torch.int64) & 0xFFFFFFFF))


class TorchKnnScan:
    """``graph_utils.KnnScan`` in torch: each query keeps its ``kp`` best candidates by exact float32
    score, then lower id, whatever order they arrive in. ``floor``: per query, candidates scoring
    below it are never kept (rows may end with fewer than k). ``uncertain`` is always 0 (every kept
    score is exact)."""

    def __init__(self, Qf, kp, floor=None, device="cpu"):
        torch = _torch()
        self.torch, self.device = torch, torch.device(device)
        Qf = _tensor(torch, Qf, np.float32)
        if Qf.ndim != 2:
            raise ValueError("Qf must be a (n, d) matrix")
        if not 1 <= kp <= 512:
            raise ValueError("kp = %d: need 1 <= kp <= 512 candidates per query" % kp)
        self.kp, self.uncertain = int(kp), 0
        self.Q = Qf.to(self.device)
        n = len(Qf)
        self.S = torch.full((n, self.kp), -float("inf"), dtype=torch.float32, device=self.device)
        self.I = torch.full((n, self.kp), -1, dtype=torch.int32, device=self.device)
        self.floor = None
        if floor is not None:
            floor = np.asarray(floor, dtype=np.float32)
            if floor.shape != (n,) or np.isnan(floor).any():
                raise ValueError("floor must hold one score per query (%d), not NaN" % n)
            self.floor = torch.from_numpy(floor).to(self.device)
        self.block_bytes = SCAN_BLOCK_BYTES[self.device.type]

    def add(self, rows, Xc, ids):
        """Offer candidates ``Xc`` (nc, d) float32 with ids (nc,) to queries ``rows`` (increasing);
        no id may be offered twice to one query (not checked)."""
        torch = self.torch
        nc = len(ids)
        if nc == 0 or len(rows) == 0:
            return
        X = _tensor(torch, Xc, np.float32).to(self.device)
        cid = _tensor(torch, ids, np.int32).to(self.device)
        rows = _tensor(torch, rows, np.int64).to(self.device)
        step = max(1, int(self.block_bytes // (BYTES_PER_PAIR * (nc + self.kp))))
        for r0 in range(0, len(rows), step):
            r = rows[r0:r0 + step]
            S = self.Q[r] @ X.T
            if self.floor is not None:
                S = S.masked_fill(S < self.floor[r, None], -float("inf"))
            I = cid.expand(len(r), nc)
            if nc > self.kp:
                # the block's kp best by score alone, then by (score, id) only where equal scores
                # straddle the kp-th place (duplicates): keys are built for 2 kp columns, not nc
                top = S.topk(self.kp, dim=1)
                v = top.values[:, -1:]
                tied = ((S >= v).sum(1) > self.kp) & (v[:, 0] > -float("inf"))   # -inf: never kept
                sel = top.indices
                if bool(tied.any()):
                    sel = sel.clone()
                    rows_t = tied.nonzero().flatten()
                    tstep = max(1, int(self.block_bytes // (2 * BYTES_PER_PAIR * nc)))   # keys over nc columns
                    for a in range(0, len(rows_t), tstep):
                        rt = rows_t[a:a + tstep]
                        sel[rt] = _keys(torch, S[rt], I[rt]).topk(self.kp, dim=1).indices
                S, I = S.gather(1, sel), I.gather(1, sel)
            S = torch.cat([self.S[r], S], 1)
            I = torch.cat([self.I[r], I], 1)
            keep = _keys(torch, S, I).topk(self.kp, dim=1).indices
            self.S[r] = S.gather(1, keep)
            self.I[r] = I.gather(1, keep)

    def finish(self, k, D=None, I=None, base=None):
        """The k best candidates of every query: D float32 (n, k) decreasing, I int32 (n, k) (ties:
        lower id first); -inf / -1 where a query got fewer than k. ``base`` is not needed."""
        if k > self.kp:
            raise ValueError("k = %d > kp = %d candidates kept" % (k, self.kp))
        torch = self.torch
        order = _keys(torch, self.S, self.I).topk(k, dim=1).indices
        Ds = self.S.gather(1, order).cpu().numpy()
        Is = self.I.gather(1, order).cpu().numpy()
        Is[~np.isfinite(Ds)] = -1
        D = np.empty(Ds.shape, dtype=np.float32) if D is None else D
        I = np.empty(Is.shape, dtype=np.int32) if I is None else I
        D[:], I[:] = Ds, Is
        return D, I


def exact_blocks(xb, K, bs, normalize, device):
    """The exact K-NN table of the background by blocks of ``bs`` rows on the torch ``device``:
    (i0, i1, D, I) as the faiss search of graph.py yields them. The normalised vectors are copied to
    the device once (4 N d bytes: 1 GiB at 1M, d = 256), then each block of queries is scanned
    against all of them."""
    torch = _torch()
    dev = torch.device(device)
    n, d = xb.shape
    X = torch.empty((n, d), dtype=torch.float32, device=dev)
    for i0 in range(0, n, bs):
        X[i0:i0 + bs] = torch.from_numpy(normalize(xb[i0:i0 + bs]))
    ids = torch.arange(n, dtype=torch.int32, device=dev)
    step = max(1, int(SCAN_BLOCK_BYTES[dev.type] // (BYTES_PER_PAIR * max(1, bs))))
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        scan = TorchKnnScan(X[i0:i1], K, device=dev)
        rows = np.arange(i1 - i0)
        for j0 in range(0, n, step):
            scan.add(rows, X[j0:j0 + step], ids[j0:j0 + step])
        yield (i0, i1) + scan.finish(K)


class TorchDiffusionOps:
    """The diffusion's products on the torch device: W and T as CSR tensors, label blocks there."""

    def __init__(self, W, T, device):
        torch = _torch()
        self.torch, self.device = torch, torch.device(device)
        self.W, self.T = self._csr(W), self._csr(T)
        self.n = W.shape[0]

    def _csr(self, A):
        """graph_utils.CSR -> torch CSR tensor on the device (its invariants are graph_utils')."""
        torch = self.torch
        # int32 row offsets and column ids where the entries fit (4 bytes each instead of 8)
        itype = np.int32 if A.nnz < 2**31 else np.int64
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)     # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(_tensor(torch, A.indptr, itype), _tensor(torch, A.indices, itype),
                                           _tensor(torch, A.data, np.float32), size=tuple(A.shape),
                                           check_invariants=False).to(self.device)

    def label_buffer(self, c):
        return None           # the block is made in numpy, then copied to the device

    def start(self, L0):
        """The block's initial label matrix (numpy (n, c)) on the device."""
        return self.torch.from_numpy(L0).to(self.device)

    def product(self, L):
        """W L, a new tensor."""
        return self.torch.sparse.mm(self.W, L)

    product_new = product

    def colnorm(self, L):
        """Columns scaled to sum 1, zero columns stay."""
        s = L.sum(0)
        return L / self.torch.where(s == 0, self.torch.ones_like(s), s)

    def const(self, a):
        """A numpy constant (index or value array) on the device."""
        return self.torch.as_tensor(a, device=self.device)

    def scores(self, L):
        return self.torch.sparse.mm(self.T, L).cpu().numpy()

    def numpy(self, L):
        return L.cpu().numpy() if isinstance(L, self.torch.Tensor) else L
