"""The emoji demo's own steps (run_demo.bash calls them between the paper's stages).

Subcommands (DDIR = --ddir or $DDIR; run_demo.bash uses demo_ddir/ at the repository root):

  fetch     `npm pack emoji-datasource-{google,twitter}@16.0.0` into DDIR/npm (skipped when the
            tarballs are there), extract emoji.json and img/<vendor>/64/*.png (64x64 PNG) from them
  prepare   choose the classes (Unicode subcategories with >= 10 emoji, country-flag excluded: 57),
            split each class's emoji (never single images) into training and test emoji, split the
            classes into validation base/novel and test base/novel, and write
              DDIR/lists/{train,test,background}.json  {"image_names": [paths relative to DDIR],
                                                        "image_labels": [0-based class, -1]}
              DDIR/label_idx.json   the class split, 1-based ids (data/label_idx.json form)
              DDIR/demo_meta.json   per class: name, group, emoji and images per side
  config    write DDIR/phases.yaml: the phases config (--template, default configs/demo.yaml)
            with ddir, split and rundir pointing into DDIR and the background size "all" replaced
            by the number of background images
  table     read the phases' results (DDIR/runs/results/diffusion.json) and chosen parameters,
            write the demo's Markdown table (--out, default results/demo.md: top-5 accuracy,
            mean +- std over seeds, all and novel classes, chance level) and plot (--png)

Example (what run_demo.bash runs):
  python demo.py fetch --ddir demo_ddir && python demo.py prepare --ddir demo_ddir
"""
import argparse
import os

from lowshot import demo
from lowshot.common import HelpFormatter, get_ddir, log, print_args, print_result, run_main

ROOT = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("command", choices=["fetch", "prepare", "config", "table"])
    g = p.add_argument_group("data")
    g.add_argument("--ddir", default=None, help="the demo's data root (default: $DDIR)")
    g.add_argument("--npm", default="npm", help="fetch: the npm executable")
    g = p.add_argument_group("prepare (defaults: the full demo; smaller values for quick runs)")
    g.add_argument("--seed", type=int, default=0, help="seed of the class and emoji splits")
    g.add_argument("--nclass", type=int, default=None, help="use this many classes (default: all)")
    g.add_argument("--sizes", default=None,
                   help="group sizes val-base,val-novel,test-base,test-novel (default: equal)")
    g.add_argument("--max_test_per_class", type=int, default=demo.MAX_TEST_PER_CLASS)
    g.add_argument("--max_train_per_class", type=int, default=None)
    g.add_argument("--max_background", type=int, default=None)
    g.add_argument("--min_novel_train", type=int, default=demo.MIN_NOVEL_TRAIN,
                   help="training images a novel class needs (the largest n)")
    g = p.add_argument_group("config")
    g.add_argument("--template", default=os.path.join(ROOT, "configs", "demo.yaml"))
    g.add_argument("--config_out", default=None, help="default: DDIR/phases.yaml")
    g = p.add_argument_group("table")
    g.add_argument("--out", default=os.path.join(ROOT, "results", "demo.md"))
    g.add_argument("--png", default=os.path.join(ROOT, "results", "demo.png"))
    g.add_argument("--title", default="emoji demo")
    g.add_argument("--readme", default=None,
                   help="also copy the table into this README between its demo-table markers")
    args = p.parse_args(argv)
    print_args(args)
    if args.command == "fetch":
        ddir = get_ddir(args.ddir, must_exist=False)
        demo.fetch(ddir, npm=args.npm)
        result = {"npm_dir": demo.npm_paths(ddir)["dir"]}
    elif args.command == "prepare":
        ddir = get_ddir(args.ddir)
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        log("preparing the demo's lists and class split in %s" % ddir)
        result = demo.prepare(ddir, seed=args.seed, nclass=args.nclass, sizes=sizes,
                              max_test_per_class=args.max_test_per_class,
                              max_train_per_class=args.max_train_per_class,
                              max_background=args.max_background,
                              min_novel_train=args.min_novel_train)
    elif args.command == "config":
        ddir = get_ddir(args.ddir)
        out = args.config_out or os.path.join(ddir, "phases.yaml")
        demo.write_phases_config(ddir, args.template, out)
        result = {"config": out}
    else:
        ddir = get_ddir(args.ddir)
        res = demo.write_table(ddir, args.out, args.png, title=args.title)
        result = {k: res[k] for k in ("out", "png", "chance", "missing")}
        if args.readme:
            demo.copy_table_to_readme(args.out, args.readme)
            result["readme"] = args.readme
    print_result(dict(result, command=args.command))


if __name__ == "__main__":
    run_main(main)
