"""Every diffusion variant (lowshot/method.py) on one data root, by the paper's protocol.

For each variant and each n in --nlabeled: ``diffusion.py --mode val --niter NMAX`` for every seed
(its result holds the accuracies after every iteration), the iteration count with the best mean
validation --metric, then ``diffusion.py --mode test`` with that count for every seed. Reports the
test top-1 / top-5 accuracy over all and novel classes (mean over seeds), the chosen count and the
time of a test run (diffusion.py's own ``time_total``: graph completion and diffusion). Every run
shares the data root's stored background graph and completion cache, so the variants see the same
graph.

Examples (the table in benchmarks/README.md; the emoji demo's data root exists after ``bash run_demo.bash``, a
generated F1M after ``python generate_ddir.py /tmp/f1m --nbg 1000000`` and
``python build_graph.py 1000000 --ddir /tmp/f1m``):
  python benchmarks/bench_variants.py --ddir demo_ddir --nbg 1438 --split demo_ddir/label_idx.json
  python benchmarks/bench_variants.py --ddir /tmp/f1m --nbg 1000000 --split /tmp/f1m/label_idx.json --seeds 1
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from lowshot.common import log, print_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = "douze18,spreading,propagation,poisson,douze18:similarity,douze18:gaussian"


def run(args, variant, weights, mode, nlabeled, seed, niter, out):
    cmd = [sys.executable, os.path.join(ROOT, "diffusion.py"), "--ddir", args.ddir, "--mode", mode,
           "--nlabeled", str(nlabeled), "--seed", str(seed), "--k", str(args.k), "--nbg", str(args.nbg),
           "--niter", str(niter), "--variant", variant, "--weights", weights, "--result", out]
    if args.split:
        cmd += ["--split", args.split]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def evaluate_variant(args, spec, nlabeled, tmp):
    variant, _, weights = spec.partition(":")
    weights = weights or "binary"
    seeds = [int(s) for s in args.seeds.split(",")]
    val = [run(args, variant, weights, "val", nlabeled, s, args.niter_max, os.path.join(tmp, "v%d.json" % s))
           for s in seeds]
    curve = np.mean([[it[args.metric] for it in r["iters"]] for r in val], axis=0)
    niter = int(np.argmax(curve))          # first of the best: the fewest iterations
    test = [run(args, variant, weights, "test", nlabeled, s, niter, os.path.join(tmp, "t%d.json" % s))
            for s in seeds]
    row = {"variant": variant, "weights": weights, "n": nlabeled, "niter": niter,
           "val_" + args.metric: round(float(curve[niter]), 2),
           "time_s": round(float(np.mean([r["time_total"] for r in test])), 2)}
    for key in ("top1", "top5", "top1_novel", "top5_novel"):
        vals = [r[key] for r in test if key in r]
        row[key] = round(float(np.mean(vals)), 4) if vals else None
    return row


def table(rows):
    head = "| variant | weights | n | iterations | top-1 % | top-5 % | top-1 novel % | top-5 novel % | s / test run |"
    lines = [head, "|" + "---|" * 3 + "---:|" * 6]
    fmt = lambda v: "-" if v is None else "%.1f" % (100 * v)
    for r in rows:
        lines.append("| %s | %s | %d | %d | %s | %s | %s | %s | %.1f |" % (
            r["variant"], r["weights"], r["n"], r["niter"], fmt(r["top1"]), fmt(r["top5"]),
            fmt(r["top1_novel"]), fmt(r["top5_novel"]), r["time_s"]))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddir", required=True, help="data root with the background graph of --nbg rows")
    p.add_argument("--split", default=None, help="class split (default: diffusion.py's)")
    p.add_argument("--nbg", type=int, required=True, help="background rows (0: none)")
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--nlabeled", default="1,2,5", help="labelled images per novel class")
    p.add_argument("--seeds", default="1,2,3", help="labelled draws (mean over them)")
    p.add_argument("--variants", default=VARIANTS, help="variant[:weights], comma-separated")
    p.add_argument("--niter_max", type=int, default=50,
                   help="validation chooses the count in 0..this (50: graphlearning's least for Poisson learning)")
    p.add_argument("--metric", default="top5", help="what validation maximises (a result key)")
    p.add_argument("--json_out", default=None, help="also write the rows here")
    args = p.parse_args()
    print_args(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in args.nlabeled.split(",")]:
            for spec in args.variants.split(","):
                rows.append(evaluate_variant(args, spec, n, tmp))
                log("n = %d %s: %s" % (n, spec, json.dumps(rows[-1], sort_keys=True)))
    print(table(rows), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps(rows, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
