"""Low-shot classification by label diffusion over a k-NN graph with background images (the paper's
method).

Reads   $DDIR/features/train.hdf5, val.hdf5     labelled and test images (all_feats (rows, D) float32)
        $DDIR/features/PCAR256.vt                faiss PCA D -> d applied to them
        $DDIR/features/f100m/concatenated_PCAR256.raw   first --nbg rows: background (nbg, d) float32
        $DDIR/knngraph/ndis{nbg}.index, ndis{nbg}_k{K}_{I,D}_11.*   made by build_graph.py {nbg}
        --split (default $DDIR/label_idx.json if any, else data/label_idx.json)  base/novel classes
Writes  --result R.json   the JSON result line (also printed last on stdout)
        --storeL F.npy    test scores after the last iteration, (n_test, C) float32; F.npy.json: their
                          mode, n and seed (fusion.py refuses the other mode's scores)
        --storeLname F    the test scores of every iteration, a pickled list of niter+1 (n_test, C)
                          float32 arrays (as the 2018 code)
        --storeLiters PAT the full node matrix L (n_nodes, classes of the block) float32 after each
                          step s = 0..niter-1, in PAT % (s, first class, end class) (.npy, as the
                          2018 code; nodes in graph order: labelled, in-domain, background)
        --store_slice S.npz  with --class_range a:b: per iteration, each test image's top-5 classes
                          of the slice (scores float32 and ids int64, (niter+1, n_test, 5))
        $DDIR/cache/completion/   the exact searches into the base-class images, the same for every
                          run of a split and background: computed by the first run, read by the
                          next ones (--completion_cache on|off|DIR; safe to delete; a
                          read-only data root's complete cache is read; without one the run
                          goes without it, or keeps it in DIR)

Graph: nodes = labelled images (then, with --indomain, the other training images of the novel
classes, unlabelled), then the nbg background images; each node is linked to its k most similar
nodes (cosine of PCA'd, L2-normalised vectors); W = row-L1-normalised (W0 + W0^T). Diffusion:
L0 = one-hot labels, columns normalised to 1; L <- colnorm(W L) for --niter iterations; a test
image's scores = sum of L over its k nearest graph nodes. --variant spreading|propagation|poisson and
--weights similarity|gaussian run the classic graph-based alternatives on the same graph and the same
one-hop scoring (formulas in lowshot/method.py). Top-1 and top-5 accuracy (all classes,
novel classes) are printed for the initial state and after every iteration.

Examples:
  python diffusion.py --mode test --nlabeled 2 --seed 1 --k 30 --nbg 1000000 --niter 3
  python diffusion.py ... --class_range 0:250 --store_slice s0.npz   # one job of an array
  python diffusion.py --merge_slices s0.npz s1.npz --result r.json   # same result as one run
"""
import lowshot.omp_env  # noqa: F401  (first: OpenMP threads sleep when they wait; lowshot/omp_env.py)
import argparse
import dataclasses
import json
import os
import pickle
import re
import time

import faiss
import numpy as np

from lowshot import cli, completion, data, evaluate, method, search, stored_graph, torch_backend
from lowshot import diffuse as dif
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, get_ddir, log, nonnegative_int, peak_rss_gib,
                            positive_int, print_args, print_result, require_file, run_main, write_json,
                            atomic_output, OwnMemoryPeak)


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, parents=[cli.protocol_parser()])
    _graph_flags(p.add_argument_group("graph"))
    _diffusion_flags(p.add_argument_group("diffusion"))
    _output_flags(p.add_argument_group("outputs"))
    return p.parse_args(argv)


def _graph_flags(g):
    g.add_argument("--k", type=positive_int, default=30, help="neighbours per node")
    g.add_argument("--nbg", type=nonnegative_int, default=10**6,
                   help="background images (first rows of the raw file; 0: none)")
    g.add_argument("--indomain", action="store_true",
                   help="the novel classes' other training images become unlabelled nodes")
    g.add_argument("--node_index", default="exact", choices=["exact", "ivf", "hnsw"],
                   help="search from the background into the labelled (+in-domain) set: exact (default, "
                        "as the 2018 code), or an approximate faiss index (its recall@10 is logged)")
    g.add_argument("--node_nprobe", type=positive_int, default=16, help="nprobe of that IVF index")
    g.add_argument("--completion_cache", default="on", metavar="{on,off,DIR}",
                   help="on: the exact searches into the base-class images, the same for every run of a "
                        "split and background, are computed once and kept in $DDIR/cache/completion "
                        "(shared by concurrent runs; safe to delete); DIR: kept in DIR/completion instead "
                        "(a data root on a read-only volume, whose complete cache is still read; without "
                        "a cache and a writable place the run goes without it and says so)")
    g.add_argument("--recall_nq", type=nonnegative_int, default=None,
                   help="sampled queries for the recall@10 of approximate searches against exact search "
                        "(default: 2e8 / N, between 100 and 1000; 0: not measured)")
    g.add_argument("--bg_nprobe", type=positive_int, default=None, help="override nprobe of an IVF background index")
    g.add_argument("--bg_ef_search", type=positive_int, default=None,
                   help="override efSearch of an HNSW background index")
    g.add_argument("--bg_search_L", type=positive_int, default=None,
                   help="override search_L of an NN-descent background index")
    g.add_argument("--device", choices=torch_backend.DEVICES, default="auto",
                   help="auto: torch on CUDA if torch sees a GPU, else CPU, and faiss-gpu for faiss' searches if "
                        "faiss sees GPUs; cpu: graph_utils only; cuda: torch on the GPU (completion scans, W products); torch-cpu: the "
                        "torch code on the CPU")


def _diffusion_flags(g):
    g.add_argument("--reorder", default="auto", choices=["auto", "on", "off"],
                   help="renumber the nodes breadth-first before diffusing (same result, faster "
                        "products); auto: from %d nodes" % dif.REORDER_MIN_NODES)
    g.add_argument("--niter", type=nonnegative_int, default=None,
                   help="diffusion iterations (default: douze18: the value the 2018 code validated for this "
                        "--nbg, --nlabeled and k = 30: 3 for F1M at n = 1, 2, 5, 4 for F10M...; 3 elsewhere; "
                        "spreading 30, propagation 1000, poisson 50: their reference implementations' defaults)")
    g.add_argument("--lslice", type=nonnegative_int, default=None,
                   help="diffuse classes by blocks of this many columns (0: all at once; default: "
                        "auto, see lowshot.diffuse.auto_lslice); same result, peak memory ~2 (n, lslice) "
                        "float32 matrices instead of (n, C)")
    g.add_argument("--variant", default="douze18", choices=method.VARIANTS,
                   help="douze18: the paper's (colnorm(W L), no clamping); spreading: Zhou et al. 2004 "
                        "(scikit-learn's LabelSpreading); propagation: Zhu and Ghahramani 2002 (scikit-learn's "
                        "LabelPropagation, hard clamping); poisson: Calder et al. 2020 (graphlearning's Poisson "
                        "learning). Formulas: lowshot/method.py")
    g.add_argument("--weights", default="binary", choices=method.WEIGHTS,
                   help="edge weights of the k-NN graph: binary (the paper), similarity (cosine^--power), "
                        "gaussian (self-tuned by each node's k-th neighbour, as graphlearning)")
    g.add_argument("--alpha", type=float, default=method.DEFAULT_ALPHA,
                   help="spreading: weight of the diffused labels against the initial ones, in (0, 1)")
    g.add_argument("--power", type=float, default=method.DEFAULT_POWER, help="similarity weights: the power")
    g.add_argument("--tol", type=float, default=None,
                   help="stop a class block once L changes by less than this (L1) in an iteration; later "
                        "iterations repeat its scores (default: none for douze18 and poisson, scikit-learn's 1e-3 "
                        "for spreading and propagation)")
    g.add_argument("--sparse_iterations", default="auto", choices=["auto", "off"],
                   help="auto: the first iterations on a sparse label matrix while it is sparse "
                        "(lowshot.diffuse.sparse_iterations); off: dense blocks throughout. Same scores "
                        "to float rounding")
    g.add_argument("--class_range", type=class_range, default=None,
                   help="a:b, diffuse only classes [a, b) (job-array slice; needs --store_slice)")


def _output_flags(g):
    g.add_argument("--result", default=None, help="write the result JSON here")
    g.add_argument("--storeL", default=None, help="test scores after the last iteration (.npy)")
    g.add_argument("--storeLname", default=None,
                   help="pickle of the test scores of every iteration (list of niter+1 arrays), as 2018")
    g.add_argument("--storeLiters", default=None, metavar="PATTERN",
                   help="printf pattern with three integers (step, first class, end class): the full node "
                        "matrix L after each step, .npy, as 2018 (e.g. L_%%d_%%d_%%d.npy)")
    g.add_argument("--store_slice", default=None, help="with --class_range: the slice's top-5 (.npz)")
    g.add_argument("--merge_slices", nargs="+", default=None, metavar="S.npz",
                   help="merge --store_slice files into the result of one full run (no other input)")


def class_range(text):
    """argparse type of --class_range: "a:b" with 0 <= a < b, as (a, b)."""
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected a:b, got %r" % text)
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError("need 0 <= a < b, got %s" % text)
    return a, b


def _class_range(given, nclass):
    """The classes diffused: --class_range within the split's classes, or all of them."""
    if given is None:
        return 0, nclass
    a, b = given
    if a >= nclass:
        raise InputError("--class_range %d:%d: the split has only %d classes" % (a, b, nclass))
    return a, min(b, nclass)


def _check_pattern(pat):
    """--storeLiters takes the 2018 code's printf pattern of three integers."""
    if re.fullmatch(r"[0-9,\s]+", pat):
        raise InputError("--storeLiters %r: this flag takes the 2018 code's printf pattern for the full node "
                         "matrix L (step, first class, end class, e.g. L_%%d_%%d_%%d.npy); the test scores of "
                         "every iteration go to --storeLname (one pickle), the last ones to --storeL" % pat)
    try:
        name = pat % (0, 0, 1)
    except (TypeError, ValueError) as e:
        raise InputError("--storeLiters %r: expected a printf pattern with three integers (step, first "
                         "class, end class), e.g. L_%%d_%%d_%%d.npy (%s)" % (pat, e))
    if name == pat % (1, 0, 1):
        raise InputError("--storeLiters %r: the pattern must use the step (its first integer), or every "
                         "step overwrites the same file" % pat)


def _check_args(args):
    """The checks across flags, and the method and iterations they give (``args.method``,
    ``args.niter``, ``args.tol``)."""
    if args.tol is None:
        args.tol = method.DEFAULT_TOL.get(args.variant)
    args.method = method.Method(args.variant, args.weights, args.alpha, args.power, args.tol)
    if args.niter is None:
        args.niter, how = dif.default_niter(args.nbg, args.nlabeled, args.k, args.variant)
        log("--niter %d: %s" % (args.niter, how))
    if args.class_range and not args.store_slice:
        raise InputError("--class_range needs --store_slice (merge the slices with --merge_slices)")
    if args.store_slice and (args.storeL or args.storeLname):
        raise InputError("--storeL/--storeLname store full score matrices: not with --class_range")
    if args.storeLiters:
        _check_pattern(args.storeLiters)


def _cache_root(flag, ddir):
    """The folder of the completion cache (``--completion_cache``), or None: off."""
    if flag == "off":
        return None
    return os.path.join(ddir, "cache") if flag == "on" else os.path.abspath(flag)


def _meta(args):
    return dict({"script": "diffusion", "mode": args.mode, "nlabeled": args.nlabeled, "seed": args.seed,
                 "k": args.k, "nbg": args.nbg, "niter": args.niter, "indomain": bool(args.indomain)},
                **args.method.record())


def _result(meta, accs):
    """The result JSON: ``iters`` (per iteration, the accuracies of lowshot.evaluate.accuracies), the
    last iteration's at the top level."""
    iters = [dict(iter=t, **a) for t, a in enumerate(accs)]
    return dict(meta, iters=iters, **accs[-1])


def _print_accs(accs):
    for t, a in enumerate(accs):
        name = "initial state" if t == 0 else "iter %d/%d" % (t, len(accs) - 1)
        log("  %-13s %s" % (name, evaluate.format_accuracies(a)))


def load_background(ddir, args, d, backend):
    """The background for graph completion: raw rows (memmap), stored index and tables."""
    xb = data.open_background(ddir, args.nbg, d=d)
    idx_path, Dbg, Ibg = stored_graph.find_background_graph(ddir, args.nbg, args.k)
    log("reading background index %s" % idx_path)
    index = stored_graph.read_background_index(idx_path, args.nbg, d, nprobe=args.bg_nprobe,
                                               ef_search=args.bg_ef_search, search_L=args.bg_search_L,
                                               backend=backend)
    exact = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    return completion.Background(xb, index, Dbg, Ibg, I_path=Ibg.filename, exact_index=exact)


def merge_slices(paths):
    """Read --store_slice files and compute the result of the full run."""
    parts, ranges, meta, y, is_novel = [], [], None, None, None
    for p in paths:
        require_file(p, "slice file")
        try:
            z = np.load(p)
            m = json.loads(str(z["meta"]))
            part = (z["top_scores"], z["top_ids"])
            c0, c1, C = (int(v) for v in z["class_range"])
            yp, nov = z["y_test"], z["is_novel_class"]
        except (OSError, KeyError, ValueError) as e:
            raise InputError("slice file %s is not a diffusion.py --store_slice file: %s" % (p, e))
        if meta is None:
            meta, y, is_novel = m, yp, nov
        elif m != meta or not np.array_equal(yp, y) or not np.array_equal(nov, is_novel):
            raise InputError("slice file %s comes from another experiment (%s) than %s (%s)" % (
                p, m, paths[0], meta))
        parts.append(part)
        ranges.append((c0, c1, C, p))
    ranges.sort()
    C = ranges[0][2]
    at = 0
    for c0, c1, Ci, p in ranges:
        if c0 != at:
            raise InputError("slice files cover classes up to %d, then %s starts at %d: a slice is "
                             "%s" % (at, p, c0, "missing" if c0 > at else "repeated"))
        at = c1
    if at != C:
        raise InputError("slice files cover classes 0:%d of %d: a slice is missing" % (at, C))
    top = dif.merge_slice_tops(parts)
    accs = [evaluate.accuracies_from_ids(top[t], y, is_novel) for t in range(top.shape[0])]
    return meta, accs


def main(argv=None):
    args = parse_args(argv)
    print_args(args)
    t_start = time.time()
    own = OwnMemoryPeak()
    if args.merge_slices:
        meta, accs = merge_slices(args.merge_slices)
        _print_accs(accs)
        res = _result(meta, accs)
        res["merged_slices"] = len(args.merge_slices)
        _finish(args, res)
        return
    backend = torch_backend.select(args.device)
    _check_args(args)
    ddir = get_ddir(args.ddir)
    times = {}
    vt = data.load_pca(data.feature_paths(ddir)["pca"])     # read once; its input dimension is checked on the features
    bg = None
    if args.nbg > 0:   # opened before the features are read: a missing background or graph fails fast
        t0 = time.time()
        bg = load_background(ddir, args, vt.d_out, backend)
        times["load_bg"] = time.time() - t0
    t0 = time.time()
    nodes, x0, xt = load_nodes(args, ddir, vt)
    times["load"] = time.time() - t0

    t0 = time.time()
    D_nodes = None if args.weights == "binary" else np.empty((len(x0) + args.nbg, args.k), dtype=np.float32)
    I_nodes, I_test, ginfo = completion.complete_graph(
        x0, xt, args.k, bg, node_index=args.node_index, node_nprobe=args.node_nprobe,
        nbase=nodes.nbase, cache_root=_cache_root(args.completion_cache, ddir), recall_nq=args.recall_nq,
        D_out=D_nodes, backend=backend)
    n = I_nodes.shape[0]
    del bg, x0, xt
    times["graph_completion"] = time.time() - t0

    scores, _, dinfo = dif.diffuse_knn(I_nodes, I_test, nodes.y_lab, nodes.split.nclass, args.niter,
                                       class_range=nodes.classes, lslice=args.lslice, renumber=args.reorder,
                                       on_iter=_store_L(args.storeLiters) if args.storeLiters else None,
                                       sparse_start=args.sparse_iterations == "auto", method=args.method,
                                       D_nodes=D_nodes, backend=backend)
    del I_nodes, I_test, D_nodes
    times.update(dinfo["times"])
    res = _write_scores(args, nodes, scores)
    res["graph"] = {"nodes": n, "W_nnz": dinfo["W_nnz"]}
    res["backend"] = backend.describe()
    res["graph"].update({key: ginfo[key] for key in ("node_index", "bg_index_recall@10", "node_index_recall@10",
                                                     "cache", "cache_built", "rows_beyond_bf16_bound")
                         if key in ginfo})
    res["times"] = {k: round(v, 2) for k, v in times.items()}
    res["time_total"] = round(time.time() - t_start, 2)
    res["peak_rss_gib"] = round(peak_rss_gib(), 3)    # counts the pages of the mapped background and graph
    res["own_peak_gib"] = round(own.gib, 3)          # the process' own memory (anonymous pages)
    _finish(args, res)


@dataclasses.dataclass
class Nodes:
    """The run's split and labels: ``nbase`` base-class images first among the labelled nodes
    (``y_lab``), ``y_test`` the test images' labels, ``classes`` (c0, c1) the classes diffused."""
    split: object
    classes: tuple
    nbase: int
    y_lab: np.ndarray
    y_test: np.ndarray


def load_nodes(args, ddir, vt):
    """The labelled, in-domain and test images of the run, through the PCA and normalised.

    Returns (Nodes, x0 float32 (n0, d) the labelled then in-domain vectors, xt float32 (nt, d))."""
    sets = data.load_lowshot(ddir, data.resolve_split(args.split, ddir, log), args.mode, args.nlabeled,
                             args.seed, indomain=args.indomain, log=log)
    split = sets.split
    classes = _class_range(args.class_range, split.nclass)
    data.check_pca_input(vt, sets.D, data.feature_paths(ddir)["pca"])
    log("PCA %d -> %d and L2 normalisation of %d labelled%s and %d test vectors" % (
        vt.d_in, vt.d_out, len(sets.Xl), "" if sets.Xu is None else " + %d in-domain" % len(sets.Xu),
        len(sets.Xte)))
    # the base-class images come first (data.select_labelled), the same rows for every run of the
    # split: the completion cache holds the searches into them
    nbase = int(np.argmax(split.is_novel[sets.yl])) if split.is_novel[sets.yl].any() else len(sets.yl)
    if split.is_novel[sets.yl[:nbase]].any() or not split.is_novel[sets.yl[nbase:]].all():
        raise AssertionError("labelled rows are not base classes then novel classes")
    # the base rows go through the PCA on their own: a multi-threaded BLAS product's last bits
    # depend on the matrix's row count, and the cache is keyed on the bits of the base vectors
    rest = sets.Xl[nbase:] if sets.Xu is None else np.vstack([sets.Xl[nbase:], sets.Xu])
    x0 = np.vstack([vt.apply(np.ascontiguousarray(sets.Xl[:nbase])), vt.apply(np.ascontiguousarray(rest))])
    x0 = search.normalized(x0, "PCA'd labelled vectors")
    xt = search.normalized(vt.apply(sets.Xte), "PCA'd test vectors")
    return Nodes(split, classes, nbase, sets.yl, sets.yte), x0, xt


def _store_L(pattern):
    """The ``on_iter`` of --storeLiters: L after step t - 1 (the 2018 numbering), rows in graph order."""
    def store_L(t, b0, b1, L):
        if t == 0:
            return
        fname = pattern % (t - 1, b0, b1)
        with atomic_output(fname) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, L)
        log("wrote %s" % fname)
    return store_L


def _write_scores(args, nodes, scores):
    """The slice file (--store_slice), or the accuracies and the score files; returns the result."""
    meta = _meta(args)
    split, (c0, c1) = nodes.split, nodes.classes
    if args.store_slice:
        vals, ids = dif.slice_top(scores, c0)
        with atomic_output(args.store_slice) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, top_scores=vals, top_ids=ids,
                         class_range=np.array([c0, c1, split.nclass]), y_test=nodes.y_test,
                         is_novel_class=split.is_novel, meta=json.dumps(meta, sort_keys=True))
        log("wrote %s" % args.store_slice)
        return dict(meta, class_range=[c0, c1], store_slice=args.store_slice)
    accs = [evaluate.accuracies(s, nodes.y_test, split.is_novel) for s in scores]
    _print_accs(accs)
    if args.storeL:
        with atomic_output(args.storeL) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, scores[-1])
        data.write_score_record(args.storeL, meta)
        log("wrote %s" % args.storeL)
    if args.storeLname:
        with atomic_output(args.storeLname) as tmp:
            with open(tmp, "wb") as f:
                pickle.dump([np.ascontiguousarray(S) for S in scores], f, 2)
        log("wrote %s" % args.storeLname)
    return _result(meta, accs)


def _finish(args, res):
    if args.result:
        write_json(args.result, res)
    print_result(res)


if __name__ == "__main__":
    run_main(main)
