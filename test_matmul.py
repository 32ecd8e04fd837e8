"""Check that the graph_utils build computes what scipy computes (run it after bash graph_utils/compile.bash).

Builds a random k-NN table in memory (nothing is read or written), then compares against scipy:
  - the diffusion graph W = row-L1-normalised (W0 + W0^T) from graph_utils.knn_to_graph;
  - the sparse x dense product W @ L with both kernels (hand-written OpenMP, and MKL inspector-executor
    where graph_utils was built with MKL: graph_utils.has_mkl()).
Prints each relative error (Frobenius norm of the difference / norm of scipy's result) and exits with
status 1 if any exceeds 1e-6.

Example: python test_matmul.py --n 100000 --k 30 --C 100
"""
import argparse
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import graph_utils
from lowshot.common import log, print_args, print_result, run_main

TOLERANCE = 1e-6


def rel_err(x, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    group = parser.add_argument_group("problem size")
    group.add_argument("--n", type=int, default=100000, help="nodes of the graph")
    group.add_argument("--k", type=int, default=30, help="neighbours per node in the k-NN table")
    group.add_argument("--C", type=int, default=100, help="columns of the dense matrix (classes)")
    group.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print_args(args)

    rs = np.random.RandomState(args.seed)
    I = rs.randint(0, args.n, size=(args.n, args.k)).astype(np.int64)
    I[rs.rand(args.n, args.k) < 0.01] = -1  # missing neighbours, as in partial k-NN tables

    log("knn_to_graph: graph_utils vs scipy, n=%d k=%d" % (args.n, args.k))
    t0 = time.time()
    W = graph_utils.knn_to_graph(I, args.n)
    t_graph = time.time() - t0
    mask = I >= 0
    rows = np.nonzero(mask)[0]
    W0 = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, I[mask])), shape=(args.n, args.n))
    W0.sum_duplicates()
    W0.data[:] = 1
    ref = (W0 + W0.T).tocsr()
    ref = sp.diags(1 / np.asarray(ref.sum(axis=1)).ravel()) @ ref
    errors = {"graph": float(spla.norm(W.to_scipy().astype(np.float64) - ref) / spla.norm(ref))}

    L = rs.rand(args.n, args.C).astype(np.float32)
    ref_prod = W.to_scipy().astype(np.float64) @ L.astype(np.float64)
    times = {"graph": t_graph}
    kernels = ("hand", "mkl") if graph_utils.has_mkl() else ("hand",)
    if not graph_utils.has_mkl():
        log("graph_utils was built without MKL: kernel mkl not checked")
    for kernel in kernels:
        log("spmm kernel=%s, C=%d" % (kernel, args.C))
        t0 = time.time()
        Y = graph_utils.spmm(W, L, kernel=kernel)
        times["spmm_" + kernel] = time.time() - t0
        errors["spmm_" + kernel] = rel_err(Y, ref_prod)

    ok = all(e < TOLERANCE for e in errors.values())
    for name, e in errors.items():
        print("relative error %-10s %.3g %s" % (name, e, "ok" if e < TOLERANCE else "TOO LARGE"))
    print_result({"script": "test_matmul", "ok": ok, "errors": errors, "seconds": times,
                  "threads": graph_utils.max_threads(), "mkl": graph_utils.has_mkl()})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
