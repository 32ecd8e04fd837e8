"""Flags that several scripts share, declared once: parent parsers built with ``add_help=False`` and
passed as ``parents=[...]`` to each script's parser (as dinov2's ``eval/`` scripts share their setup
parser), so a flag has one definition, one help text and one check (its argparse ``type``).
"""
from lowshot.common import ArgumentParser, positive_int, seed_int


def protocol_parser():
    """The benchmark protocol (``--mode --nlabeled --seed --split --ddir``) of logreg.py,
    diffusion.py and fusion.py, in a group "protocol"."""
    p = ArgumentParser(add_help=False)
    g = p.add_argument_group("protocol")
    g.add_argument("--mode", choices=["val", "test"], default="val",
                   help="val: split 1 (base_classes_1 + novel_classes_1), test: split 2 (base_classes_2 + "
                        "novel_classes_2)")
    g.add_argument("--nlabeled", type=positive_int, default=2, help="labelled images per novel class")
    g.add_argument("--seed", type=seed_int, default=1,
                   help="seed of the labelled-image draw (logreg.py: also of the initialisation and batches)")
    g.add_argument("--split", default=None, help="class split file (label_idx.json form; default: "
                                                  "$DDIR/label_idx.json when it exists, else data/label_idx.json, "
                                                  "ImageNet's)")
    g.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    return p
