"""GPU check of the graph code (needs faiss-gpu and at least one GPU; < 2 min).

Builds background graphs with the GPU paths of lowshot.graph (exact and IVF, float16, sharded over
all GPUs) on random clustered data and checks them against the CPU exact graph; completes a graph
through a GPU-cloned background index and checks it against CPU exact search. Prints PASS/FAIL
lines; exit status 1 on any FAIL.

  python benchmarks/gpu_check_graph.py
"""
import os
import sys
import tempfile
import time


import faiss
import numpy as np

from lowshot import completion, graph, search, stored_graph, torch_backend


def main():
    ngpu = faiss.get_num_gpus()
    print("faiss %s, %d GPUs" % (faiss.__version__, ngpu))
    if ngpu == 0:
        print("SKIP: no GPU visible to faiss")
        return 0
    # faiss' GPU paths, the scans on graph_utils (torch's are checked by gpu_check_torch.py)
    backend = torch_backend.Backend(why="faiss-gpu (%d GPUs)" % ngpu, faiss_gpus=ngpu)
    rs = np.random.RandomState(0)
    n, d, K = 200000, 64, 32
    x = (rs.randn(2000, d)[rs.randint(2000, size=n)] + 0.5 * rs.randn(n, d)).astype(np.float32)
    xn = search.normalized(x)
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xn)
    sample = rs.choice(n, 2000, replace=False)
    Dref, Iref = cpu.search(xn[sample], K)
    fails = 0
    tmp = tempfile.mkdtemp()
    for method, min_recall in (("exact", 0.97), ("ivf", 0.9)):
        paths = {k: os.path.join(tmp, "%s.%s" % (method, k)) for k in ("index", "I", "D")}
        t0 = time.time()
        graph.build_background_graph(x, K, paths, method=method, backend=backend)
        t = time.time() - t0
        I = np.fromfile(paths["I"], dtype=np.int32).reshape(n, K)
        D = np.fromfile(paths["D"], dtype=np.float32).reshape(n, K)
        r = search.recall_at(I[sample], Iref)
        # float16 storage: similarities close to the exact ones
        ok = r >= min_recall and np.abs(D[sample, 0] - Dref[:, 0]).max() < 2e-2
        fails += not ok
        print("%s: %s GPU %s graph of %d x %d in %.1f s, recall@10 %.4f" % (
            "PASS" if ok else "FAIL", method, method, n, K, t, r))
    # graph completion with the stored exact index moved to the GPUs
    index = stored_graph.read_background_index(os.path.join(tmp, "exact.index"), n, d, backend=backend)
    x0 = search.normalized(rs.randn(500, d).astype(np.float32))
    xt = search.normalized(rs.randn(100, d).astype(np.float32))
    Dt = np.fromfile(os.path.join(tmp, "exact.D"), dtype=np.float32).reshape(n, K)
    It = np.fromfile(os.path.join(tmp, "exact.I"), dtype=np.int32).reshape(n, K)
    I_nodes, I_test, _ = completion.complete_graph(x0, xt, 30, completion.Background(x, index, Dt, It),
                                                   backend=backend)
    allx = np.vstack([x0, xn])
    ref = faiss.IndexFlatIP(d)
    ref.add(allx)
    _, Iref_t = ref.search(xt, 30)
    r = search.recall_at(I_test, Iref_t, 30)
    ok = r >= 0.97
    fails += not ok
    print("%s: graph completion through GPU index, test recall@30 %.4f" % ("PASS" if ok else "FAIL", r))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
