"""Phase 2: the choice of each experiment's parameters by the mean over the seeds of the validation
metric the config names (``metric``: top5, the paper's, by default; top1 for data with few classes),
and the files that keep them (``chosen_{logreg,diffusion,fusion}.yaml``). A mixin of
lowshot.phases.Phases, and the choice itself (:func:`choose_best`, tested against numpy).
"""
import os

import numpy as np
import yaml

from lowshot import evaluate
from lowshot.common import InputError, atomic_output, logger
from lowshot.phase_config import METRICS, method_name, run_name, variant_name

log = logger(__name__)


class Choices:
    """The phase-2 choices of :class:`lowshot.phases.Phases`."""

    def choose_logreg(self):
        """Per n, the (lr, wd, batchsize, iterations) with the best mean validation metric."""
        c = self.cfg["logreg"]
        runs = self.logreg_val_runs()
        got = self.collect_validation(runs, "logreg")
        chosen = {}
        for n in self.cfg["nlabeled"]:
            points = []
            for lr in c["lr"]:
                for wd in c["wd"]:
                    for bs in c["batchsize"]:
                        names = [run_name(n, s, lr=lr, wd=wd, batchsize=bs) for s in self.cfg["seeds"]]
                        if all(nm in got for nm in names):
                            points.append(({"lr": lr, "wd": wd, "batchsize": bs},
                                           [got[nm]["evals"] for nm in names]))
            best = choose_best(points, "iter", self.cfg["metric"])
            if best is None:
                log("logreg n=%d: no grid point has all seeds: nothing chosen" % n)
                continue
            params, it, stats = best
            chosen[n] = dict(params, maxiter=it, **stats)
        return chosen

    def choose_diffusion(self):
        """Per (n, background), the method (``diffusion.methods``) and number of iterations with the
        best mean validation metric."""
        first, merges = self.diffusion_val_runs()
        # one result JSON per run: the run itself, or the merge of its class slices
        runs = [r for r in first + merges if r.outputs[0].endswith(".json")]
        got = self.collect_validation(runs, "diffusion")
        methods = self.cfg["diffusion"]["methods"]
        chosen = {}
        for n in self.cfg["nlabeled"]:
            for nbg, ind in self.variants():
                vn = variant_name(nbg, ind)
                points = []
                for spec in methods:
                    names = [run_name(n, s, vn + method_name(spec)) for s in self.cfg["seeds"]]
                    if all(nm in got for nm in names):
                        points.append(({"method": spec}, [got[nm]["iters"] for nm in names]))
                    else:
                        log("diffusion n=%d %s %s: seeds missing: not a candidate" % (n, vn, spec))
                best = choose_best(points, "iter", self.cfg["metric"])
                if best is None:
                    continue
                params, it, stats = best
                chosen.setdefault(n, {})[vn] = dict(niter=it, **stats)
                if len(methods) > 1 or method_name(params["method"]):
                    chosen[n][vn]["method"] = params["method"]
        return chosen

    def _complete_cells(self, got, variants, what=None):
        """(n, variant name, run names over the seeds) of every cell of the grid whose seeds all have
        a result in ``got``; the others are skipped (logged when ``what`` names the experiment)."""
        for n in self.cfg["nlabeled"]:
            for nbg, ind in variants:
                vn = variant_name(nbg, ind)
                names = [run_name(n, s, vn) for s in self.cfg["seeds"]]
                if all(nm in got for nm in names):
                    yield n, vn, names
                elif what:
                    log("%s n=%d %s: seeds missing: nothing chosen" % (what, n, vn))

    def choose_fusion(self):
        """Per (n, background), the fusion weight with the best mean validation metric."""
        runs = self.fusion_runs("val")
        got, missing = self.collect(runs)
        self._report_missing(missing, "fusion validation")
        if missing and not self.partial:
            return None
        chosen = {}
        for n, vn, names in self._complete_cells(got, self.fusion_variants()):
            per_seed = [[dict({m: got[nm][m][i] for m in METRICS if m in got[nm]}, weight=w)
                         for i, w in enumerate(got[nm]["weights"])] for nm in names]
            best = choose_best([({}, per_seed)], "weight", self.cfg["metric"])
            _, w, stats = best
            chosen.setdefault(n, {})[vn] = dict(weight=w, **stats)
        return chosen

    def chosen_path(self, experiment):
        return self.path("chosen_%s.yaml" % experiment)

    def write_chosen(self, experiment, chosen, how):
        path = self.chosen_path(experiment)
        os.makedirs(self.rundir, exist_ok=True)
        header = ("# %s\n# metric: the mean over seeds %s of the validation %s (the config's metric; "
                  "top1/top5: all classes, top1_novel/top5_novel: novel classes);\n# val_* = mean and "
                  "std over the seeds at the chosen point. Read by phase 3.\n" % (
                      how, self.cfg["seeds"], self.cfg["metric"]))
        with atomic_output(path) as tmp:
            with open(tmp, "w") as f:
                f.write(header)
                yaml.safe_dump({experiment: chosen, "metric": self.cfg["metric"]}, f, sort_keys=True,
                               default_flow_style=None)
        log("wrote %s" % path)
        return path

    def read_chosen(self, experiment, phase_hint):
        path = self.chosen_path(experiment)
        if not os.path.exists(path):
            raise InputError("%s does not exist: %s" % (path, phase_hint))
        with open(path) as f:
            return (yaml.safe_load(f) or {}).get(experiment) or {}

    # ---------------------------------------------------------------- phase 4: results


def choose_best(points, key, metric):
    """The best (grid point, evaluation point) by the mean over seeds of ``metric``.

    Parameters
    ----------
    points : list of (params dict, per_seed)
        ``per_seed``: one list per seed of dicts ``{key: value, "top1": a, "top1_novel": b, "top5":
        c, "top5_novel": d}`` (e.g. logreg ``evals``, diffusion ``iters``, fusion weights); results
        written before top-1 was recorded have only the top-5 keys.
    key : str
        The evaluation coordinate (``"iter"`` or ``"weight"``); only values present for every
        seed are compared.
    metric : str, one of lowshot.phase_config.METRICS (the config's ``metric``)

    Returns
    -------
    (params, value, stats) or None
        The first maximum in grid order, then in increasing ``key``; ``stats`` holds the mean
        and std over seeds there of every metric all seeds have (``val_top5``, ``val_top5_std``,
        ``val_top1_novel``, ...) and ``nseeds``.
    """
    best, best_score = None, -np.inf
    for params, per_seed in points:
        if not per_seed:
            continue
        tables = [{e[key]: e for e in evals} for evals in per_seed]
        common = sorted(set.intersection(*[set(t) for t in tables]))
        for v in common:
            stats = seed_stats([t[v] for t in tables])
            if "val_" + metric not in stats:
                raise InputError("validation results without %s (written before it was recorded): delete "
                                 "them and run phase 1 again, or choose on metric: top5" % metric)
            if stats["val_" + metric] > best_score:
                best, best_score = (dict(params), v, stats), stats["val_" + metric]
    return best


def seed_stats(entries):
    """Mean and std over seeds (one entry each) of every metric that all entries have: ``val_top5``,
    ``val_top5_std``, ``val_top5_novel``, ``val_top5_novel_std``, ... and ``nseeds``."""
    stats = {}
    for k in evaluate.KS:
        pair = ("top%d" % k, "top%d_novel" % k)
        if all(m in e for e in entries for m in pair):
            vals = np.array([[e[m] for m in pair] for e in entries], dtype=np.float64)
            for m, mean, std in zip(pair, vals.mean(axis=0), vals.std(axis=0)):
                stats["val_" + m], stats["val_" + m + "_std"] = float(mean), float(std)
    stats["nseeds"] = len(entries)
    return stats
