"""Build the k-NN graph of the first N background vectors (stage 3 of the paper's pipeline).

Reads   $DDIR/features/f100m/concatenated_PCAR256.raw   raw float32 (>= N, d) row-major; the first
        N rows are the background set F{N} (d from $DDIR/features/PCAR256.vt, 256 for the paper)
Writes  $DDIR/knngraph/ndis{N}.index                    faiss index of the L2-normalised rows
        $DDIR/knngraph/ndis{N}_k{K}_I_11.int32          raw (N, K) int32 neighbour ids in 0..N-1
        $DDIR/knngraph/ndis{N}_k{K}_D_11.float32        raw (N, K) float32 inner products, decreasing
        $DDIR/knngraph/ndis{N}_k{K}.json                how it was built (method, parameters, recall, time):
                                                        a stored graph is reused only for these
K = smallest power of two >= --k (32 by default; diffusion.py with k=30 reads K=32, and any
stored K' >= k serves a smaller k). Vectors are L2-normalised and compared by inner product. Every
file is written under a temporary name and renamed when complete.

ivf on CPU (the default above 50k) is resumable and splits into array tasks (lowshot/ivf_build.py):
its work goes to $DDIR/knngraph/ndis{N}_k{K}.work/ (trained lists, then the table by chunks of rows);
a killed build run again continues from its last completed chunk and ends with the same bytes. On
a cluster:
  python build_graph.py N --prepare                # one task: k-means, probes, lists (python -m lowshot.plan N)
  python build_graph.py N --shard $i/$S            # S array tasks, i = 0 .. S-1: the table's chunks
  python build_graph.py N                          # merges (and computes any chunk still missing)

Methods (--method; default: exact up to 50k vectors, IVF above on CPU; exact up to 1M,
IVF above with GPUs, which faiss uses when it sees any). The index is stored for diffusion.py,
which searches it with the labelled and test images: NN-descent's index does that poorly (recall@10
0.57 at 100k generated vectors against 0.97 for IVF and 0.98 for HNSW), so it is never the default:
  exact      IndexFlatIP, exact search
  ivf        IndexIVFFlat; CPU: 4*sqrt(N) lists, each vector's search visits enough lists to scan
             about 16000 vectors at 1M, times (N/1M)^(1/6) above (64 of 4000 lists at 1M, 30 of
             12649 at 10M), computed list by list, in bfloat16 with an
             exact float32 re-score where the CPU has AVX512-BF16 (see docs/scale.md); GPUs:
             4*sqrt(N) lists, nprobe 256 (the 2018 original)
  hnsw       IndexHNSWFlat, M=32, efSearch=64 (1M: 233 s, recall@10 0.910)
  nndescent  IndexNNDescentFlat: the graph comes from NN-descent itself (fast, good graph; its
             stored index is poor for external queries)
The log reports recall@10 against exact search on a sample of --recall_nq vectors.

Example:
  python build_graph.py 1000000 --ddir $DDIR
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
import argparse
import os
import time

import faiss

from lowshot import data
from lowshot import graph
from lowshot import ivf_build
from lowshot import search
from lowshot import stored_graph
from lowshot import torch_backend
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, OwnMemoryPeak, file_lock, get_ddir,
                            int_at_least, log, nonnegative_int, positive_int, print_args, print_result,
                            remove_stale_temporaries, run_main)


def parse_shard(text):
    """``i/S`` -> (i, S), 0 <= i < S."""
    try:
        i, S = (int(t) for t in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected i/S, e.g. 3/16, got %r" % text)
    if not 0 <= i < S:
        raise argparse.ArgumentTypeError("shard %d/%d: need 0 <= i < S" % (i, S))
    return i, S


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("N", type=int_at_least(2), help="number of background vectors (the first N rows)")
    g = p.add_argument_group("data")
    g.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    g.add_argument("--force", action="store_true", help="rebuild even when a usable graph exists")
    g = p.add_argument_group("graph")
    g.add_argument("--k", type=positive_int, default=32, help="neighbours needed; K = next power of two")
    g.add_argument("--method", choices=graph.METHODS, default=None,
                   help="search method (default: chosen by N and GPUs, see above)")
    g.add_argument("--bs", type=positive_int, default=search.SEARCH_BS, help="rows searched per block")
    g.add_argument("--device", choices=torch_backend.DEVICES, default="auto",
                   help="auto: torch on CUDA if torch sees a GPU, else CPU, and faiss-gpu for faiss' searches if "
                        "faiss sees GPUs; cpu: graph_utils only; cuda: torch on the GPU; torch-cpu: the torch code on the CPU")
    g = p.add_argument_group("resumable ivf build (CPU)")
    g.add_argument("--prepare", action="store_true",
                   help="only train the lists and find the probes (then --shard tasks, then a plain run)")
    g.add_argument("--shard", type=parse_shard, default=None, metavar="i/S",
                   help="compute only the table chunks of shard i of S (i = 0..S-1), no merge")
    g.add_argument("--chunk_rows", type=positive_int, default=None,
                   help="rows per chunk, the unit of resumption (default: about N/8, 2^17..2^20)")
    g.add_argument("--precision", choices=("auto", "bf16", "float32"), default="auto",
                   help="product of the table scan: bf16 with exact re-score (auto: where the CPU has "
                        "AVX512-BF16), or float32 BLAS (exactly faiss' IVF search)")
    g = p.add_argument_group("method parameters")
    g.add_argument("--nlist", type=positive_int, default=None,
                   help="ivf: lists (default %d*sqrt(N) on CPU, 4*sqrt(N) with GPUs)" % ivf_build.IVF_LISTS_PER_SQRT)
    g.add_argument("--nprobe", type=positive_int, default=None,
                   help="ivf: lists visited (default: enough to scan %d vectors on CPU, times (N/1M)^(1/6) above 1M; 256 with GPUs)"
                   % ivf_build.IVF_SCAN)
    # faiss aborts the process on M < 2 (an assertion, not an exception): refused here
    g.add_argument("--hnsw_M", type=int_at_least(2), default=32, help="hnsw: links per vector")
    g.add_argument("--ef_search", type=positive_int, default=64, help="hnsw: efSearch")
    g.add_argument("--ef_construction", type=positive_int, default=40, help="hnsw: efConstruction")
    g.add_argument("--nnd_iter", type=positive_int, default=10, help="nndescent: iterations")
    g.add_argument("--nnd_L", type=positive_int, default=None, help="nndescent: candidate pool size (>= K)")
    g = p.add_argument_group("check")
    g.add_argument("--recall_nq", type=nonnegative_int, default=1000,
                   help="vectors sampled to measure recall@10 against exact search (0: skip)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    ddir = get_ddir(args.ddir)
    backend = torch_backend.select(args.device)
    K = stored_graph.graph_K(args.k)
    xb = data.open_background(ddir, args.N)
    log("background %s: %d x %d" % (data.feature_paths(ddir)["background"], *xb.shape))
    if K >= args.N:
        raise InputError("K = %d neighbours need more than N = %d background vectors" % (K, args.N))
    if args.nlist is not None and args.nlist > args.N:
        raise InputError("--nlist %d: more lists than the N = %d background vectors" % (args.nlist, args.N))
    if args.nlist is not None and args.nprobe is not None and args.nprobe > args.nlist:
        raise InputError("--nprobe %d: more than the --nlist %d lists" % (args.nprobe, args.nlist))
    if args.nnd_L is not None and args.nnd_L < K:
        raise InputError("--nnd_L %d: NN-descent needs a candidate pool of at least K = %d" % (args.nnd_L, K))
    paths = stored_graph.graph_paths(ddir, args.N, K)
    # two runs on the same graph take turns (the second then finds the first one's graph); the
    # shards of one build share the lock, the prepare step and the merge hold it alone
    with file_lock(paths["lock"], "build_graph.py %d" % args.N, shared=args.shard is not None):
        build(args, ddir, xb, K, paths, backend)


def build(args, ddir, xb, K, paths, backend):
    """The graph of ``main``'s checked arguments, under the lock: reused when it exists, else built."""
    if os.path.isdir(os.path.dirname(paths["I"])):
        for p in remove_stale_temporaries(os.path.dirname(paths["I"])):
            log("removed %s (its writer is gone)" % p)
    method = args.method or graph.default_method(args.N, backend)
    resumable = method == "ivf" and backend.faiss_gpus == 0
    if (args.shard or args.prepare) and not resumable:
        raise InputError("--shard and --prepare need the CPU ivf method (method %s, %d GPUs)" % (
            method, backend.faiss_gpus))
    try:
        in_progress = resumable and ivf_build.read_plan(paths["work"]) is not None
    except ivf_build.DamagedWork:
        in_progress = True       # ivf_build.build redoes what it must
    if in_progress:
        log("a build is in progress in %s: continuing it" % paths["work"])
    if not args.force and not in_progress:
        explicit = stored_graph.explicit_params(args, vars(parse_args([str(args.N)])))
        found = stored_graph.reusable_graph(ddir, args.N, K, explicit)
        if found is not None:
            idx_path, K_stored, record = found
            log("a graph with K = %d >= %d exists (%s), %s: nothing to do (--force rebuilds)" % (
                K_stored, K, idx_path, stored_graph.describe(record)))
            print_result({"script": "build_graph", "nbg": args.N, "K": K_stored,
                          "index": idx_path, "reused": True, "built_with": record})
            return
    log("method %s, K = %d, %s, %d faiss GPUs, %d threads" % (
        method, K, backend.describe(), backend.faiss_gpus, faiss.omp_get_max_threads()))
    own = OwnMemoryPeak()
    t0 = time.time()
    stats = graph.build_background_graph(
        xb, K, paths, method=method, bs=args.bs, nlist=args.nlist, nprobe=args.nprobe, hnsw_M=args.hnsw_M,
        ef_search=args.ef_search, ef_construction=args.ef_construction, nnd_iter=args.nnd_iter,
        nnd_L=args.nnd_L, record=lambda st: stored_graph.build_record(method, args, st),
        build_params={"bf16": {"auto": None, "bf16": True, "float32": False}[args.precision],
                      "chunk_rows": args.chunk_rows, "shard": args.shard, "prepare_only": args.prepare,
                      "force": args.force} if resumable else None, backend=backend)
    stats["time_total"] = time.time() - t0
    stats["backend"] = backend.describe()
    stats["own_peak_gib"] = round(own.gib, 3)     # anonymous pages: mapped files' page cache left out
    if not stats.get("done", True):
        log("%s: not merged (%s); a plain `build_graph.py %d` merges once every chunk exists" % (
            paths["work"], "prepared" if args.prepare else "shard %d/%d done" % args.shard, args.N))
        print_result({"script": "build_graph", "reused": False, **stats})
        return
    log("graph written: %s, %s, %s (%.1f s)" % (paths["I"], paths["D"], paths["index"],
                                               stats["time_total"]))
    if args.recall_nq > 0:
        check_recall(args, ddir, xb, K, paths, stats, backend)
    stored_graph.write_record(paths, stored_graph.build_record(method, args, stats))
    print_result({"script": "build_graph", "reused": False, **stats,
                  "index": paths["index"], "I": paths["I"], "D": paths["D"]})


def check_recall(args, ddir, xb, K, paths, stats, backend):
    """recall@10 of the graph just written, and for a bf16 table its agreement with faiss' float32
    search of the stored index, into ``stats``."""
    log("recall@10 against exact search on %d sampled vectors" % args.recall_nq)
    Imm = stored_graph.find_background_graph(ddir, args.N, K)[2]
    stats["recall@10"] = graph.graph_recall(xb, Imm, nq=args.recall_nq, at=10, backend=backend)
    log("recall@10 = %.4f" % stats["recall@10"])
    if stats.get("precision") == "bf16":
        # the table against faiss' own float32 search of the stored index
        index = stored_graph.read_background_index(paths["index"], args.N, xb.shape[1], backend=backend)
        same, shared = graph.ivf_agreement(index, xb, Imm, nq=args.recall_nq)
        del index
        stats["rows_equal_to_float32_search"] = same
        log("bf16 table against faiss' float32 search of the index on %d rows: %.2f%% of the rows "
            "equal, %.4f of the ids shared" % (args.recall_nq, 100 * same, shared))


if __name__ == "__main__":
    run_main(main)
