"""Benchmark of the diffusion's sparse x dense product W @ L and of building W from a k-NN table.

Everything is generated in memory (nothing is read or written except --result). For every N of --configs
it builds one graph W = row-normalised (W0 + W0^T) in three numberings: "local" (neighbours have nearby
ids), "random" (the same graph randomly renumbered) and "bfs" (the random one reordered by
graph_utils.locality_order). --graph band: the k-NN table links each node to ids within +-window;
--graph clustered: the k-NN table (faiss IVF) of points from a Gaussian mixture in random order, as
image features come, "local" being the order of their IVF lists. For every N:C of --configs it times, on each numbering, W @ L with L (N, C) float32:
  scipy     scipy.sparse csr @ dense, 1 thread (the baseline, ratio 1.0)
  torch     torch.sparse CSR @ dense (torch's threads = OMP threads)
  mkl       MKL inspector-executor alone: graph_utils.MklSpmm analysed once, executor timed
  mkl_call  graph_utils.spmm(kernel="mkl"): analysis + product in every call
            (mkl and mkl_call need a build with MKL, graph_utils.has_mkl(); the default leaves them
            out otherwise)
  hand      graph_utils.spmm(kernel="hand"): the hand-written OpenMP kernel
Each time is the best of --repeat runs after one warm-up. GB/s counts the bytes a product must move
when the gathered rows of L miss the caches: 8 bytes per entry of W (id + value) + 4 C bytes per entry
(the gathered row of L) + 4 C bytes per row of the result; "%bw" compares it with the machine's read
bandwidth measured first (threaded numpy sums over 1 GiB).
Finally it times "k-NN table -> W" at N = --graph_n against scipy (W0 + W0.T, row normalisation).

Example: python benchmarks/bench_spmm.py --configs 100000:100,100000:1000,1000000:100 --result /tmp/spmm.json
"""
import argparse
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

import graph_utils
from lowshot.common import InputError, log, print_args, print_result, run_main, write_json

METHODS = ("scipy", "torch", "mkl", "mkl_call", "hand")
MKL_METHODS = ("mkl", "mkl_call")


def best_time(f, repeat):
    f()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def read_bandwidth(nthreads, nbytes=1 << 30, repeat=3):
    """Read bandwidth in GB/s: nthreads numpy sums (which release the GIL) over one array of nbytes."""
    x = np.ones(nbytes // 4, np.float32)
    chunks = np.array_split(x, nthreads)
    with ThreadPoolExecutor(nthreads) as pool:
        t = best_time(lambda: list(pool.map(np.sum, chunks)), repeat)
    return nbytes / t / 1e9


def band_knn(n, k, window, rs):
    """k-NN table whose neighbours are nearby ids (|i - j| <= window): the "local" numbering."""
    return (np.arange(n)[:, None] + rs.randint(-window, window + 1, size=(n, k))) % n, None


def clustered_knn(n, k, rs, d=32, nclusters=None):
    """k-NN table of points drawn from a Gaussian mixture (a stand-in for image features), found with
    a faiss IVF index; also returns each point's IVF list, whose order is the "local" numbering."""
    import faiss
    nclusters = nclusters or max(10, n // 100)
    centroids = 2 * rs.randn(nclusters, d).astype(np.float32)
    x = centroids[rs.randint(0, nclusters, n)] + rs.randn(n, d).astype(np.float32)
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, int(2 * np.sqrt(n)))
    index.train(x[rs.choice(n, min(n, 50 * index.nlist), replace=False)])
    index.add(x)
    index.nprobe = 4
    _, I = index.search(x, k + 1)
    _, lists = quantizer.search(x, 1)
    return I[:, 1:], np.argsort(lists.ravel(), kind="stable")


def make_graphs(n, k, kind, window, rs):
    """W in a locality-preserving numbering, randomly renumbered, and that one reordered by BFS.

    kind "band": neighbours within +-window ids (generated local, then shuffled); kind "clustered":
    a real k-NN graph of clustered points in generation (random) order, made local by IVF list order.
    """
    if kind == "band":
        I, _ = band_knn(n, k, window, rs)
        local = graph_utils.knn_to_graph(I, n)
        shuffled = graph_utils.permute(local, rs.permutation(n))
    else:
        I, ivf_order = clustered_knn(n, k, rs)
        shuffled = graph_utils.knn_to_graph(I, n)
        local = graph_utils.permute(shuffled, ivf_order)
    t0 = time.perf_counter()
    perm = graph_utils.locality_order(shuffled)
    bfs = graph_utils.permute(shuffled, perm)
    t_order = time.perf_counter() - t0
    return {"local": local, "random": shuffled, "bfs": bfs}, t_order


def bench_products(W, C, repeat, methods, rs):
    n = W.shape[0]
    L = rs.rand(n, C).astype(np.float32)
    out = np.empty((n, C), np.float32)
    times = {}
    Ws = W.to_scipy()
    if "scipy" in methods:
        with threadpool_limits(1):
            times["scipy"] = best_time(lambda: Ws @ L, repeat)
    if "torch" in methods:
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # beta-state / invariant-check notices
        Wt = torch.sparse_csr_tensor(torch.from_numpy(W.indptr), torch.from_numpy(W.indices.astype(np.int64)),
                                     torch.from_numpy(W.data), size=W.shape)
        Lt = torch.from_numpy(L)
        times["torch"] = best_time(lambda: Wt @ Lt, repeat)
    if "mkl" in methods:
        plan = graph_utils.MklSpmm(W, C, expected_calls=repeat + 1)
        times["mkl"] = best_time(lambda: plan(L, out), repeat)
    if "mkl_call" in methods:
        times["mkl_call"] = best_time(lambda: graph_utils.spmm(W, L, out, kernel="mkl"), repeat)
    if "hand" in methods:
        times["hand"] = best_time(lambda: graph_utils.spmm(W, L, out, kernel="hand"), repeat)
    return times


def bench_graph(n, k, repeat, rs):
    I = rs.randint(0, n, size=(n, k)).astype(np.int64)

    def scipy_graph():
        W0 = sp.csr_matrix((np.ones(n * k, np.float32), I.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
        W0.sum_duplicates()
        W0.data[:] = 1
        W = (W0 + W0.T).tocsr()
        return sp.diags(1 / np.asarray(W.sum(axis=1)).ravel()) @ W

    with threadpool_limits(1):
        t_scipy = best_time(scipy_graph, repeat)
    t_gu = best_time(lambda: graph_utils.knn_to_graph(I, n), repeat)
    return {"scipy": t_scipy, "graph_utils": t_gu}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("sparse x dense product")
    group.add_argument("--configs", default="100000:100,100000:1000,1000000:100",
                       help="comma-separated N:C (graph nodes : columns of L)")
    group.add_argument("--k", type=int, default=30, help="neighbours per node of the k-NN table")
    group.add_argument("--graph", choices=["band", "clustered"], default="band",
                       help="band: neighbours within +-window ids; clustered: faiss k-NN of a Gaussian mixture")
    group.add_argument("--window", type=int, default=5000, help="band graph: neighbour ids within +-window")
    group.add_argument("--orders", default="local,random,bfs", help="node numberings to time")
    group.add_argument("--methods", default=",".join(m for m in METHODS if graph_utils.has_mkl() or m not in MKL_METHODS),
                       help="comma-separated, among %s (default: those this build has)" % ",".join(METHODS))
    group.add_argument("--max_scipy_work", type=float, default=1e10,
                       help="skip scipy and torch when nnz(W) * C exceeds this (they take minutes there)")
    group.add_argument("--repeat", type=int, default=3)
    group.add_argument("--prefetch", type=int, help="prefetch distance of the hand kernel (default: the library's)")
    group = parser.add_argument_group("k-NN table -> W")
    group.add_argument("--graph_n", type=int, default=1000000, help="N of the graph-building benchmark (0: skip)")
    group = parser.add_argument_group("output")
    group.add_argument("--result", help="also write the result JSON here")
    group.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print_args(args)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("--methods: unknown %s (known: %s)" % (",".join(unknown), ",".join(METHODS)))
    if not graph_utils.has_mkl() and set(methods) & set(MKL_METHODS):
        raise InputError("--methods %s: graph_utils was built without MKL (rebuild with mkl-devel installed: "
                         "LOWSHOT_MKL=on pip install --no-build-isolation -e .)" % ",".join(
                             m for m in methods if m in MKL_METHODS))
    rs = np.random.RandomState(args.seed)
    nt = graph_utils.max_threads()
    torch.set_num_threads(nt)
    if args.prefetch is not None:
        graph_utils.graph_utils_swig.set_prefetch_distance(args.prefetch)

    log("measuring read bandwidth with %d threads" % nt)
    bw = read_bandwidth(nt)
    log("read bandwidth %.1f GB/s" % bw)
    rows = []
    graphs_n = graphs = None
    for n, C in [(int(c.split(":")[0]), int(c.split(":")[1])) for c in args.configs.split(",") if c]:
        if n != graphs_n:
            graphs = None  # free the previous size's graphs first
            log("building %s graphs N=%d k=%d" % (args.graph, n, args.k))
            graphs, t_order = make_graphs(n, args.k, args.graph, args.window, rs)
            graphs_n = n
            log("locality_order + permute: %.2f s" % t_order)
        for order in args.orders.split(","):
            W = graphs[order]
            run = methods
            if W.nnz * C > args.max_scipy_work:
                run = [m for m in methods if m not in ("scipy", "torch")]
            log("N=%d C=%d %s nnz=%d: %s" % (n, C, order, W.nnz, " ".join(run)))
            times = bench_products(W, C, args.repeat, run, rs)
            nbytes = 8 * W.nnz + 4 * C * (W.nnz + n)
            row = {"N": n, "C": C, "order": order, "nnz": W.nnz, "seconds": times,
                   "GBps": {m: nbytes / t / 1e9 for m, t in times.items()}}
            if "scipy" in times:
                row["speedup_vs_scipy"] = {m: times["scipy"] / t for m, t in times.items()}
            rows.append(row)
            print("  " + "  ".join("%s %.3fs %.1fGB/s %.0f%%bw%s" % (
                m, t, row["GBps"][m], 100 * row["GBps"][m] / bw,
                " x%.1f" % row["speedup_vs_scipy"][m] if "scipy" in times else "")
                for m, t in times.items()), flush=True)
    result = {"script": "bench_spmm", "threads": nt, "mkl": graph_utils.has_mkl(), "read_bandwidth_GBps": bw, "spmm": rows}
    if args.graph_n:
        log("k-NN table -> W, N=%d k=%d" % (args.graph_n, args.k))
        g = bench_graph(args.graph_n, args.k, max(1, args.repeat - 1), rs)
        g["speedup"] = g["scipy"] / g["graph_utils"]
        print("  scipy %.2fs graph_utils %.2fs x%.1f" % (g["scipy"], g["graph_utils"], g["speedup"]), flush=True)
        result["knn_to_graph"] = dict(g, N=args.graph_n, k=args.k)
    if args.result:
        write_json(args.result, result)
    print_result(result)


if __name__ == "__main__":
    run_main(main)
