#!/usr/bin/env python3
"""Logistic-regression baseline of the low-shot benchmark (paper, Table 3 "logistic regression").

Reads   $DDIR/features/train.hdf5   (all_feats (rows, D) float32, all_labels, count): labelled images
        $DDIR/features/val.hdf5     the test images
        --split (label_idx.json)    the classes: --mode val = base_classes_1 + novel_classes_1,
                                    --mode test = base_classes_2 + novel_classes_2 (1-based ids)
Labelled set: every training image of a base class, --nlabeled images of each novel class drawn with
np.random.RandomState(--seed) (the paper's protocol). A linear layer + log-softmax on the raw D-dim
features, SGD on class-balanced batches. Flags not given take the validated setting for --nlabeled
(lowshot/logreg.py HPARAMS, listed at the end of --help).
--mode val evaluates every 500 iterations, --mode test at the end.

Writes  stdout: top-1 and top-5 accuracies; last line one JSON result
        {"script": "logreg", "mode", "nlabeled", "seed", "lr", "wd", "mom", "batchsize", "maxiter",
         "evals": [{"iter", "top1", "top1_novel", "top5", "top5_novel"}, ...],
         "top1", "top1_novel", "top5", "top5_novel"}
        --result R.json      the same JSON
        --storeL F.npy       softmax probabilities of the test images, (n_test, C) float32, rows in
                             val.hdf5 order (split classes only), columns = classes in increasing id;
                             F.npy.json: their mode, n and seed (fusion.py checks the mode)
        --storemodel M.pt    torch state_dict of the linear layer (weight (C, D), bias (C,))

Example (paper, test split, n=2 seed 1: top-5 0.700, 0.565 on novel classes):
  python logreg.py --mode test --nlabeled 2 --seed 1 --storeL $DDIR/logs/logreg_test/L.nl2.seed1.npy
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
import argparse
import os
import re

import numpy as np
import torch

from lowshot import cli, data, logreg
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, atomic_output, get_ddir, log,
                            nonnegative_int, positive_int, print_args, print_result, run_main, write_json)


def device_name(text):
    """argparse type of --device: auto, cpu, cuda or cuda:N (torch's names)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError("expected auto, cpu, cuda or cuda:N, got %r" % text)
    return text


def parse_args(argv=None):
    table = "\n".join("  n=%d: lr %g wd %g batch %d iters %d" % (n, h["lr"], h["wd"], h["batchsize"], h["maxiter"])
                      for n, h in sorted(logreg.HPARAMS.items()))
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, parents=[cli.protocol_parser()],
                       epilog="validated settings (momentum %g, as the paper's runs):\n%s" % (
                           logreg.DEFAULT_MOM, table))
    g = p.add_argument_group("optimisation (default: the validated setting for --nlabeled)")
    g.add_argument("--maxiter", type=int, default=None, help="SGD iterations")
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--wd", type=float, default=None, help="weight decay")
    g.add_argument("--mom", type=float, default=None, help="momentum (default 0, as the paper's runs)")
    g.add_argument("--batchsize", type=int, default=None, help="class-balanced batch size")
    g.add_argument("--pcadim", type=positive_int, default=None,
                   help="input dimension of the linear layer; must equal the features' D (default: D)")
    g.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch CPU threads (0: torch's default; 1 when running several jobs per machine)")
    g.add_argument("--device", type=device_name, default="auto", help="auto (cuda if torch sees a GPU, else cpu), cpu, cuda")
    g = p.add_argument_group("output")
    g.add_argument("--verbose", type=nonnegative_int, default=500, help="log the training loss every N iterations (0: never)")
    g.add_argument("--storeL", default="", help="write test-image probabilities (n_test, C) float32 .npy")
    g.add_argument("--storemodel", default="", help="write the model's torch state_dict")
    g.add_argument("--result", default="", help="write the result JSON")
    return p.parse_args(argv)


def check_flags(args):
    """Optimisation flags: positive (lr, maxiter, batchsize) or non-negative (wd, mom < 1), finite."""
    for name, low, strict in (("lr", 0, True), ("maxiter", 0, True), ("batchsize", 0, True),
                              ("wd", 0, False), ("mom", 0, False)):
        v = getattr(args, name)
        if v is not None and not (np.isfinite(v) and (v > low if strict else v >= low)):
            raise InputError("--%s %s: must be %s" % (name, v, "> 0" if strict else ">= 0"))
    if args.mom is not None and args.mom >= 1:
        raise InputError("--mom %s: must be < 1" % args.mom)


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    check_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = logreg.pick_device(args.device)
    ddir = get_ddir(args.ddir)
    split_path = data.resolve_split(args.split, ddir, log)
    log("loading %s split %s, n=%d seed=%d" % (args.mode, split_path, args.nlabeled, args.seed))
    ld = data.load_lowshot(ddir, split_path, args.mode, args.nlabeled, args.seed, log=log)
    defaulted = [f for f in ("lr", "wd", "batchsize", "maxiter") if getattr(args, f) is None]
    if defaulted and os.path.abspath(split_path) != os.path.abspath(data.DEFAULT_SPLIT):
        log("note: --%s not given: the settings validated on ImageNet for n = %d are used, not settings "
            "chosen on this data; phases 1-2 of run_logreg.bash choose them on its validation split"
            % (", --".join(defaulted), args.nlabeled))
    if args.pcadim is not None and args.pcadim != ld.D:
        raise InputError("--pcadim %d but the features in %s have D = %d" % (
            args.pcadim, data.feature_paths(ddir)["train"], ld.D))
    res, model = logreg.run(ld, args.nlabeled, args.seed, args.mode, lr=args.lr, wd=args.wd,
                            mom=args.mom, batchsize=args.batchsize, maxiter=args.maxiter,
                            verbose=args.verbose, log=log, device=device)
    if args.storeL:
        log("writing", args.storeL)
        L = np.exp(logreg.scores(model.weight.detach(), model.bias.detach(), ld.Xte, log_softmax=True))
        with atomic_output(args.storeL) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, L.astype(np.float32))
        data.write_score_record(args.storeL, {"script": "logreg", "mode": args.mode, "nlabeled": args.nlabeled,
                                              "seed": args.seed, "split": os.path.abspath(split_path)})
    if args.storemodel:
        log("writing", args.storemodel)
        with atomic_output(args.storemodel) as tmp:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    result = dict(script="logreg", mode=args.mode, nlabeled=args.nlabeled, seed=args.seed, **res)
    if args.result:
        write_json(args.result, result)
    print_result(result)


if __name__ == "__main__":
    run_main(main)
