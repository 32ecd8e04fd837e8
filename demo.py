"""The emoji demo's own steps (run_demo.bash calls them between the paper's stages).

Subcommands (DDIR = --ddir or $DDIR; run_demo.bash uses demo_ddir/ at the repository root):

  fetch     `npm pack emoji-datasource-{google,twitter}@16.0.0` into DDIR/npm (skipped when the
            tarballs are there), extract emoji.json and img/<vendor>/64/*.png (64x64 PNG) from them
  prepare   choose the classes (Unicode subcategories with >= 10 emoji, country-flag excluded: 57)
            and lay them out as own_data.py's input, symbolic links to the fetched images:
              DDIR/images/<subcategory>/<emoji>__<vendor>__<file>.png   the class folders
              DDIR/unlabelled/<vendor>__<file>.png    the other subcategories' emoji (background)
              DDIR/demo_meta.json                     what was chosen
            (run_demo.bash then runs own_data.py on them: split by emoji identity, features,
            PCA, graph, phases config)
  table     read the phases' results (DDIR/runs/results/diffusion.json) and chosen parameters,
            write the demo's Markdown table (--out, default results/demo.md: top-5 accuracy, then
            top-1, mean +- std over seeds, all and novel classes, chance level) and plot (--png)

Example (what run_demo.bash runs):
  python demo.py fetch --ddir demo_ddir && python demo.py prepare --ddir demo_ddir
  python own_data.py demo_ddir --images demo_ddir/images --unlabelled demo_ddir/unlabelled \
      --group '^(.+?)__' ...            (the flags are in run_demo.bash)
"""
import argparse
import os

from lowshot import demo
from lowshot.common import HelpFormatter, get_ddir, log, print_args, print_result, run_main

ROOT = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("command", choices=["fetch", "prepare", "table"])
    g = p.add_argument_group("data")
    g.add_argument("--ddir", default=None, help="the demo's data root (default: $DDIR)")
    g.add_argument("--npm", default="npm", help="fetch: the npm executable")
    g = p.add_argument_group("prepare (defaults: the full demo; smaller values for quick runs)")
    g.add_argument("--seed", type=int, default=0, help="seed of the choice of classes and background")
    g.add_argument("--nclass", type=int, default=None, help="use this many classes (default: all)")
    g.add_argument("--max_background", type=int, default=None, help="keep this many background images")
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
        log("laying out the demo's classes and background in %s" % ddir)
        result = demo.prepare(ddir, seed=args.seed, nclass=args.nclass, max_background=args.max_background)
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
