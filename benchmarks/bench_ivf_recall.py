"""Recall of IVF searches of the background by its own vectors, against exact search, on a sample:
how many lists to visit (--nprobe) and how many lists to make (--nlists).

Reads   $DDIR/features/f100m/concatenated_PCAR256.raw (first --nbg rows), and for the nprobe sweep
        the stored index $DDIR/knngraph/ndis{nbg}.index (build_graph.py; memory-mapped)
Prints  one line per setting: recall@10 and the (query, vector) pairs scanned per query

Each setting is faiss' own float32 search (the table build_graph.py computes list by list gives the
same neighbours). --nlists trains a new IVF (faiss k-means, 64 vectors per list) per value and
searches it at --scan vectors per query (nominal: nprobe = scan * nlist / nbg).

Example (the numbers of benchmarks/README.md, 2 cores):
  python benchmarks/bench_ivf_recall.py --ddir /tmp/f10m --nbg 10000000 --nprobes 14,21,28
  python benchmarks/bench_ivf_recall.py --ddir /tmp/f1m --nbg 1000000 --nlists 2000,4000,8000 --scan 12000
"""
import argparse
import time


import numpy as np

from lowshot import data, graph, search, stored_graph
from lowshot.common import get_ddir, log, print_args


def sweep(index, xq, Igt, nprobes):
    sizes = np.array([index.invlists.list_size(c) for c in range(index.nlist)])
    _, P = index.quantizer.search(xq, max(nprobes))
    for p in nprobes:
        index.nprobe = p
        _, I = index.search(xq, 10)
        rec = search.recall_at(I, Igt, 10)
        print("nlist %d nprobe %d: recall@10 %.4f, pairs/query %.0f" % (
            index.nlist, p, rec, sizes[P[:, :p]].sum(1).mean()), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    p.add_argument("--nbg", type=int, default=1000000, help="background vectors")
    p.add_argument("--nq", type=int, default=1000, help="sampled background vectors (queries)")
    p.add_argument("--nprobes", default=None, help="comma-separated nprobe values for the stored index")
    p.add_argument("--nlists", default=None, help="comma-separated list counts to train and compare")
    p.add_argument("--scan", type=int, default=12000, help="--nlists: nominal vectors scanned per query")
    args = p.parse_args()
    print_args(args)
    ddir = get_ddir(args.ddir)
    xb = data.open_background(ddir, args.nbg)
    rs = np.random.RandomState(0)
    xq = search.normalized(xb[np.sort(rs.choice(args.nbg, args.nq, replace=False))])
    t0 = time.time()
    _, Igt, _ = search.exact_search(xq, xb, 10, raw_base=True)
    log("exact search of %d queries: %.1f s" % (args.nq, time.time() - t0))
    if args.nprobes:
        index = stored_graph.read_background_index(stored_graph.graph_paths(ddir, args.nbg, 32)["index"], args.nbg, xb.shape[1])
        sweep(index, xq, Igt, [int(v) for v in args.nprobes.split(",")])
    for nlist in [int(v) for v in args.nlists.split(",")] if args.nlists else []:
        index = graph.make_background_index(xb, "ivf", nlist=nlist)
        sweep(index, xq, Igt, [max(1, round(args.scan * nlist / args.nbg))])


if __name__ == "__main__":
    main()
