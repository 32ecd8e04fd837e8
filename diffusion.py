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
                          next ones (--completion_cache on|off|DIR; safe to delete; on a
                          read-only data root the run goes without it, or keeps it in DIR)

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
import json
import os
import pickle
import re
import time

import faiss
import numpy as np

from lowshot import completion, data, evaluate, graph, method, search, torch_backend
from lowshot import diffuse as dif
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, get_ddir, log, nonnegative_int, peak_rss_gib,
                            positive_int, print_args, print_result, require_file, run_main, seed_int, write_json,
                            atomic_output, OwnMemoryPeak)


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("protocol")
    g.add_argument("--mode", choices=["val", "test"], default="val",
                   help="val: split 1 (base_classes_1 + novel_classes_1), test: split 2")
    g.add_argument("--nlabeled", type=int, default=2, help="labelled images per novel class")
    g.add_argument("--seed", type=seed_int, default=1, help="seed of the labelled-image draw")
    g.add_argument("--split", default=None, help="class split file (default: $DDIR/label_idx.json when it "
                                                  "exists, else data/label_idx.json, ImageNet's)")
    g.add_argument("--ddir", default=None, help="data root (default: $DDIR)")
    g = p.add_argument_group("graph")
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
                        "(a data root on a read-only volume; without a writable place the run goes "
                        "without the cache and says so)")
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
    g = p.add_argument_group("diffusion")
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
    g.add_argument("--class_range", default=None,
                   help="a:b, diffuse only classes [a, b) (job-array slice; needs --store_slice)")
    g = p.add_argument_group("outputs")
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
    return p.parse_args(argv)


def _class_range(s, nclass):
    if s is None:
        return 0, nclass
    try:
        a, b = (int(v) for v in s.split(":"))
    except ValueError:
        raise InputError("--class_range %r: expected a:b" % s)
    if not 0 <= a < b:
        raise InputError("--class_range %s: need 0 <= a < b" % s)
    if a >= nclass:
        raise InputError("--class_range %s: the split has only %d classes" % (s, nclass))
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


def _cache_root(flag, ddir):
    """The folder of the completion cache (``--completion_cache``), or None: off, or not writable."""
    if flag == "off":
        return None
    root = os.path.join(ddir, "cache") if flag == "on" else os.path.abspath(flag)
    top = root
    while not os.path.exists(top) and top != os.path.dirname(top):
        top = os.path.dirname(top)
    if not os.access(top, os.W_OK):      # also False on a read-only mount (EROFS)
        log("%s is not writable (a read-only data root?): graph completion runs without its cache "
            "(--completion_cache DIR keeps it in a writable DIR)" % top)
        return None
    return root


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


def load_background(ddir, args, d):
    """The background for graph completion: raw rows (memmap), stored index and tables."""
    xb = data.open_background(ddir, args.nbg, d=d)
    idx_path, Dbg, Ibg = graph.find_background_graph(ddir, args.nbg, args.k)
    log("reading background index %s" % idx_path)
    index = graph.read_background_index(idx_path, args.nbg, d, nprobe=args.bg_nprobe,
                                        ef_search=args.bg_ef_search, search_L=args.bg_search_L)
    exact = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    return {"x": xb, "index": index, "D": Dbg, "I": Ibg, "I_path": Ibg.filename, "exact_index": exact}


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
        if args.result:
            write_json(args.result, res)
        print_result(res)
        return
    torch_backend.use(args.device)
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
    ddir = get_ddir(args.ddir)
    paths = data.feature_paths(ddir)
    times = {}
    vt = data.load_pca(paths["pca"])     # read once; its input dimension is checked on the features
    bg = None
    if args.nbg > 0:   # opened before the features are read: a missing background or graph fails fast
        t0 = time.time()
        bg = load_background(ddir, args, vt.d_out)
        times["load_bg"] = time.time() - t0

    t0 = time.time()
    sets = data.load_lowshot(ddir, data.resolve_split(args.split, ddir, log), args.mode, args.nlabeled,
                             args.seed, indomain=args.indomain, log=log)
    split = sets.split
    c0, c1 = _class_range(args.class_range, split.nclass)
    data.check_pca_input(vt, sets.D, paths["pca"])
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
    y_lab, y_test = sets.yl, sets.yte
    del sets
    times["load"] = time.time() - t0

    if args.k >= len(x0) + args.nbg:
        raise InputError("k = %d but the graph has only %d nodes (%d labelled/in-domain + %d "
                         "background): need k < number of nodes" % (
                             args.k, len(x0) + args.nbg, len(x0), args.nbg))
    t0 = time.time()
    cache_root = _cache_root(args.completion_cache, ddir)
    D_nodes = None if args.weights == "binary" else np.empty((len(x0) + args.nbg, args.k), dtype=np.float32)
    I_nodes, I_test, ginfo = completion.complete_graph(
        x0, xt, args.k, bg, node_index=args.node_index, node_nprobe=args.node_nprobe, nbase=nbase,
        cache_root=cache_root, recall_nq=args.recall_nq, D_out=D_nodes)
    n = I_nodes.shape[0]
    del bg, x0, xt
    times["graph_completion"] = time.time() - t0

    def store_L(t, b0, b1, L):
        """--storeLiters: L after step t - 1 (the 2018 numbering), rows in graph order."""
        if t == 0:
            return
        fname = args.storeLiters % (t - 1, b0, b1)
        with atomic_output(fname) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, L)
        log("wrote %s" % fname)

    scores, _, dinfo = dif.diffuse_knn(I_nodes, I_test, y_lab, split.nclass, args.niter, class_range=(c0, c1),
                                       lslice=args.lslice, renumber=args.reorder,
                                       on_iter=store_L if args.storeLiters else None,
                                       sparse_start=args.sparse_iterations == "auto", method=args.method,
                                       D_nodes=D_nodes)
    del I_nodes, I_test, D_nodes
    times.update(dinfo["times"])
    meta = _meta(args)

    if args.store_slice:
        vals, ids = dif.slice_top(scores, c0)
        with atomic_output(args.store_slice) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, top_scores=vals, top_ids=ids,
                         class_range=np.array([c0, c1, split.nclass]), y_test=y_test,
                         is_novel_class=split.is_novel, meta=json.dumps(meta, sort_keys=True))
        log("wrote %s" % args.store_slice)
        res = dict(meta, class_range=[c0, c1], store_slice=args.store_slice)
    else:
        accs = [evaluate.accuracies(s, y_test, split.is_novel) for s in scores]
        _print_accs(accs)
        res = _result(meta, accs)
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
    res["graph"] = {"nodes": n, "W_nnz": dinfo["W_nnz"]}
    res["backend"] = torch_backend.describe()
    res["graph"].update({key: ginfo[key] for key in ("node_index", "bg_index_recall@10", "node_index_recall@10",
                                                     "cache", "cache_built", "rows_beyond_bf16_bound")
                         if key in ginfo})
    res["times"] = {k: round(v, 2) for k, v in times.items()}
    res["time_total"] = round(time.time() - t_start, 2)
    res["peak_rss_gib"] = round(peak_rss_gib(), 3)    # counts the pages of the mapped background and graph
    res["own_peak_gib"] = round(own.gib, 3)          # the process' own memory (anonymous pages)
    if args.result:
        write_json(args.result, res)
    print_result(res)


if __name__ == "__main__":
    run_main(main)
