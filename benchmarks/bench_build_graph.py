"""Time the background-graph methods of build_graph.py and measure their recall@10.

Reads   $DDIR/features/f100m/concatenated_PCAR256.raw (first --nbg rows), d from PCAR256.vt
Writes  the graphs into a scratch folder (--tmpdir, removed afterwards); one JSON line per run

recall@10 = |graph's 10 nearest ∩ exact 10 nearest| / 10, on --recall_nq sampled vectors.
ivf: the table search is also timed with faiss' own per-query search on --faiss_nq rows,
extrapolated to the whole table ("faiss table s"; same index, same probed lists).
ext recall@10: the same for --ext_nq queries from OUTSIDE the background (test images of
features/val.hdf5 through PCAR256.vt, as diffusion.py searches them) in the stored index, read back
with faiss.read_index; "ext s" is that search's time.

Methods: build_graph.py's (exact, ivf, hnsw, nndescent), ivf_f32 (ivf with the float32 scan, as on
CPUs without AVX512-BF16), and pynndescent (the numba NN-descent package, not a dependency of the
project: `pip install pynndescent`; NNDescent(metric="dot", n_neighbors=K) on the normalised rows;
its JIT compilation is timed apart, on 2000 rows first, as "jit s").

Example (the numbers of benchmarks/README.md, 2 cores):
  python benchmarks/bench_build_graph.py --ddir /tmp/f1m --nbg 1000000 --methods ivf,ivf_f32,pynndescent
  python benchmarks/bench_build_graph.py --ddir /tmp/f1m --nbg 100000 --methods exact,ivf,hnsw,nndescent
"""
import argparse
import json
import os
import shutil
import tempfile
import time


import faiss
import h5py
import numpy as np

from lowshot import data, graph, search
from lowshot.common import get_ddir, log, peak_rss_gib, print_args


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    p.add_argument("--nbg", type=int, default=100000, help="background vectors")
    p.add_argument("--K", type=int, default=32, help="neighbours per vector")
    p.add_argument("--methods", default="exact,ivf,hnsw,nndescent", help="comma-separated")
    p.add_argument("--recall_nq", type=int, default=1000, help="vectors sampled for recall@10")
    p.add_argument("--nnd_iter", type=int, default=10, help="NN-descent iterations")
    p.add_argument("--nlist", type=int, default=None, help="ivf: lists (default: build_graph.py's)")
    p.add_argument("--nprobe", type=int, default=None, help="ivf: lists visited (default: build_graph.py's)")
    p.add_argument("--hnsw_M", type=int, default=32, help="hnsw: links per vector")
    p.add_argument("--ef_search", type=int, default=64, help="hnsw: efSearch")
    p.add_argument("--ef_construction", type=int, default=40, help="hnsw: efConstruction")
    p.add_argument("--ext_nq", type=int, default=1000, help="external queries (val.hdf5 rows)")
    p.add_argument("--faiss_nq", type=int, default=20000,
                   help="ivf: time faiss' own per-query search of this many background rows in the "
                        "same index and extrapolate it to the whole table (0: skip)")
    p.add_argument("--tmpdir", default=None, help="scratch folder (default: a new one under /tmp)")
    args = p.parse_args()
    print_args(args)
    ddir = get_ddir(args.ddir)
    xb = data.open_background(ddir, args.nbg)
    tmp = tempfile.mkdtemp(dir=args.tmpdir)
    xq = None
    if args.ext_nq > 0:
        fp = data.feature_paths(ddir)
        with h5py.File(fp["val"], "r") as f:
            n = int(f["count"][0])
            rows = np.sort(np.random.RandomState(0).choice(n, min(n, args.ext_nq), replace=False))
            Xq = f["all_feats"][rows]
        xq = search.normalized(data.load_pca(fp["pca"], Xq.shape[1]).apply(Xq), "val rows")
        log("exact search of %d external queries" % len(xq))
        _, Iq, _ = search.exact_search(xq, xb, 10, raw_base=True)
    log("%d threads, %d GPUs; background %d x %d" % (
        faiss.omp_get_max_threads(), faiss.get_num_gpus(), *xb.shape))
    rows = []
    try:
        for method in args.methods.split(","):
            paths = {k: os.path.join(tmp, "g." + k) for k in ("index", "I", "D")}
            if method == "pynndescent":
                stats = run_pynndescent(xb, args.K, paths)
            else:
                t0 = time.time()
                stats = graph.build_background_graph(
                    xb, args.K, paths, method=method.split("_")[0], nnd_iter=args.nnd_iter, nlist=args.nlist,
                    nprobe=args.nprobe, hnsw_M=args.hnsw_M, ef_search=args.ef_search,
                    ef_construction=args.ef_construction,
                    build_params={"bf16": False} if method == "ivf_f32" else None)
                stats["time_total"] = round(time.time() - t0, 2)
            stats["method"] = method
            I = np.memmap(paths["I"], dtype=np.int32, mode="r", shape=(args.nbg, args.K))
            stats["recall@10"] = round(graph.graph_recall(xb, I, nq=args.recall_nq, at=10), 4)
            if xq is not None and os.path.exists(paths["index"]):
                index = faiss.read_index(paths["index"])
                t1 = time.time()
                _, Ia = index.search(xq, 10)
                stats["ext_time"] = round(time.time() - t1, 2)
                stats["ext_recall@10"] = round(search.recall_at(Ia, Iq, 10), 4)
                del index
            if method.startswith("ivf") and args.faiss_nq > 0:
                # the alternative: faiss' per-query scan of the same lists for the same table
                index = faiss.read_index(paths["index"])
                nq = min(args.faiss_nq, args.nbg)
                xs = search.normalized(xb[:nq])
                t1 = time.time()
                index.search(xs, args.K)
                stats["faiss_table_est_s"] = round((time.time() - t1) * args.nbg / nq, 1)
                stats["speedup_vs_faiss"] = round(stats["faiss_table_est_s"] / stats["time_search"], 2)
                del index
            stats["peak_rss_gib"] = round(peak_rss_gib(), 2)
            stats["threads"] = faiss.omp_get_max_threads()
            print(json.dumps(stats, sort_keys=True), flush=True)
            rows.append(stats)
            del I
            for f in paths.values():
                if os.path.exists(f):
                    os.remove(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| method | nbg | total s | index s | table s | recall@10 | ext recall@10 | ext s | faiss table s | jit s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %d | %.1f | %.1f | %.1f | %.3f | %.3f | %.2f | %s | %s |" % (
            r["method"], r["nbg"], r["time_total"], r["time_index"], r["time_search"], r["recall@10"],
            r.get("ext_recall@10", float("nan")), r.get("ext_time", float("nan")),
            r.get("faiss_table_est_s", ""), r.get("time_jit", "")))


def run_pynndescent(xb, K, paths):
    """pynndescent's graph of the normalised rows (inner product), written as a table like ours."""
    from pynndescent import NNDescent

    t0 = time.time()
    NNDescent(search.normalized(xb[:2000]), metric="dot", n_neighbors=K, random_state=0)   # JIT
    jit = time.time() - t0
    log("pynndescent: JIT %.1f s; graph of %d rows" % (jit, xb.shape[0]))
    t0 = time.time()
    x = search.normalized(xb)
    nnd = NNDescent(x, metric="dot", n_neighbors=K, random_state=0, n_jobs=-1)
    I, _ = nnd.neighbor_graph
    t = time.time() - t0
    np.ascontiguousarray(I, dtype=np.int32).tofile(paths["I"])
    return {"nbg": xb.shape[0], "K": K, "time_total": round(t, 2), "time_index": round(t, 2),
            "time_search": 0.0, "time_jit": round(jit, 1)}


if __name__ == "__main__":
    main()
