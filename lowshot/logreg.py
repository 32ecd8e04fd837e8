"""The logistic-regression baseline of the paper: a linear layer + log-softmax over the split's
classes on the raw D-dim features, trained by SGD on class-balanced batches.

Class-balanced batch: each of its ``batchsize`` items draws a class uniformly among the classes of
the labelled set, then one labelled image of that class uniformly (with replacement), as the 2018
original does. Unlike the original (which drew from numpy's unseeded global generator), the draws and
the initialisation come from ``seed``, so a run is repeatable.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from lowshot import evaluate
from lowshot.common import InputError

# Validated on the validation split by the paper's grid search (run script of the 2018 original):
# nlabeled: learning rate, weight decay, batch size, iterations. Used when a flag is not given.
# The original's runs left momentum at its default, 0.
HPARAMS = {
    1: dict(lr=0.001, wd=0.1, batchsize=128, maxiter=47000),
    2: dict(lr=0.001, wd=0.01, batchsize=128, maxiter=29500),
    5: dict(lr=0.001, wd=0.01, batchsize=64, maxiter=70500),
    10: dict(lr=0.01, wd=0.0, batchsize=128, maxiter=12000),
    20: dict(lr=0.01, wd=0.0, batchsize=128, maxiter=22000),
}
DEFAULT_MOM = 0.0
EVAL_EVERY = 500    # val mode: evaluate every this many iterations (the original's frequency)
_CHUNK = 8192       # test rows scored at a time


def default_hparams(nlabeled):
    """The validated settings for ``nlabeled``; for an n outside the table, those of the nearest
    n in log scale (ties to the smaller n).

    Returns
    -------
    (dict with lr, wd, batchsize, maxiter; the table's n it comes from)
    """
    n = min(HPARAMS, key=lambda m: (abs(np.log(m) - np.log(max(nlabeled, 1))), m))
    return dict(HPARAMS[n]), n


class BalancedSampler:
    """Draws class-balanced batches of row indices of a labelled set.

    Parameters
    ----------
    y : ndarray, int (n,)
        Labels of the labelled set.
    generator : torch.Generator
    """

    def __init__(self, y, generator):
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        self.order = torch.argsort(y, stable=True)
        self.classes, counts = torch.unique(y, return_counts=True)
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.g = generator

    def sample(self, batchsize):
        """Row indices, int64 tensor (batchsize,): a uniform class, then a uniform image of it."""
        c = torch.randint(0, self.classes.numel(), (batchsize,), generator=self.g)
        j = (torch.rand(batchsize, generator=self.g, dtype=torch.float64) * self.counts[c]).long()
        j = torch.minimum(j, self.counts[c] - 1)
        return self.order[self.starts[c] + j]


def pick_device(device="auto"):
    """torch device: "auto" is cuda when torch sees a GPU, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device %s: torch sees no GPU" % device)
    return torch.device(device)


def scores(weight, bias, X, log_softmax=False):
    """Class scores of rows of X: logits, or log-probabilities (computed on weight's device).

    Parameters
    ----------
    weight : torch.Tensor (C, D); bias : torch.Tensor (C,)
    X : ndarray, float32 (n, D)

    Returns
    -------
    ndarray, float32 (n, C)
    """
    out = np.empty((X.shape[0], weight.shape[0]), dtype=np.float32)
    with torch.no_grad():
        for i0 in range(0, X.shape[0], _CHUNK):
            x = torch.from_numpy(np.ascontiguousarray(X[i0:i0 + _CHUNK])).to(weight.device)
            s = F.linear(x, weight, bias)
            if log_softmax:
                s = F.log_softmax(s, dim=1)
            out[i0:i0 + s.shape[0]] = s.cpu().numpy()
    return out


def _sgd_step(params, bufs, lr, wd, mom):
    """One step of torch.optim.SGD's update (weight decay, momentum, no dampening), by hand.

    torch.optim's first step imports torch._dynamo (~1.4 s of CPU), paid again by each of the
    hundreds of short runs of a validation grid; this is the same arithmetic without it.
    """
    with torch.no_grad():
        for i, q in enumerate(params):
            d = q.grad.add(q, alpha=wd) if wd else q.grad
            if mom:
                d = bufs[i].mul_(mom).add_(d)
            q.add_(d, alpha=-lr)


def train(Xl, yl, nclass, lr, wd, mom, batchsize, maxiter, seed, eval_every=0, eval_fn=None,
          verbose=500, log=None, device="cpu"):
    """Train the linear classifier by SGD on class-balanced batches.

    Parameters
    ----------
    Xl : ndarray, float32 (nl, D)
        Labelled features.
    yl : ndarray, int (nl,)
        Their labels in 0..nclass-1.
    nclass : int
    lr, wd, mom : float
        SGD learning rate, weight decay (L2 on weight and bias, as torch's SGD), momentum.
    batchsize, maxiter : int
    seed : int
        Initialisation and batch draws.
    eval_every : int
        Call ``eval_fn(iteration, weight, bias)`` every this many iterations (0: never).
    verbose : int
        Log the mean training loss every this many iterations (0: never).
    log : callable or None
    device : str or torch.device
        Where the labelled set and the model live; the batch draws stay on the CPU generator, so
        a GPU run sees the same batches as a CPU run.

    Returns
    -------
    torch.nn.Linear (D -> nclass), trained, on ``device``.
    """
    log = log or (lambda *a: None)
    Xl = np.ascontiguousarray(Xl, dtype=np.float32)
    yl = np.asarray(yl, dtype=np.int64)
    if yl.size == 0 or yl.min() < 0 or yl.max() >= nclass:
        raise InputError("labels must be in 0..%d" % (nclass - 1))
    device = torch.device(device)
    torch.manual_seed(seed)
    model = torch.nn.Linear(Xl.shape[1], nclass).to(device)
    params = [model.weight, model.bias]
    bufs = [torch.zeros_like(q) for q in params] if mom else None
    g = torch.Generator().manual_seed(seed)
    sampler = BalancedSampler(yl, g)
    X = torch.from_numpy(Xl).to(device)
    Y = torch.from_numpy(yl).to(device)
    loss_sum, t0 = 0.0, time.time()
    for it in range(1, maxiter + 1):
        idx = sampler.sample(batchsize).to(device)
        loss = F.cross_entropy(model(X.index_select(0, idx)), Y.index_select(0, idx))
        model.zero_grad(set_to_none=True)
        loss.backward()
        _sgd_step(params, bufs, lr, wd, mom)
        if verbose:
            loss_sum = loss_sum + loss.detach()    # no device sync per iteration
            if it % verbose == 0:
                log("iter %d/%d  loss %.4f  %.0f it/s" % (
                    it, maxiter, float(loss_sum) / verbose, it / (time.time() - t0)))
                loss_sum = 0.0
        if eval_every and eval_fn is not None and it % eval_every == 0:
            eval_fn(it, model.weight.detach(), model.bias.detach())
    return model


def run(ld, nlabeled, seed, mode, lr=None, wd=None, mom=None, batchsize=None, maxiter=None,
        verbose=500, log=None, device="cpu"):
    """Train on a loaded low-shot problem and evaluate it with the protocol of the paper.

    Parameters
    ----------
    ld : lowshot.data.LowShotData
    nlabeled, seed : int
    mode : {"val", "test"}
        val: evaluate every 500 iterations; test: at the end only.
    lr, wd, mom, batchsize, maxiter : None or value
        None: the validated setting for ``nlabeled`` (:data:`HPARAMS`), momentum 0.
    verbose : int
    log : callable or None
    device : str or torch.device

    Returns
    -------
    result : dict
        ``lr, wd, mom, batchsize, maxiter, evals`` ([{"iter", "top1", "top1_novel", "top5",
        "top5_novel"}], the keys of lowshot.evaluate.accuracies), and those keys for the final model.
    model : torch.nn.Linear
    """
    log = log or (lambda *a: None)
    hp, n_from = default_hparams(nlabeled)
    given = dict(lr=lr, wd=wd, batchsize=batchsize, maxiter=maxiter)
    hp.update({k: v for k, v in given.items() if v is not None})
    if any(v is None for v in given.values()):
        log("validated settings of n=%d for the flags not given: %s" % (n_from, hp))
    mom = DEFAULT_MOM if mom is None else mom
    if hp["maxiter"] < 1 or hp["batchsize"] < 1:
        raise InputError("maxiter and batchsize must be >= 1")
    evals = []

    def eval_fn(it, W, b):
        acc = evaluate.accuracies(scores(W, b, ld.Xte), ld.yte, ld.split.is_novel)
        evals.append(dict(iter=it, **acc))
        log("iteration %d %s" % (it, evaluate.format_accuracies(acc)))

    log("training logreg: %d labelled x %d dims, %d classes, %s" % (
        ld.Xl.shape[0], ld.Xl.shape[1], ld.split.nclass, hp))
    model = train(ld.Xl, ld.yl, ld.split.nclass, hp["lr"], hp["wd"], mom, hp["batchsize"],
                  hp["maxiter"], seed, eval_every=EVAL_EVERY if mode == "val" else 0,
                  eval_fn=eval_fn, verbose=verbose, log=log, device=device)
    if not evals or evals[-1]["iter"] != hp["maxiter"]:
        eval_fn(hp["maxiter"], model.weight.detach(), model.bias.detach())
    res = dict(hp, mom=mom, evals=evals, **{m: evals[-1][m] for m in evaluate.metric_names()})
    return res, model
