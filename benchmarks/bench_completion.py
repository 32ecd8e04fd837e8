"""Graph completion: the exact searches with their cache against the IVF shortcut, end to end.

Runs ``diffusion.py`` in subprocesses on a data root whose background graph is built, one after
the other (never two at once), for the same protocol (--mode, n = --nlabeled, --seed):
  1. ivf:          --node_index ivf --completion_cache off (the background -> labelled search in an
                   IVF over the labelled set, nprobe 16: the previous default above 2e9 pairs)
  2. exact, cold:  the completion cache is removed first: this run computes it (one-off cost)
  3. exact, warm:  the same run again, reading the cache (what every later run of the split costs)
  4. exact, other seed: another draw of labelled novel images, same cache
and prints one line each: total time, graph completion time, top-5 (all / novel), peak memory.

Example (the numbers of benchmarks/README.md, 2 cores; an ImageNet-sized labelled set, ~250k base images):
  python generate_ddir.py /tmp/f1m_in --nbg 1000000 --ntrain 1280
  python build_graph.py 1000000 --ddir /tmp/f1m_in
  python benchmarks/bench_completion.py --ddir /tmp/f1m_in --nbg 1000000
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lowshot.common import get_ddir, log, print_args


def run(args, ddir, seed, extra):
    cmd = [sys.executable, os.path.join(ROOT, "diffusion.py"), "--ddir", ddir, "--mode", args.mode,
           "--nlabeled", str(args.nlabeled), "--seed", str(seed), "--k", str(args.k), "--nbg", str(args.nbg),
           "--niter", str(args.niter), "--split", args.split or os.path.join(ddir, "label_idx.json")] + extra
    log("running: %s" % " ".join(cmd))
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("diffusion.py failed:\n" + r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t0, 2)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    p.add_argument("--split", default=None, help="class split (default: $DDIR/label_idx.json)")
    p.add_argument("--nbg", type=int, default=1000000)
    p.add_argument("--mode", default="test", choices=["val", "test"])
    p.add_argument("--nlabeled", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--niter", type=int, default=3)
    p.add_argument("--skip_ivf", action="store_true", help="only the exact runs")
    args = p.parse_args()
    print_args(args)
    ddir = get_ddir(args.ddir)
    runs = []
    if not args.skip_ivf:
        runs.append(("ivf nprobe 16, no cache", args.seed, ["--node_index", "ivf", "--completion_cache", "off"]))
    runs += [("exact, cache computed", args.seed, []), ("exact, cache read", args.seed, []),
             ("exact, cache read, seed+1", args.seed + 1, [])]
    out = []
    for name, seed, extra in runs:
        if name == "exact, cache computed":
            shutil.rmtree(os.path.join(ddir, "cache", "completion"), ignore_errors=True)
        res = run(args, ddir, seed, extra)
        row = {"run": name, "seed": seed, "time_total": res["time_total"],
               "graph_completion": res["times"]["graph_completion"], "top5": round(res["top5"], 4),
               "top5_novel": round(res["top5_novel"], 4), "own_peak_gib": res["own_peak_gib"],
               "peak_rss_gib": res["peak_rss_gib"], "graph": res["graph"]}
        out.append(row)
        print(json.dumps(row), flush=True)
    print("| run | total s | completion s | top-5 | novel top-5 | own GiB |")
    print("|---|---|---|---|---|---|")
    for r in out:
        print("| %s | %.1f | %.1f | %.4f | %.4f | %.2f |" % (r["run"], r["time_total"], r["graph_completion"],
                                                          r["top5"], r["top5_novel"], r["own_peak_gib"]))


if __name__ == "__main__":
    main()
