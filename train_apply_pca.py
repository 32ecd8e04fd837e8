"""PCA-R256 of the background features (stage 2 of the paper): train, then apply to every block.

train: reads all_feats (n x d_in float32) of one feature hdf5 (default
  $DDIR/features/f100m/block0.hdf5, the first 1M YFCC100M images), fits a faiss PCAMatrix
  d_in -> --dout (eigen power 0, random rotation) and writes it with faiss.write_VectorTransform
  (default $DDIR/features/PCAR256.vt).
apply: streams the hdf5 blocks block0 ... block{nblock-1} through that transform and writes their
  rows, in order, as one raw float32 file without header, (total rows) x d_out (default
  $DDIR/features/f100m/concatenated_PCAR256.raw). Reading overlaps computing; the output is built
  in OUTFILE.partial (+ .partial.json progress) and an interrupted apply resumes after its last
  complete block.

Examples:
  python train_apply_pca.py train                   # $DDIR/features/f100m/block0.hdf5 -> PCAR256.vt
  python train_apply_pca.py apply                  # the blocks that exist (F100M: 100) -> concatenated_PCAR256.raw
  python train_apply_pca.py train --infile feats.hdf5 --outfile pca.vt --dout 64
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
import argparse
import os

import faiss

from lowshot import data
from lowshot import pca as pcalib
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, atomic_output, file_lock, get_ddir, log,
                            positive_int, print_args, print_result, run_main)

# defaults under $DDIR, named by lowshot.data
FILES = data.FEATURE_FILES
DEFAULT_TRAIN = FILES["blocks"] % 0


def make_parser():
    p = ArgumentParser(description=__doc__,
                                formatter_class=HelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ddir", default=None,
                        help="data root for the default paths (default: $DDIR)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="train the PCA")
    t.add_argument("--infile", default=None, help="training features (default $DDIR/%s)"
                   % DEFAULT_TRAIN)
    t.add_argument("--outfile", default=None, help="PCA output (default $DDIR/%s)" % FILES["pca"])
    t.add_argument("--dout", type=positive_int, default=256, help="output dimension")
    t.add_argument("--max_rows", type=positive_int, default=None,
                   help="train on the first rows only (default: all)")
    a = sub.add_parser("apply", parents=[common], help="apply the PCA to the blocks")
    a.add_argument("--pcafile", default=None, help="trained PCA (default $DDIR/%s)" % FILES["pca"])
    a.add_argument("--nblock", type=positive_int, default=None,
                   help="number of blocks block0 ... block{nblock-1} (default: the blocks that exist, "
                        "block0, block1, ... up to the first missing one; the paper's F100M has 100)")
    a.add_argument("--inpattern", default=None,
                   help="block path pattern with %%d for the block number (default $DDIR/"
                   + FILES["blocks"].replace("%", "%%") + ")")
    a.add_argument("--outfile", default=None, help="raw output (default $DDIR/%s)" % FILES["background"])
    a.add_argument("--chunk", type=positive_int, default=65536, help="rows read and transformed at a time")
    return p


def default_path(path, ddir, key):
    """``path`` if given, else the data root's file ``key`` (lowshot.data.feature_paths)."""
    return path if path is not None else data.feature_paths(get_ddir(ddir))[key]


def _written_by_other(outfile, infiles, vt):
    """The output exists, complete (rows of the inputs x d_out floats), and no partial one is left."""
    if not os.path.isfile(outfile) or os.path.exists(outfile + ".partial"):
        return False
    rows = sum(data.feature_shape(p)[0] for p in infiles)
    return os.path.getsize(outfile) == rows * vt.d_out * 4


def main(argv=None):
    args = make_parser().parse_args(argv)
    print_args(args)
    if args.command == "train":
        infile = args.infile or data.feature_paths(get_ddir(args.ddir))["blocks"] % 0
        outfile = default_path(args.outfile, args.ddir, "pca")
        vt = pcalib.train_pca(infile, args.dout, args.max_rows)
        log("writing %s" % outfile)
        with atomic_output(outfile) as tmp:
            faiss.write_VectorTransform(vt, tmp)
        print_result({"script": "train_apply_pca", "command": "train", "infile": infile,
                      "outfile": outfile, "d_in": int(vt.d_in), "d_out": int(vt.d_out)})
    else:
        pcafile = default_path(args.pcafile, args.ddir, "pca")
        pattern = default_path(args.inpattern, args.ddir, "blocks")
        outfile = default_path(args.outfile, args.ddir, "background")
        try:
            pattern % 0
        except TypeError:
            raise InputError("--inpattern %s needs one %%d for the block number" % pattern)
        nblock = args.nblock
        if nblock is None:
            nblock = 0
            while os.path.isfile(pattern % nblock):
                nblock += 1
            if nblock == 0:
                raise InputError("no background block %s: extract features first (save_features.py), or "
                                 "give --inpattern" % (pattern % 0))
            log("%d blocks found: %s ... %s" % (nblock, pattern % 0, pattern % (nblock - 1)))
        infiles = [pattern % b for b in range(nblock)]
        vt = data.load_pca(pcafile)
        # two applies to one output take turns: the second finds the first one's file
        with file_lock(outfile + ".lock", "train_apply_pca.py apply") as waited:
            if waited and _written_by_other(outfile, infiles, vt):
                log("%s was written by the run waited for: nothing to do" % outfile)
                print_result({"script": "train_apply_pca", "command": "apply", "outfile": outfile, "reused": True})
                return
            res = pcalib.apply_pca(vt, infiles, outfile, args.chunk)
        res.update({"script": "train_apply_pca", "command": "apply", "outfile": outfile})
        print_result(res)


if __name__ == "__main__":
    run_main(main)
