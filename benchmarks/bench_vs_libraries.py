"""Our estimator (lowshot.LabelDiffusion) against the libraries a researcher would otherwise use,
on the same points and the same labelled draw: time (graph construction included, imports and
data loading not), peak memory, top-1 / top-5 accuracy on the unlabelled rows, at 1e4, 1e5, 1e6 rows.

Methods (--methods); each builds its own k-NN graph of X, k = --k for all:
  ours                 lowshot.LabelDiffusion(k=K, niter=--niter, device="auto").fit(X, y) (exact
                       search up to 50k rows, its IVF graph above)
  sklearn_spreading    sklearn.semi_supervised.LabelSpreading(kernel="knn", n_neighbors=K), other
                       parameters at their defaults (alpha=0.2, max_iter=30, tol=1e-3); exact search
  sklearn_propagation  LabelPropagation(kernel="knn", n_neighbors=K) (max_iter=1000, tol=1e-3).
                       sklearn counts each row among its own n_neighbors: K - 1 others
  gl_laplace           graphlearning: W = weightmatrix.knn(X, K) (its defaults: Gaussian weights,
                       symmetrised, Annoy search, 10 trees), ssl.laplace(W).fit(train_ind, labels)
  gl_poisson           the same W, ssl.poisson(W).fit(train_ind, labels)
Scores: label_distributions_, or the (n, classes) matrix graphlearning's fit returns; top-k by
lowshot.evaluate.rank_of_true (ties go to the lowest class id). Chance: 1 / --nclass, 5 / --nclass.

Data: lowshot.generate.ClassModel (the generated data roots' model: a class is a closed curve in a
signal subspace, plus power-law noise) drawn in --d dimensions, --nclass balanced classes, rows
L2-normalised (our graph is cosine k-NN; on unit rows the libraries' Euclidean neighbours are the
same). --nlabeled rows per class (drawn with --seed) keep their label, all others are y = -1 and
scored. --noise_std 2.0 (generated roots: 0.3) was chosen on the data alone, before any method ran:
at 0.3 the 30 exact neighbours of a row are all of its class from 1e5 rows on (printed "purity30":
0.80 / 1.00 / 1.00 at 1e4 / 1e5 / 1e6), so every method would score ~1; at 2.0: 0.22 / 0.56 / 0.81.

Each method runs alone in a subprocess. Peak memory: the child's ru_maxrss (os.wait4), its copy of
X included (0.24 GiB at 1e6 x 64). The child prints a marker at each stage (graph, iterations,
solve, ...); the parent stops it after --timeout s of method time or above --max_gib of RSS (polled
every 0.1 s) and reports the stage it was in and those done. A method so stopped is skipped at the
larger sizes, as is one that took over --skip_after s, with its time extrapolated linearly in n (a
lower bound for all of these methods).

Needs the benchmark-only requirements: pip install -r requirements-bench.txt

Runtime, 2 cores: --sizes 2000,10000 under a minute; the default run 45-55 min (estimated from
runs up to 3e4 rows: at 1e6 every library is expected to be stopped by the 600 s limit).
  python benchmarks/bench_vs_libraries.py --json_out /tmp/vs_libraries.json
  python benchmarks/bench_vs_libraries.py --sizes 2000,10000 --methods ours,gl_poisson
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import psutil

from lowshot.common import log, print_args, print_result, write_json
from lowshot.generate import DEFAULTS, ClassModel

METHODS = ("ours", "sklearn_spreading", "sklearn_propagation", "gl_laplace", "gl_poisson")
TOPK = (1, 5)
STAGE = "@stage"        # child -> parent: "@stage NAME SECONDS" (seconds since the method started)
POLL_S = 0.1


############################################################################################
# Data
############################################################################################


def make_data(n, args, block=65536):
    """X (n, d) float32 unit rows, y (n,) int64 classes, y_train (n,) int64 (-1: unlabelled).

    The class model depends on --data_seed only (the same curves at every size); the rows on
    (data_seed, n); the labelled draw on --seed.
    """
    model = ClassModel(args.nclass, args.d, max(1, 3 * args.d // 4), DEFAULTS["center_std"],
                       DEFAULTS["curve_std"], args.noise_std, np.random.default_rng(args.data_seed),
                       DEFAULTS["signal_decay"], DEFAULTS["noise_decay"])
    rng = np.random.default_rng([args.data_seed, n])
    y = rng.permutation(np.arange(n, dtype=np.int64) % args.nclass)
    X = np.empty((n, args.d), dtype=np.float32)
    for i0 in range(0, n, block):
        X[i0:i0 + block] = model.sample(y[i0:i0 + block], rng)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rs = np.random.default_rng(args.seed)
    y_train = np.full(n, -1, dtype=np.int64)
    for c in range(args.nclass):
        rows = np.flatnonzero(y == c)
        if rows.size <= args.nlabeled:
            raise SystemExit("error: %d rows of class %d, need more than --nlabeled %d" % (
                rows.size, c, args.nlabeled))
        sel = rs.choice(rows, args.nlabeled, replace=False)
        y_train[sel] = c
    return X, y, y_train


def knn_purity(X, y, k, nq=2000, seed=0):
    """Fraction of the k exact (faiss) neighbours of nq sampled rows that share the row's class:
    how hard the data is, whatever the method."""
    import faiss
    q = np.random.default_rng(seed).choice(X.shape[0], min(nq, X.shape[0]), replace=False)
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    _, I = index.search(X[q], k + 1)
    return float((y[I[:, 1:]] == y[q, None]).mean())


############################################################################################
# Child: one method on one data set
############################################################################################


class Clock:
    """Method time and stage markers on stdout (the parent reads the last one)."""

    def __init__(self):
        self.t0 = None
        self.stages = {}

    def stage(self, name):
        if self.t0 is None:
            self.t0 = time.time()
        self.stages[name] = round(time.time() - self.t0, 3)
        print("%s %s %.3f" % (STAGE, name, self.stages[name]), flush=True)

    def elapsed(self):
        return time.time() - self.t0


def run_ours(X, y_train, args, clock):
    from lowshot import LabelDiffusion
    clock.stage("fit")
    m = LabelDiffusion(k=args.k, niter=args.niter, device="auto").fit(X, y_train)
    info = {"niter": int(m.niter_), "graph_info": m.graph_info_}
    return m.label_distributions_, m.classes_, m.transduction_, info


def run_sklearn(X, y_train, args, clock):
    from sklearn.semi_supervised import LabelPropagation, LabelSpreading
    cls = LabelSpreading if args.child == "sklearn_spreading" else LabelPropagation
    model = cls(kernel="knn", n_neighbors=args.k)
    build = model._build_graph

    def build_marked():
        # private hook, only to mark the end of the graph stage; fit() is unchanged
        W = build()
        clock.stage("iterations")
        return W

    model._build_graph = build_marked
    clock.stage("graph")
    model.fit(X, y_train)
    info = {"n_iter": int(model.n_iter_), "max_iter": model.max_iter}
    return model.label_distributions_, model.classes_, model.transduction_, info


def run_graphlearning(X, y_train, args, clock):
    import graphlearning as gl
    solver = gl.ssl.laplace if args.child == "gl_laplace" else gl.ssl.poisson
    train_ind = np.flatnonzero(y_train >= 0)
    train_labels = y_train[train_ind]
    clock.stage("graph")
    W = gl.weightmatrix.knn(X, args.k)
    clock.stage("solve")
    # fit's (n, classes) scores, columns in np.unique(train_labels) order; predict() would be their
    # argmax after a min-max rescaling (no class_priors here): the same top-1, two more copies of u
    u = solver(W).fit(train_ind, train_labels)
    return u, np.unique(train_labels), None, {"W_nnz": int(W.nnz)}


RUNNERS = {"ours": run_ours, "sklearn_spreading": run_sklearn, "sklearn_propagation": run_sklearn,
           "gl_laplace": run_graphlearning, "gl_poisson": run_graphlearning}


def import_libraries(method):
    """Imports before the clock starts (the modules our fit imports on first use included)."""
    if method == "ours":
        import logging
        import faiss                                                            # noqa: F401
        import graph_utils                                                      # noqa: F401
        from lowshot import LabelDiffusion, completion, diffuse, search, torch_backend   # noqa: F401
        # the estimator's progress lines: the parent keeps the last one as "how far it got"
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    elif method.startswith("sklearn_"):
        import sklearn.semi_supervised                                          # noqa: F401
    else:
        import graphlearning                                                    # noqa: F401
        import annoy                                                            # noqa: F401


def child(args):
    X = np.load(os.path.join(args.data, "X.npy"))
    y = np.load(os.path.join(args.data, "y.npy"))
    y_train = np.load(os.path.join(args.data, "y_train.npy"))
    m = args.child
    import_libraries(m)
    clock = Clock()
    clock.stage("start")
    scores, classes, pred, info = RUNNERS[m](X, y_train, args, clock)
    seconds = clock.elapsed()
    clock.stage("scoring")
    from lowshot.evaluate import rank_of_true
    classes = np.asarray(classes)
    if not np.array_equal(classes, np.arange(args.nclass)):
        raise RuntimeError("%s: classes %s, expected 0..%d" % (m, classes[:10], args.nclass - 1))
    # on all rows, then the unlabelled ones: no copy of the (n, classes) scores in the peak memory
    unl = y_train < 0
    rank = rank_of_true(scores, y)[unl]
    pred = np.argmax(scores, axis=1) if pred is None else np.asarray(pred)
    res = {"seconds": round(seconds, 3), "stages": clock.stages, **info,
           "top1_predicted": float((pred[unl] == y[unl]).mean()),
           "frac_flat": float((scores.max(axis=1) == scores.min(axis=1))[unl].mean())}
    res.update({"top%d" % k: float((rank < k).mean()) for k in TOPK})
    print(json.dumps(res, default=str), flush=True)


############################################################################################
# Parent: children, limits, table
############################################################################################


def tree_rss_gib(proc):
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**30


def run_child(method, datadir, args):
    """Run one method in a subprocess under the limits; returns its result record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--data", datadir,
           "--k", str(args.k), "--nclass", str(args.nclass)]
    if args.niter is not None:
        cmd += ["--niter", str(args.niter)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         start_new_session=True)
    lines, marks = [], []       # marks: (stage, child seconds, parent time it arrived)

    def read():
        for line in p.stdout:
            line = line.rstrip("\n")
            if line.startswith(STAGE + " "):
                _, name, t = line.split()
                marks.append((name, float(t), time.time()))
            else:
                lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t_proc = time.time()
    proc = psutil.Process(p.pid)
    stop, poll_peak, pid = None, 0.0, 0
    try:
        while not pid:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            start = next((t for name, _, t in marks if name == "start"), t_proc)
            rss = tree_rss_gib(proc)
            poll_peak = max(poll_peak, rss)
            if time.time() - start > args.timeout:
                stop = "time limit %g s" % args.timeout
            elif rss > args.max_gib:
                stop = "memory limit %g GiB (RSS %.2f GiB)" % (args.max_gib, rss)
            if stop:
                t_stop = time.time()
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(p.pid, 0)
            else:
                time.sleep(POLL_S)
    finally:
        if not pid:         # the parent itself is stopping (Ctrl-C): the child's session goes too
            os.killpg(p.pid, signal.SIGKILL)
            os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    out = [l for l in lines if l.strip()]
    res = {"method": method, "peak_gib": round(ru.ru_maxrss / 2**20, 3),
           "peak_polled_gib": round(poll_peak, 3), "process_s": round(time.time() - t_proc, 2),
           "stages": {name: t for name, t, _ in marks}}
    if stop is None and p.returncode == 0 and out:
        try:
            res.update(json.loads(out[-1]))
            res["status"] = "ok"
            return res
        except ValueError:
            pass
    res["last_output"] = out[-1][-300:] if out else ""
    if stop is None:
        t_stop = time.time()
    else:
        res["stopped_by"] = "time" if stop.startswith("time") else "memory"
    start = next((t for name, _, t in marks if name == "start"), t_proc)
    res["elapsed_s"] = round(t_stop - start, 1)
    stages = [(name, t) for name, t, _ in marks if name != "start"]
    res["stage"] = stages[-1][0] if stages else "setup (imports, loading the data)"
    # "graph done at 210.3 s": each stage before the last, with the time the next one began
    done = ["%s done at %.1f s" % (cur[0], nxt[1]) for cur, nxt in zip(stages, stages[1:])]
    where = "in %s at %.1f s%s" % (res["stage"], res["elapsed_s"], " (%s)" % ", ".join(done) if done else "")
    if "stopped_by" in res:
        res["status"] = "%s: stopped %s" % (stop, where)
    else:
        res["status"] = "failed %s, exit %d: %s" % (where, p.returncode, res["last_output"][-200:])
    if "stopped_by" in res and method == "ours" and res["last_output"]:
        res["status"] += "; last progress line: %s" % res["last_output"][-150:]
    return res


def fmt(v, f="%.3f"):
    return "-" if v is None else f % v


def ratio(r, ours):
    """Time / ours' time at the same size; ">x" for a method stopped by the time limit (a lower
    bound), "~x" for a skipped one (its linear extrapolation)."""
    if ours is None or ours.get("status") != "ok":
        return "-"
    t0 = max(ours["seconds"], 1e-3)
    if r.get("status") == "ok":
        return "%.2f" % (r["seconds"] / t0)
    if r.get("stopped_by") == "time":
        return ">%.1f" % (r["elapsed_s"] / t0)
    if "extrapolated_s" in r:
        return "~%.0f" % (r["extrapolated_s"] / t0)
    return "-"


def time_cell(r):
    """Method seconds; ">t" stopped by the time limit, "~t" skipped (extrapolated), failures: elapsed."""
    if r.get("status") == "ok":
        return ("%.2f" if r["seconds"] < 10 else "%.1f") % r["seconds"]
    if "elapsed_s" in r:
        return (">%.1f" if r.get("stopped_by") == "time" else "%.1f") % r["elapsed_s"]
    return "~%.0f" % r["extrapolated_s"] if "extrapolated_s" in r else "-"


def table(results):
    print("| size | method | time s | time / ours | peak GiB | top-1 | top-5 | status |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        ours = next((o for o in results if o["size"] == r["size"] and o["method"] == "ours"), None)
        print("| %d | %s | %s | %s | %s | %s | %s | %s |" % (
            r["size"], r["method"], time_cell(r), ratio(r, ours), fmt(r.get("peak_gib"), "%.2f"),
            fmt(r.get("top1")), fmt(r.get("top5")), r["status"].replace("|", "/")))


def skip_reason(r, skip_after):
    """Why a method is not run at the larger sizes after this record (None: run it), and the
    (seconds, rows) its extrapolation starts from."""
    if r.get("stopped_by"):
        base = (r["elapsed_s"], r["size"]) if r["stopped_by"] == "time" else None
        return "stopped by the %s limit at n = %d" % (r["stopped_by"], r["size"]), base
    if skip_after and r.get("status") == "ok" and r["seconds"] > skip_after:
        return ("took %.1f s at n = %d (> --skip_after %g)" % (r["seconds"], r["size"], skip_after),
                (r["seconds"], r["size"]))
    return None, None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--sizes", default="10000,100000,1000000", help="rows, comma-separated")
    g.add_argument("--nclass", type=int, default=100, help="classes")
    g.add_argument("--d", type=int, default=64, help="dimension")
    g.add_argument("--noise_std", type=float, default=2.0, help="ClassModel noise (see above)")
    g.add_argument("--data_seed", type=int, default=0, help="class model and rows")
    g.add_argument("--nlabeled", type=int, default=5, help="labelled rows per class")
    g.add_argument("--seed", type=int, default=1, help="the labelled draw")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ",".join(METHODS))
    g.add_argument("--k", type=int, default=30, help="neighbours, every method")
    g.add_argument("--niter", type=int, default=None, help="ours: iterations (default: the estimator's)")
    g = p.add_argument_group("limits and output")
    g.add_argument("--timeout", type=float, default=600, help="seconds per method and size")
    g.add_argument("--max_gib", type=float, default=16, help="resident memory per method")
    g.add_argument("--skip_after", type=float, default=0,
                   help="skip a method at larger sizes once it took over this many seconds (0: never)")
    g.add_argument("--purity_nq", type=int, default=2000, help="rows sampled for the 30-NN purity (0: skip)")
    g.add_argument("--tmpdir", default=None, help="scratch folder for the data (default: under /tmp)")
    g.add_argument("--json_out", default=None, help="also write the final JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    print_args(args)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    methods = args.methods.split(",")
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit("error: unknown methods %s (known: %s)" % (sorted(bad), ",".join(METHODS)))
    results, data_info, skip = [], [], {}       # skip: method -> (reason, (seconds, rows))
    tmp = tempfile.mkdtemp(prefix="bench_vs_libraries.", dir=args.tmpdir)
    try:
        for n in sizes:
            log("n = %d: generating %d x %d, %d classes, %d labelled per class" % (
                n, n, args.d, args.nclass, args.nlabeled))
            X, y, y_train = make_data(n, args)
            info = {"size": n, "labelled": int((y_train >= 0).sum())}
            if args.purity_nq:
                info["purity%d" % args.k] = round(knn_purity(X, y, args.k, args.purity_nq), 4)
            log("data: %s (chance: top-1 %.3f, top-5 %.3f)" % (
                json.dumps(info), 1 / args.nclass, min(1.0, 5 / args.nclass)))
            data_info.append(info)
            for name, a in (("X", X), ("y", y), ("y_train", y_train)):
                np.save(os.path.join(tmp, name + ".npy"), a)
            del X, y, y_train
            for m in methods:
                if m in skip:
                    reason, base = skip[m]
                    r = {"method": m, "status": "skipped: " + reason}
                    if base:    # linear in n: a lower bound for every method here
                        r["extrapolated_s"] = round(base[0] * n / base[1], 1)
                        r["status"] += "; >= ~%.0f s here (linear)" % r["extrapolated_s"]
                else:
                    r = run_child(m, tmp, args)
                r["size"] = n
                results.append(r)
                reason, base = skip_reason(r, args.skip_after)
                if reason:
                    skip[m] = reason, base
                log("n = %d %-20s %s s, peak %s GiB, top-1 %s, top-5 %s, %s" % (
                    n, m, time_cell(r), fmt(r.get("peak_gib"), "%.2f"), fmt(r.get("top1")),
                    fmt(r.get("top5")), r["status"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table(results)
    out = {"args": vars(args), "data": data_info, "results": results,
           "versions": {d: _version(d) for d in ("numpy", "scipy", "faiss-cpu", "scikit-learn",
                                                 "graphlearning", "annoy")}}
    if args.json_out:
        write_json(args.json_out, out)
    print_result(out)


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
