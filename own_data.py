#!/usr/bin/env python3
"""Your own images, end to end: a folder of class sub-folders -> a complete data root in the
published layout, ready for the phases (run_logreg.bash, run_diffusion.bash).

  python own_data.py DDIR --images PHOTOS/ [--unlabelled MORE/ ...]
  CONFIG=DDIR/phases.yaml bash run_logreg.bash 1; ... 4      # then run_diffusion.bash 1 .. 4

Steps (each is skipped when its output exists, so a stopped run continues):
  1. split: the classes (PHOTOS/<class>/...) into validation and test, base and novel; each class's
     images into training and test images, keeping the images of one --group together ->
     DDIR/label_idx.json, DDIR/lists/{train,test,background}.json, DDIR/own_data.json
  2. features of the training, test and unlabelled images with --model (save_features.py; an
     unreadable image becomes a black image and is listed in <features>.bad) ->
     DDIR/features/train.hdf5, val.hdf5 (the test images), f100m/block0.hdf5 (the unlabelled ones)
  3. PCA to --pca_dim (train_apply_pca.py; on the unlabelled images, or on the training images
     when there are none) -> DDIR/features/PCAR256.vt, f100m/concatenated_PCAR256.raw
  4. the background graph (build_graph.py), when there are unlabelled images
  5. DDIR/phases.yaml: small grids (as configs/demo.yaml), n up to the smallest novel class

Images: any format PIL reads; made upright from their EXIF orientation, transparency composited
on white, greyscale/CMYK/16-bit converted to 8-bit RGB; resized so that the shorter side is
--size, then the central --size x --size crop.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import yaml

from lowshot import data, owndata
from lowshot.common import HelpFormatter, InputError, atomic_output, get_ddir, log, print_args, run_main

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("ddir", help="data root to write (created)")
    g = p.add_argument_group("images")
    g.add_argument("--images", required=True, help="folder of class sub-folders of labelled images")
    g.add_argument("--unlabelled", action="append", default=[], help="folder of unlabelled images (repeatable)")
    g.add_argument("--group", default=None,
                   help="regular expression on file names: images with the same match (its first group) "
                        "stay on one side of the training/test split (e.g. '^(.*)_v\\d+$')")
    g = p.add_argument_group("split")
    g.add_argument("--test_fraction", type=float, default=0.3, help="share of each class's groups for test")
    g.add_argument("--val_fraction", type=float, default=0.5, help="share of the classes in the validation split")
    g.add_argument("--novel_fraction", type=float, default=0.5, help="share of novel classes in each split")
    g.add_argument("--seed", type=int, default=0, help="seed of the split")
    g = p.add_argument_group("features")
    g.add_argument("--model", default="EfficientNetLite0", help="save_features.py --model")
    g.add_argument("--modelfile", default=None, help="save_features.py --modelfile (ResNet checkpoints)")
    g.add_argument("--size", type=int, default=224, help="input side of the network")
    g.add_argument("--pca_dim", type=int, default=256, help="dimension after the PCA (at most the features')")
    return p.parse_args(argv)


def run(cmd):
    log("running: %s" % " ".join(cmd))
    r = subprocess.run([sys.executable] + cmd, cwd=ROOT)
    if r.returncode != 0:
        raise InputError("%s failed (exit status %d)" % (cmd[0], r.returncode))


def features_config(args, path):
    """save_features.py's config: image lists, the network's input side and normalisation."""
    effnet = args.model == "EfficientNetLite0"
    cfg = {"dataset": {"type": "image_list", "path": None, "root": None},
           "transform": {"transform_list": ["Scale", "CenterCrop", "ToTensor", "Normalize"],
                         "scale": args.size, "crop": args.size,
                         # null: the network's own normalisation (EfficientNet-Lite0: (x - 127) / 128)
                         "mean": None if effnet else [0.485, 0.456, 0.406],
                         "std": None if effnet else [0.229, 0.224, 0.225]},
           "loader": {"batch_size": 32, "num_workers": 0, "threads": 0}, "block_size": 1024}
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    os.makedirs(args.ddir, exist_ok=True)
    ddir = get_ddir(args.ddir)
    files = data.feature_paths(ddir)
    lists = {part: os.path.join(ddir, "lists", part + ".json") for part in ("train", "test", "background")}
    # 1. split
    split = owndata.make_split(owndata.scan_classes(args.images), seed=args.seed, group=args.group,
                               test_fraction=args.test_fraction, val_fraction=args.val_fraction,
                               novel_fraction=args.novel_fraction)
    if not os.path.isfile(os.path.join(ddir, "own_data.json")):
        nbg = owndata.write_lists(ddir, split, args.unlabelled)
    else:
        with open(os.path.join(ddir, "own_data.json")) as f:
            nbg = int(json.load(f)["nbackground"])
        log("split exists: %s" % os.path.join(ddir, "own_data.json"))
    # 2. features
    fcfg = os.path.join(ddir, "features.yaml")
    if not os.path.isfile(fcfg):
        features_config(args, fcfg)
    model = ["--model", args.model] + (["--modelfile", args.modelfile] if args.modelfile else [])
    for part, out in (("train", files["train"]), ("test", files["val"]), ("background", files["blocks"] % 0)):
        if part == "background" and not nbg:
            continue
        if os.path.isfile(out):
            log("exists: %s" % out)
            continue
        run(["save_features.py", "--cfg", fcfg] + model + ["--data", lists[part], "--root", ddir, "--outfile", out])
    # 3. PCA, trained on the unlabelled images when there are enough of them, else the training images
    if not os.path.isfile(files["pca"]):
        with open(os.path.join(ddir, "own_data.json")) as f:
            ntrain = int(json.load(f)["ntrain"])
        use_bg = nbg > args.pca_dim or nbg >= ntrain
        rows = nbg if use_bg else ntrain
        dout = min(args.pca_dim, rows - 1)
        if dout < args.pca_dim:
            log("PCA to %d dimensions, not %d: only %d images to train it on" % (dout, args.pca_dim, rows))
        run(["train_apply_pca.py", "train", "--ddir", ddir, "--dout", str(dout)]
            + ([] if use_bg else ["--infile", files["train"]]))
    if nbg and not os.path.isfile(files["background"]):
        run(["train_apply_pca.py", "apply", "--ddir", ddir, "--nblock", "1"])
    # 4. graph (k = 30 as the paper; on a small background, the stored K, a power of two, below nbg)
    kg = min(30, 2 ** int(np.log2(nbg - 1))) if nbg > 1 else 0
    if kg:
        run(["build_graph.py", str(nbg), "--ddir", ddir, "--k", str(kg)])
    # 5. phases config
    cpath = os.path.join(ddir, "phases.yaml")
    if not os.path.isfile(cpath):
        with atomic_output(cpath) as tmp:
            with open(tmp, "w") as f:
                f.write("# written by own_data.py; keys and meanings: configs/paper.yaml\n")
                yaml.safe_dump(owndata.phases_config(ddir, nbg, split, kg), f, sort_keys=False,
                               default_flow_style=None)
    log("ready: CONFIG=%s bash run_logreg.bash 1 (... 4), then bash run_diffusion.bash 1 (... 4)" % cpath)


if __name__ == "__main__":
    run_main(main)
