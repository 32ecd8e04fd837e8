#!/usr/bin/env python3
"""Your own images, end to end: a folder of class sub-folders -> a complete data root in the
published layout, ready for the phases (run_logreg.bash, run_diffusion.bash).

  python own_data.py DDIR --images PHOTOS/ [--unlabelled MORE/ ...]
  python own_data.py DDIR --features X.npy --labels y.npy [--background B.npy]   # features already made
  CONFIG=DDIR/phases.yaml bash run_logreg.bash 1; ... 4      # then run_diffusion.bash 1 .. 4

Steps (each is skipped when its output exists, so a stopped run continues):
  1. split: the classes (PHOTOS/<class>/...) into validation and test, base and novel; each class's
     images into training and test images, keeping the images of one --group together ->
     DDIR/label_idx.json, DDIR/lists/{train,test,background}.json, DDIR/own_data.json.
     Every image is read first: an unreadable one (empty, truncated, not an image) is left out, named
     in the log and in own_data.json's "unreadable". A class that cannot be split is left out with
     its reason (empty folder, one group); a --group that matches few file names, a split with <= 5
     classes and a class holding most test images are WARNING lines and own_data.json's "warnings".
  2. features of the training, test and unlabelled images with --model (save_features.py; an image
     it cannot read, with --prepared lists, is computed on a black image and listed in
     <features>.bad) ->
     DDIR/features/train.hdf5, val.hdf5 (the test images), f100m/block0.hdf5 (the unlabelled ones)
  3. PCA to --pca_dim (train_apply_pca.py; on the unlabelled images, or on the training images
     when there are none) -> DDIR/features/PCAR256.vt, f100m/concatenated_PCAR256.raw
  4. the background graph (build_graph.py), when there are unlabelled images
  5. DDIR/phases.yaml: small grids (as configs/demo.yaml: no background and all the unlabelled
     images, each also with the in-domain images, the novel classes' other training images), n up to
     the smallest novel class, or --phases_template's grids; the metric validation maximises
     (metric: top5 as the paper, top1 when the test split has fewer than 10 classes, unless the
     template sets it)

With --features (a .npy matrix, or a feature hdf5 whose all_labels give the classes), step 2 writes
the rows of the training and test images and the --background rows in the published layout; the
split draws rows (--groups: one group id per row keeps rows together).

Images: any format PIL reads; made upright from their EXIF orientation, transparency composited
on white, greyscale/CMYK/16-bit converted to 8-bit RGB; resized so that the shorter side is
--size, then the central --size x --size crop.
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
import json
import os
import shlex
import sys

import numpy as np
import yaml

from lowshot import data, owndata, phase_config
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, atomic_output, file_lock, get_ddir, log,
                            nonnegative_int, positive_int, print_args, require_file, run_main, seed_int,
                            start_child)

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("ddir", help="data root to write (created)")
    g = p.add_argument_group("images (or --features)")
    g.add_argument("--images", default=None, help="folder of class sub-folders of labelled images")
    g.add_argument("--unlabelled", action="append", default=[],
                   help="folder of unlabelled images (repeatable)")
    g.add_argument("--group", default=None,
                   help="regular expression searched (re.search) in each file name without its extension "
                        "(photo12_v2.png -> 'photo12_v2'); its first group, or its whole match when it has "
                        "no group, names the image's group, and the images of a group stay on one side of "
                        "the training/test split (e.g. '^(.*)_v\\d+$'); an image whose name it does not "
                        "match is its own group (a WARNING when that is most of them)")
    g = p.add_argument_group("precomputed features (instead of --images)")
    g.add_argument("--features", default=None, help="labelled features: (rows, D) .npy, or a feature hdf5")
    g.add_argument("--labels", default=None, help="0-based class of each row (.npy; an hdf5 has its own)")
    g.add_argument("--background", default=None, help="unlabelled features (.npy or hdf5), the background")
    g.add_argument("--groups", default=None, help="group id of each labelled row (.npy): a group stays on "
                                                  "one side of the training/test split")
    g.add_argument("--class_names", default=None, help="text file, one class name per line")
    g = p.add_argument_group("a split made elsewhere")
    g.add_argument("--prepared", action="store_true",
                   help="DDIR already holds lists/{train,test,background}.json and label_idx.json (a split "
                        "made by other rules): no split; a phases config only with --phases_template")
    g = p.add_argument_group("split")
    g.add_argument("--test_fraction", type=float, default=0.3, help="share of each class's groups for test")
    g.add_argument("--val_fraction", type=float, default=0.5,
                   help="share of the classes in the validation split")
    g.add_argument("--novel_fraction", type=float, default=0.5, help="share of novel classes in each split")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the split")
    g.add_argument("--min_novel_train", type=nonnegative_int, default=0,
                   help="novel classes are drawn among the classes with at least this many training images "
                        "(the largest n you will use)")
    g.add_argument("--max_train_per_class", type=positive_int, default=None,
                   help="keep at most this many training images per class (round-robin over its groups)")
    g.add_argument("--max_test_per_class", type=positive_int, default=None,
                   help="keep at most this many test images per class (round-robin over its groups)")
    g = p.add_argument_group("features")
    g.add_argument("--model", default="EfficientNetLite0", help="save_features.py --model")
    g.add_argument("--features_cfg", default=None,
                   help="save_features.py config to use (default: one written for --size and --model)")
    g.add_argument("--modelfile", default=None, help="save_features.py --modelfile (ResNet checkpoints)")
    g.add_argument("--size", type=positive_int, default=224, help="input side of the network")
    g.add_argument("--threads", type=nonnegative_int, default=None,
                   help="torch CPU threads of the feature extraction (its config's loader.threads; 0: torch's "
                        "default, all cores; default: the config's, 0 in the one written here)")
    g.add_argument("--pca_dim", type=positive_int, default=256, help="dimension after the PCA (at most the features')")
    g = p.add_argument_group("phases")
    g.add_argument("--phases_template", default=None,
                   help="your grids (a phases config, e.g. configs/demo.yaml) instead of the ones sized to the "
                        "data: ddir, split and rundir are set, nbg 'all' becomes the number of unlabelled images")
    args = p.parse_args(argv)
    # the steps run from the repository's folder: every path absolute
    for key in ("ddir", "images", "features", "labels", "background", "groups", "class_names", "features_cfg",
                "modelfile", "phases_template"):
        if getattr(args, key) is not None:
            setattr(args, key, os.path.abspath(getattr(args, key)))
    args.unlabelled = [os.path.abspath(u) for u in args.unlabelled]
    return args


def run(cmd):
    log("running: %s" % " ".join(cmd))
    # the step dies with this process (even SIGKILLed): no orphan keeps writing the data root.
    # Ctrl-C stops this process alone, which stops the step with SIGTERM (it exits through its
    # finally blocks, keeping what it completed): one line on the terminal, not one per process
    p = start_child([sys.executable] + cmd, ignore_sigint=True, cwd=ROOT)
    try:
        returncode = p.wait()
    except BaseException:
        p.terminate()
        p.wait()
        raise
    if returncode != 0:
        raise InputError("%s failed (exit status %d)" % (cmd[0], returncode))


def features_config(args, path):
    """save_features.py's config: image lists, the network's input side and normalisation."""
    effnet = args.model == "EfficientNetLite0"
    cfg = {"dataset": {"type": "image_list", "path": None, "root": None},
           "transform": {"transform_list": ["Scale", "CenterCrop", "ToTensor", "Normalize"],
                         "scale": args.size, "crop": args.size,
                         # null: the network's own normalisation (EfficientNet-Lite0: (x - 127) / 128)
                         "mean": None if effnet else [0.485, 0.456, 0.406],
                         "std": None if effnet else [0.229, 0.224, 0.225]},
           "loader": {"batch_size": 32, "num_workers": 0, "threads": args.threads or 0}, "block_size": 1024}
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)


def precomputed(args, ddir, files, split_args):
    """Steps 1-2 for --features: the split of the rows and the feature files. Returns (split, nbg)."""
    X, labels = owndata.read_matrix(args.features, "--features")
    if args.labels:
        labels = owndata.read_vector(args.labels, "--labels")
    if labels is None or len(labels) != len(X):
        raise InputError("--labels: one class per row of --features (%d rows) is needed" % len(X))
    names = None
    if args.class_names:
        with open(require_file(args.class_names, "--class_names")) as f:
            names = [line.strip() for line in f if line.strip()]
    groups = owndata.read_vector(args.groups, "--groups") if args.groups else None
    if groups is not None and len(groups) != len(X):
        raise InputError("--groups: one group per row of --features (%d rows) is needed" % len(X))
    split = owndata.make_split(owndata.feature_classes(labels, names),
                               key=(lambda r: groups[r].item()) if groups is not None else (lambda r: r),
                               **split_args)
    B = (owndata.read_matrix(args.background, "--background")[0] if args.background
         else np.zeros((0, X.shape[1]), dtype=np.float32))
    if B.shape[1] != X.shape[1]:
        raise InputError("--background has %d dimensions, --features %d" % (B.shape[1], X.shape[1]))
    if os.path.isfile(os.path.join(ddir, "own_data.json")):
        owndata.check_split_params(ddir, split_args)
    else:
        os.makedirs(os.path.dirname(files["background"]), exist_ok=True)
        for key, part in (("train", "train"), ("val", "test")):
            rows = [r for r, _ in split[part]]
            owndata.write_features(files[key], X[rows], [c for _, c in split[part]])
        if len(B):
            owndata.write_features(files["blocks"] % 0, B, -np.ones(len(B), dtype=np.int64))
        owndata.write_split(ddir, split, len(B), split_args)
    return split, len(B)


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    os.makedirs(args.ddir, exist_ok=True)
    # two runs on one data root take turns: the second finds the first one's files and skips them
    with file_lock(os.path.join(args.ddir, "own_data.lock"), "own_data.py %s" % args.ddir):
        make_root(args)


def make_root(args):
    """Steps 1-5 (module docstring) under the data root's lock."""
    ddir = get_ddir(args.ddir)
    files = data.feature_paths(ddir)
    if (args.images is not None) + (args.features is not None) + args.prepared != 1:
        raise InputError("give --images (a folder of class folders) or --features (precomputed) or --prepared, "
                         "one of them")
    split_args = dict(seed=args.seed, test_fraction=args.test_fraction, val_fraction=args.val_fraction,
                      novel_fraction=args.novel_fraction, min_novel_train=args.min_novel_train,
                      max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    if args.images is not None or args.prepared:
        split, nbg = from_images(args, ddir, files, split_args)
    else:
        split, nbg = precomputed(args, ddir, files, split_args)
    kg = pca_and_graph(args, ddir, files, nbg)
    cpath = os.path.join(ddir, "phases.yaml")
    write_phases_config(args, ddir, nbg, split, kg, cpath)
    log("ready: %s (... 4), then %s (... 4)" % (phase_command("run_logreg.bash", cpath),
                                                 phase_command("run_diffusion.bash", cpath)))


def from_images(args, ddir, files, split_args):
    """Steps 1-2 for --images and --prepared: the split of the images (none with --prepared) and
    their features (save_features.py). Returns (split or None, nbg)."""
    lists = {part: os.path.join(ddir, "lists", part + ".json") for part in ("train", "test", "background")}
    # 1. split
    split = None
    if args.prepared:
        with open(lists["background"]) as f:
            nbg = len(json.load(f)["image_names"])
    elif not os.path.isfile(os.path.join(ddir, "own_data.json")):
        classes = owndata.scan_classes(args.images)
        bad = owndata.unreadable_images([f for _, files in classes for f in files])
        split = owndata.make_split(classes, group=args.group, unreadable=bad, **split_args)
        nbg = owndata.write_lists(ddir, split, args.unlabelled, dict(split_args, group=args.group))
    else:
        owndata.check_split_params(ddir, dict(split_args, group=args.group))
        split = owndata.make_split(owndata.scan_classes(args.images), group=args.group,
                                   unreadable=owndata.recorded_unreadable(ddir), **split_args)
        with open(os.path.join(ddir, "own_data.json")) as f:
            nbg = int(json.load(f)["nbackground"])
        log("split exists: %s" % os.path.join(ddir, "own_data.json"))
    # 2. features
    fcfg = args.features_cfg or os.path.join(ddir, "features.yaml")
    if not os.path.isfile(fcfg):
        features_config(args, fcfg)
    flags = ["--model", args.model] + (["--modelfile", args.modelfile] if args.modelfile else [])
    # also when the config was given (--features_cfg) or written by an earlier run
    flags += ["--threads", str(args.threads)] if args.threads is not None else []
    for part, out in (("train", files["train"]), ("test", files["val"]),
                      ("background", files["blocks"] % 0)):
        if part == "background" and not nbg:
            continue
        if os.path.isfile(out):
            log("exists: %s" % out)
            continue
        run(["save_features.py", "--cfg", fcfg] + flags + ["--data", lists[part], "--root", ddir,
                                                            "--outfile", out])
    return split, nbg


def pca_and_graph(args, ddir, files, nbg):
    """Steps 3-4: the PCA and the background graph. Returns the graph's k (0: no graph)."""
    # 3. PCA, trained on the unlabelled images when there are enough of them, else the training images
    if not os.path.isfile(files["pca"]):
        ntrain = data.feature_shape(files["train"])[0]
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
    return kg


def write_phases_config(args, ddir, nbg, split, kg, cpath):
    """Step 5: the phases config ``cpath`` (kept when it exists), from --phases_template or sized to
    the split (none with --prepared and no template)."""
    if args.phases_template:
        cfg, origin = owndata.phases_from_template(ddir, nbg, args.phases_template), args.phases_template
    elif split is not None:
        cfg, origin = owndata.phases_config(ddir, nbg, split, kg), "grids sized to the data"
    if (args.phases_template or split is not None) and not os.path.isfile(cpath):
        owndata.set_metric(cfg, data.load_split(os.path.join(ddir, "label_idx.json"), "test").nclass, cpath)
        with atomic_output(cpath) as tmp:
            with open(tmp, "w") as f:
                f.write("# written by own_data.py (%s); keys and meanings: configs/paper.yaml\n" % origin)
                yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None)
            try:
                phase_config.load_config(tmp)
            except InputError as e:      # name the template, not the temporary file
                raise InputError(str(e).replace("config %s" % tmp, origin if args.phases_template else "config"))


def phase_command(script, config):
    """``CONFIG=... bash run_logreg.bash 1``, shell-quoted, to paste in this folder (the script's own
    path when the current folder is not the repository's)."""
    path = script if os.path.realpath(os.getcwd()) == os.path.realpath(ROOT) else os.path.join(ROOT, script)
    return "CONFIG=%s bash %s 1" % (shlex.quote(config), shlex.quote(path))


if __name__ == "__main__":
    run_main(main)
