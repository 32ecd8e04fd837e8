#!/usr/bin/env python3
"""Write a generated $DDIR in the layout of the authors' published files, to run every stage without
ImageNet (synthetic features with class structure; see lowshot/generate.py for the model).

Writes  OUT/features/train.hdf5   all_feats (nclass*ntrain + pad, D) float32, all_labels int64
                                  (0-based class), count (1,) int64; zero padding rows past count
        OUT/features/val.hdf5     the same with ntest test images per class
        OUT/label_idx.json        class split, published form (1-based): base_classes_1/2,
                                  novel_classes_1/2, base_classes, label_names (ImageNet proportions)
        OUT/features/PCAR256.vt   faiss PCAMatrix(D, d, 0, True): PCA + random rotation, no whitening
        OUT/features/f100m/concatenated_PCAR256.raw   background, raw float32 (nbg, d), streamed
        OUT/generate.json         the parameters (written last)

The defaults (1000 classes, 50 training and 50 test images per class, D 2048, d 256, 1M background
rows) give an F1M-size benchmark: the test split has 507 classes, 25350 test images and
196*50 + 311*n labelled images. Every file is written under a temporary name and renamed when done.

Example:
  python generate_ddir.py /tmp/gen1m --nbg 1000000
  python logreg.py --ddir /tmp/gen1m --split /tmp/gen1m/label_idx.json --mode test --nlabeled 2 --seed 1
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
from lowshot import generate
from lowshot.common import ArgumentParser, HelpFormatter, log, print_args, print_result, run_main, seed_int

_D = generate.DEFAULTS


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("out", help="output data root (created)")
    g = p.add_argument_group("size")
    g.add_argument("--nclass", type=int, default=_D["nclass"], help="classes")
    g.add_argument("--ntrain", type=int, default=_D["ntrain"], help="training images per class")
    g.add_argument("--ntest", type=int, default=_D["ntest"], help="test images per class")
    g.add_argument("--D", type=int, default=_D["D"], help="raw feature dimension")
    g.add_argument("--d", type=int, default=_D["d"], help="PCA dimension (background, graph)")
    g.add_argument("--nbg", type=int, default=_D["nbg"], help="background rows")
    g.add_argument("--pad", type=int, default=_D["pad"], help="padding rows past count in the hdf5 files")
    g = p.add_argument_group("class structure")
    g.add_argument("--r", type=int, default=_D["r"], help="signal subspace dimension (default min(192, 3d/4))")
    g.add_argument("--nclutter", type=int, default=_D["nclutter"], help="classes found only in the background")
    g.add_argument("--bg_class_frac", type=float, default=_D["bg_class_frac"],
                   help="background fraction drawn from the nclass classes")
    g.add_argument("--bg_clutter_frac", type=float, default=_D["bg_clutter_frac"],
                   help="background fraction drawn from the clutter classes (rest: isolated points)")
    g.add_argument("--center_std", type=float, default=_D["center_std"], help="spread of class centres")
    g.add_argument("--curve_std", type=float, default=_D["curve_std"], help="size of a class's curve")
    g.add_argument("--noise_std", type=float, default=_D["noise_std"], help="noise per raw dimension")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=_D["seed"], help="random seed")
    g.add_argument("--block", type=int, default=_D["block"], help="rows generated at a time")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    kw = {k: v for k, v in vars(args).items() if k != "out"}
    log("generating %s" % args.out)
    p = generate.generate_ddir(args.out, **kw)
    print_result(dict(script="generate_ddir", out=args.out, **p))


if __name__ == "__main__":
    run_main(main)
