"""Late fusion of logistic-regression and diffusion scores ("combined" column of the paper's table).

Reads   --logreg_scores A.npy     (n_test, C) float32 softmax probabilities (logreg.py --storeL),
                                  or log-probabilities (the 2018 logreg.py's --storeL: all <= 0,
                                  exponentiated; the log says which was read)
        --diffusion_scores B.npy  (n_test, C) float32 diffusion scores (diffusion.py --storeL)
        $DDIR/features/val.hdf5   test labels (rows of the split's classes, file order)
        --split                   class split (default $DDIR/label_idx.json if any, else data/label_idx.json)
Writes  --result R.json           the JSON result line (also printed last on stdout)

Both score matrices must come from the same --mode (same test images, same classes). Each is
made a distribution over the classes of a test image: the softmax rows already sum to 1, the
diffusion rows (label mass on the image's graph neighbours, any scale) are divided by their sum
(an all-zero row stays zero). The fused score is

    (1 - w) * logreg + w * diffusion          w = 0: logreg alone, w = 1: diffusion alone

and top-1 and top-5 accuracy are reported for every weight of --weights ("top1", "top5", ...: one
list each, in the order of the weights); best_weight maximises --metric. Choose w on --mode val,
then run --mode test with --weight w.

Example:
  python fusion.py --mode val --nlabeled 2 --seed 1 --logreg_scores lr.npy \\
      --diffusion_scores dif.npy --weights 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
import numpy as np

from lowshot import cli, data, evaluate
from lowshot import diffuse as dif
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, get_ddir, log, print_args, print_result,
                            require_file, run_main, write_json)


def parse_args(argv):
    # the protocol flags: the split of the scores (--mode), recorded in the result (--nlabeled, --seed)
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, parents=[cli.protocol_parser()])
    g = p.add_argument_group("fusion")
    g.add_argument("--logreg_scores", required=True, help="(n_test, C) .npy from logreg.py --storeL")
    g.add_argument("--diffusion_scores", required=True, help="(n_test, C) .npy from diffusion.py --storeL")
    g.add_argument("--weights", default=",".join("%g" % w for w in dif.FUSION_WEIGHTS),
                   help="comma-separated diffusion weights w in [0, 1] (default: %(default)s)")
    g.add_argument("--weight", type=float, default=None, help="a single weight (overrides --weights)")
    g.add_argument("--metric", default="top5", choices=evaluate.metric_names(),
                   help="what best_weight maximises (top5: the paper's; top1 for data with few classes)")
    g = p.add_argument_group("outputs")
    g.add_argument("--result", default=None, help="write the result JSON here")
    return p.parse_args(argv)


def _load_scores(path, nt, C, log_probs_ok=False):
    require_file(path, "score file")
    try:
        S = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError("score file %s is not a .npy array: %s" % (path, e))
    if S.shape != (nt, C):
        raise InputError("score file %s has shape %s, expected (n_test, C) = (%d, %d) for this "
                         "split's test images" % (path, S.shape, nt, C))
    S = np.asarray(S, dtype=np.float64)
    if not np.isfinite(S).all():
        raise InputError("score file %s holds NaN or inf" % path)
    if (S < 0).any():
        if log_probs_ok and not (S > 0).any():
            log("%s: log-probabilities (all scores <= 0, as the 2018 logreg.py --storeL wrote them): "
                "exponentiated" % path)
            return np.exp(S)
        raise InputError("score file %s holds negative scores: expected %s" % (
            path, "probabilities (logreg.py --storeL) or log-probabilities, all <= 0 (the 2018 logreg.py)"
            if log_probs_ok else "diffusion mass (diffusion.py --storeL), >= 0"))
    if log_probs_ok:
        log("%s: probabilities" % path)
    return S


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    if args.weight is not None:
        weights = [args.weight]
    else:
        try:
            weights = [float(w) for w in args.weights.split(",") if w.strip()]
        except ValueError:
            raise InputError("--weights %r: expected comma-separated numbers" % args.weights)
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise InputError("weights %s: need at least one, each in [0, 1]" % weights)
    ddir = get_ddir(args.ddir)
    split = data.load_split(data.resolve_split(args.split, ddir, log), args.mode)
    val = data.feature_paths(ddir)["val"]
    y, _ = data.load_labels(val, split)
    log("%d test images of %s, %d classes" % (y.size, val, split.nclass))
    for path in (args.logreg_scores, args.diffusion_scores):
        data.check_score_record(path, args.mode)
    P = _load_scores(args.logreg_scores, y.size, split.nclass, log_probs_ok=True)
    S = _load_scores(args.diffusion_scores, y.size, split.nclass)
    accs = {m: [] for m in evaluate.metric_names()}
    for w in weights:
        acc = evaluate.accuracies(dif.fuse(P, S, w), y, split.is_novel)
        log("w = %.3f  %s" % (w, evaluate.format_accuracies(acc)))
        for m in accs:
            accs[m].append(acc[m])
    best = int(np.argmax(accs[args.metric]))
    res = dict({"script": "fusion", "mode": args.mode, "nlabeled": args.nlabeled, "seed": args.seed,
                "weights": weights}, **accs)
    res.update({"metric": args.metric, "best_weight": weights[best],
                "best_" + args.metric: accs[args.metric][best]})
    if args.result:
        write_json(args.result, res)
    print_result(res)


if __name__ == "__main__":
    run_main(main)
