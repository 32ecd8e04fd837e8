"""Phase 2: the choice of each experiment's parameters by the mean validation metric over the seeds,
and the files that keep them (``chosen_{logreg,diffusion,fusion}.yaml``). A mixin of
lowshot.phases.Phases, and the choice itself (:func:`choose_best`, tested against numpy).
"""
import os

import numpy as np
import yaml

from lowshot.common import InputError, atomic_output, log
from lowshot.phase_config import METRICS, run_name, variant_name


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
            best = choose_best(points, "iter", self.cfg["choose_on"])
            if best is None:
                log("logreg n=%d: no grid point has all seeds: nothing chosen" % n)
                continue
            params, it, stats = best
            chosen[n] = dict(params, maxiter=it, **stats)
        return chosen

    def choose_diffusion(self):
        """Per (n, background), the number of iterations with the best mean validation metric."""
        first, merges = self.diffusion_val_runs()
        # one result JSON per run: the run itself, or the merge of its class slices
        runs = [r for r in first + merges if r.outputs[0].endswith(".json")]
        got = self.collect_validation(runs, "diffusion")
        chosen = {}
        for n, vn, names in self._complete_cells(got, self.variants(), "diffusion"):
            best = choose_best([({}, [got[nm]["iters"] for nm in names])], "iter", self.cfg["choose_on"])
            _, it, stats = best
            chosen.setdefault(n, {})[vn] = dict(niter=it, **stats)
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
            per_seed = [[{"weight": w, "top5": a, "top5_novel": b}
                         for w, a, b in zip(got[nm]["weights"], got[nm]["top5"], got[nm]["top5_novel"])]
                        for nm in names]
            best = choose_best([({}, per_seed)], "weight", self.cfg["choose_on"])
            _, w, stats = best
            chosen.setdefault(n, {})[vn] = dict(weight=w, **stats)
        return chosen

    def chosen_path(self, experiment):
        return self.path("chosen_%s.yaml" % experiment)

    def write_chosen(self, experiment, chosen, how):
        path = self.chosen_path(experiment)
        os.makedirs(self.rundir, exist_ok=True)
        header = ("# %s\n# metric: mean over seeds %s of the validation %s (all classes: top5, "
                  "novel classes: top5_novel);\n# val_* = mean and std over the seeds at the chosen "
                  "point. Read by phase 3.\n" % (how, self.cfg["seeds"], self.cfg["choose_on"]))
        with atomic_output(path) as tmp:
            with open(tmp, "w") as f:
                f.write(header)
                yaml.safe_dump({experiment: chosen}, f, sort_keys=True, default_flow_style=None)
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
        ``per_seed``: one list per seed of dicts ``{key: value, "top5": a, "top5_novel": b}``
        (e.g. logreg ``evals``, diffusion ``iters``, fusion weights).
    key : str
        The evaluation coordinate (``"iter"`` or ``"weight"``); only values present for every
        seed are compared.
    metric : {"top5", "top5_novel"}

    Returns
    -------
    (params, value, stats) or None
        The first maximum in grid order, then in increasing ``key``; ``stats`` holds the mean
        and std over seeds of both metrics there (``val_top5``, ``val_top5_std``, ...).
    """
    best, best_score = None, -np.inf
    for params, per_seed in points:
        if not per_seed:
            continue
        tables = [{e[key]: e for e in evals} for evals in per_seed]
        common = sorted(set.intersection(*[set(t) for t in tables]))
        for v in common:
            vals = np.array([[t[v]["top5"], t[v]["top5_novel"]] for t in tables], dtype=np.float64)
            mean = vals.mean(axis=0)
            score = mean[METRICS.index(metric)]
            if score > best_score:
                std = vals.std(axis=0)
                stats = {"val_top5": float(mean[0]), "val_top5_std": float(std[0]),
                         "val_top5_novel": float(mean[1]), "val_top5_novel_std": float(std[1]),
                         "nseeds": len(tables)}
                best, best_score = (dict(params), v, stats), score
    return best
