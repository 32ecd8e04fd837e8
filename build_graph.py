"""Build the k-NN graph of the first N background vectors (stage 3 of the paper's pipeline).

Reads   $DDIR/features/f100m/concatenated_PCAR256.raw   raw float32 (>= N, d) row-major; the first
        N rows are the background set F{N} (d from $DDIR/features/PCAR256.vt, 256 for the paper)
Writes  $DDIR/knngraph/ndis{N}.index                    faiss index of the L2-normalised rows
        $DDIR/knngraph/ndis{N}_k{K}_I_11.int32          raw (N, K) int32 neighbour ids in 0..N-1
        $DDIR/knngraph/ndis{N}_k{K}_D_11.float32        raw (N, K) float32 inner products, decreasing
K = smallest power of two >= --k (32 by default; diffusion.py with k=30 reads K=32, and any
stored K' >= k serves a smaller k). Vectors are L2-normalised and compared by inner product. The
tables are written under temporary names (block by block, or for ivf on CPU through a memory map
of the file: never a second (N, K) copy in RAM) and renamed when complete.

Methods (--method; default: exact up to 50k vectors, IVF above on CPU; exact up to 1M,
IVF above with GPUs, which faiss uses when it sees any). The index is stored for diffusion.py,
which searches it with the labelled and test images: NN-descent's index does that poorly (recall@10
0.57 at 100k generated vectors against 0.97 for IVF and 0.98 for HNSW), so it is never the default:
  exact      IndexFlatIP, exact search
  ivf        IndexIVFFlat; CPU: 2*sqrt(N) lists, each vector's search visits enough lists to scan
             about 12000 vectors (24 of 2000 at 1M), computed list by list with BLAS (1M: 143 s,
             recall@10 0.968 on 2 cores); GPUs: 4*sqrt(N) lists, nprobe 256 (the 2018 original)
  hnsw       IndexHNSWFlat, M=32, efSearch=64 (1M: 233 s, recall@10 0.910)
  nndescent  IndexNNDescentFlat: the graph comes from NN-descent itself (fast, good graph; its
             stored index is poor for external queries)
The log reports recall@10 against exact search on a sample of --recall_nq vectors.

Example:
  python build_graph.py 1000000 --ddir $DDIR
"""
import argparse
import time

import faiss

from lowshot import data
from lowshot import graph
from lowshot.common import (InputError, get_ddir, log, print_args, print_result, run_main)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("N", type=int, help="number of background vectors (the first N rows)")
    g = p.add_argument_group("data")
    g.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    g.add_argument("--force", action="store_true", help="rebuild even when a usable graph exists")
    g = p.add_argument_group("graph")
    g.add_argument("--k", type=int, default=32, help="neighbours needed; K = next power of two")
    g.add_argument("--method", choices=graph.METHODS, default=None,
                   help="search method (default: chosen by N and GPUs, see above)")
    g.add_argument("--bs", type=int, default=graph.SEARCH_BS, help="rows searched per block")
    g = p.add_argument_group("method parameters")
    g.add_argument("--nlist", type=int, default=None,
                   help="ivf: lists (default %d*sqrt(N) on CPU, 4*sqrt(N) with GPUs)" % graph.IVF_LISTS_PER_SQRT)
    g.add_argument("--nprobe", type=int, default=None,
                   help="ivf: lists visited (default: enough to scan %d vectors on CPU, 256 with GPUs)"
                   % graph.IVF_SCAN)
    g.add_argument("--hnsw_M", type=int, default=32, help="hnsw: links per vector")
    g.add_argument("--ef_search", type=int, default=64, help="hnsw: efSearch")
    g.add_argument("--ef_construction", type=int, default=40, help="hnsw: efConstruction")
    g.add_argument("--nnd_iter", type=int, default=10, help="nndescent: iterations")
    g.add_argument("--nnd_L", type=int, default=None, help="nndescent: candidate pool size")
    g = p.add_argument_group("check")
    g.add_argument("--recall_nq", type=int, default=1000,
                   help="vectors sampled to measure recall@10 against exact search (0: skip)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    ddir = get_ddir(args.ddir)
    if args.N < 2:
        raise InputError("N = %d: a graph needs at least 2 background vectors" % args.N)
    K = graph.graph_K(args.k)
    xb = data.open_background(ddir, args.N)
    log("background %s: %d x %d" % (data.feature_paths(ddir)["background"], *xb.shape))
    if K >= args.N:
        raise InputError("K = %d neighbours need more than N = %d background vectors" % (K, args.N))
    paths = data.graph_paths(ddir, args.N, K)
    if not args.force:
        try:
            idx_path, D, I = graph.find_background_graph(ddir, args.N, K, data.graph_paths)
            log("a graph with K = %d >= %d exists (%s): nothing to do (--force rebuilds)" % (
                I.shape[1], K, idx_path))
            print_result({"script": "build_graph", "nbg": args.N, "K": int(I.shape[1]),
                          "index": idx_path, "reused": True})
            return
        except InputError:
            pass
    method = args.method or graph.default_method(args.N)
    log("method %s, K = %d, %d GPUs, %d threads" % (
        method, K, faiss.get_num_gpus(), faiss.omp_get_max_threads()))
    t0 = time.time()
    stats = graph.build_background_graph(
        xb, K, paths, method=method, bs=args.bs, nlist=args.nlist, nprobe=args.nprobe, hnsw_M=args.hnsw_M,
        ef_search=args.ef_search, ef_construction=args.ef_construction, nnd_iter=args.nnd_iter,
        nnd_L=args.nnd_L)
    stats["time_total"] = time.time() - t0
    log("graph written: %s, %s, %s (%.1f s)" % (paths["I"], paths["D"], paths["index"],
                                               stats["time_total"]))
    if args.recall_nq > 0:
        log("recall@10 against exact search on %d sampled vectors" % args.recall_nq)
        Imm = graph.find_background_graph(ddir, args.N, K, data.graph_paths)[2]
        stats["recall@10"] = graph.graph_recall(xb, Imm, nq=args.recall_nq, at=10)
        log("recall@10 = %.4f" % stats["recall@10"])
    print_result({"script": "build_graph", "reused": False, **stats,
                  "index": paths["index"], "I": paths["I"], "D": paths["D"]})


if __name__ == "__main__":
    run_main(main)
