"""Benchmark of the float32 k-NN scan (graph_utils.KnnScan with bf16=False): the hand-written blocked
product (every build) against MKL's sgemm (builds with MKL), in the same process, on the same data.

Everything is generated in memory (nothing is read or written except --result): --nq queries and --nb
database vectors, random unit vectors of dimension --d; the database is offered to every query in
blocks of --bs rows, as search.exact_search(..., raw_base=True) does, and each query keeps its --k best. Prints per kernel
the time, GFLOP/s (2 nq nb d / time) and the ratio to MKL, checks that the kernels agree (same ids
but where two scores are within float32 rounding) and ends with one JSON line.

Example (the ratio in benchmarks/README.md, 2 cores, idle machine):
  python benchmarks/bench_scan.py --nq 20000 --nb 200000 --d 256
"""
import argparse
import time

import numpy as np

import graph_utils
from lowshot.common import InputError, log, print_args, print_result, run_main, write_json


def unit(rs, n, d):
    x = rs.randn(n, d).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def scan(Q, X, k, bs, **kw):
    s = graph_utils.KnnScan(Q, k, **kw)
    rows = np.arange(len(Q))
    for i0 in range(0, len(X), bs):
        s.add(rows, X[i0:i0 + bs], np.arange(i0, min(len(X), i0 + bs), dtype=np.int32))
    return s.finish(k)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("problem size")
    group.add_argument("--nq", type=int, default=20000, help="queries")
    group.add_argument("--nb", type=int, default=200000, help="database vectors")
    group.add_argument("--d", type=int, default=256, help="dimension")
    group.add_argument("--k", type=int, default=10, help="neighbours kept per query")
    group.add_argument("--bs", type=int, default=65536, help="database rows offered per KnnScan.add")
    group = parser.add_argument_group("what to time")
    group.add_argument("--kernels", default=None,
                       help="comma-separated among hand, mkl (default: hand, and mkl where the build has it)")
    group.add_argument("--bf16", action="store_true", help="also time the bf16 scan (AVX512-BF16 CPUs)")
    group.add_argument("--repeat", type=int, default=1, help="best of this many runs per kernel")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--result", help="also write the result JSON here")
    args = parser.parse_args(argv)
    print_args(args)
    kernels = args.kernels.split(",") if args.kernels else ["hand"] + (["mkl"] if graph_utils.has_mkl() else [])
    for kern in kernels:
        if kern not in ("hand", "mkl"):
            raise InputError("--kernels: unknown kernel %r (hand, mkl)" % kern)
        if kern == "mkl" and not graph_utils.has_mkl():
            raise InputError("--kernels mkl: graph_utils was built without MKL (rebuild with mkl-devel installed: "
                             "LOWSHOT_MKL=on pip install --no-build-isolation -e .)")
    if args.bf16 and not (graph_utils.cpu_has_bf16() and args.d % 2 == 0):
        raise InputError("--bf16: needs an AVX512-BF16 CPU and an even --d")
    rs = np.random.RandomState(args.seed)
    Q, X = unit(rs, args.nq, args.d), unit(rs, args.nb, args.d)
    flop = 2.0 * args.nq * args.nb * args.d
    log("%d queries x %d vectors, d=%d, k=%d, %d threads, graph_utils %s MKL" % (
        args.nq, args.nb, args.d, args.k, graph_utils.max_threads(), "with" if graph_utils.has_mkl() else "without"))
    runs = [(kern, dict(bf16=False, kernel=kern)) for kern in kernels]
    if args.bf16:
        runs.append(("bf16", dict(bf16=True)))
    times, out = {}, {}
    for name, kw in runs:
        k = args.k + (16 if name == "bf16" else 0)   # search.BF16_EXTRA candidates for the exact re-score
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            D, I = scan(Q, X, k, args.bs, **kw)
            best = min(best, time.perf_counter() - t0)
        times[name], out[name] = best, (D[:, :args.k], I[:, :args.k])
        log("%-5s %.2f s, %.1f GFLOP/s" % (name, best, flop / best / 1e9))
    ref = "mkl" if "mkl" in out else kernels[0]
    agree = {n: float((np.sort(I, 1) == np.sort(out[ref][1], 1)).all(1).mean()) for n, (_, I) in out.items()}
    dmax = {n: float(np.abs(D - out[ref][0]).max()) for n, (D, _) in out.items()}
    ratio = {n: t / times[ref] for n, t in times.items()}
    for n in times:
        print("%-5s time %.2f s  %.1f GFLOP/s  time / %s %.2f  same ids as %s %.4f  max |D - D_%s| %.2g" % (
            n, times[n], flop / times[n] / 1e9, ref, ratio[n], ref, agree[n], ref, dmax[n]), flush=True)
    result = {"script": "bench_scan", "nq": args.nq, "nb": args.nb, "d": args.d, "k": args.k,
              "threads": graph_utils.max_threads(), "mkl": graph_utils.has_mkl(), "seconds": times,
              "GFLOPs": {n: flop / t / 1e9 for n, t in times.items()}, "time_ratio_to_" + ref: ratio,
              "same_ids_as_" + ref: agree}
    if args.result:
        write_json(args.result, result)
    print_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
