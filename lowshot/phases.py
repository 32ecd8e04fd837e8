"""The numbered phases of ``run_logreg.bash`` and ``run_diffusion.bash``: runs, choices, tables.

Phases (the numbering of the 2018 README):

1. validation grid (logreg: n x lr x wd x batch size x seeds, evaluated every 500 iterations;
   diffusion: n x background x seeds, evaluated after every iteration);
2. choice, per n (and background), of the parameters with the best mean validation metric over
   the seeds (the config's ``metric``: top-5 as the paper, top-1 for data with few classes) ->
   ``<rundir>/chosen_logreg.yaml``, ``<rundir>/chosen_diffusion.yaml``;
3. test runs with the chosen parameters. logreg also re-runs validation with the chosen
   parameters, storing the scores that the fusion needs. diffusion does the same, then runs the
   fusion ("combined") on validation over a grid of weights, chooses the weight per (n,
   background) -> ``<rundir>/chosen_fusion.yaml``, and runs the fusion on test. The fusion
   needs ``run_logreg.bash 3`` to be done;
4. Markdown tables (rows n, columns method x background, mean +- std over seeds, all classes and
   novel classes; top-5, then top-1) and PNG plots -> ``<rundir>/results/``.

Every run writes its own result JSON (``--result``); a phase reads those and skips runs whose
result exists, so re-running a phase only fills the gaps. Files under the run directory::

    logreg/val/nl{n}.lr{lr}.wd{wd}.bs{bs}.seed{s}.{json,log}     phase 1
    logreg/test/nl{n}.seed{s}.{json,log,npy}                     phase 3 (npy: test scores)
    logreg/val_scores/nl{n}.seed{s}.{json,log,npy}               phase 3 (validation scores)
    diffusion/val/nl{n}.nbg{N}.seed{s}.{json,log}                phase 1
    diffusion/{val,test}/slices/nl{n}.nbg{N}.seed{s}.k{k}.niter{t}.slice{i}of{m}.{npz,log}
    diffusion/test/..., diffusion/val_scores/...                 phase 3
    fusion/{val,test}/nl{n}.nbg{N}.seed{s}.{json,log}            phase 3
    chosen_{logreg,diffusion,fusion}.yaml                        phases 2 and 3
    results/{logreg,diffusion}.{md,json,png}                     phase 4
    slurm/                                                       job-array scripts and outputs

Nothing here reads the environment or touches files at import time (the command-line entry
``python -m lowshot.phases`` is only defined inside :func:`main`).

The config (schema, defaults, reader) is in lowshot/phase_config.py, the tables and plots in
lowshot/report.py (shared with the demo), the data-preparation phases in lowshot/prepare.py.
The Phases class gets the run grid of each experiment from lowshot/phase_runs.py and the choices
of phase 2 from lowshot/phase_choice.py; here are its paths, the execution, the collection of the
results and the phases themselves. Over 400 lines: one class, whose four phases share its paths and
its result collection; the run grids, choices, config and tables already live in the modules above.
"""
import json
import os
import sys
from argparse import ArgumentTypeError

from lowshot import data
from lowshot.common import (ArgumentParser, HelpFormatter, InputError, atomic_output, get_ddir, logger, positive_int,
                            require_file, run_main, write_json)
from lowshot.cpus import available_cpus
from lowshot.launch import make_launcher
from lowshot.phase_choice import Choices
from lowshot.phase_config import bg_label, load_config, run_name, variant_name
from lowshot.phase_runs import RunGrid
from lowshot.report import (format_choices, markdown_table, metric_phrase, plot_results, summarize, table_ks,
                            unrecorded_note)

log = logger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

class Phases(RunGrid, Choices):
    """The runs, choices and tables of one configuration.

    Parameters
    ----------
    cfg : dict
        From :func:`load_config`.
    rundir : str, optional
        Overrides ``cfg["rundir"]``; relative paths are relative to the current directory.
    launcher : lowshot.launch.LocalLauncher or SlurmLauncher or None
        None: phases 1 and 3 only list what they would run.
    partial : bool
        Phase 2 / the fusion choice: choose among the grid points that have all seeds instead of
        stopping when results are missing.
    """

    def __init__(self, cfg, rundir=None, launcher=None, partial=False):
        self.cfg = cfg
        self.rundir = os.path.abspath(rundir or cfg["rundir"])
        self.launcher = launcher
        self.partial = partial
        self.python = cfg["python"] or sys.executable
        self._nclass = {}

    # ---------------------------------------------------------------- paths and commands

    def path(self, *parts):
        return os.path.join(self.rundir, *parts)

    def _common(self):
        args = []
        if self.cfg["ddir"]:
            args += ["--ddir", self.cfg["ddir"]]
        if self.cfg["split"]:
            args += ["--split", self.cfg["split"]]
        return args

    def _script(self, name):
        return [self.python, os.path.join(ROOT, name)]

    def variants(self):
        """The diffusion backgrounds: list of (nbg, indomain)."""
        d = self.cfg["diffusion"]
        return [(int(nbg), bool(ind)) for ind in d["indomain"] for nbg in d["nbg"]]

    def fusion_variants(self):
        keep = self.cfg["fusion"]["nbg"]
        return [v for v in self.variants() if keep is None or v[0] in keep]

    def per_nbg(self, key, nbg, default=0):
        """A diffusion setting given as one int, or as a mapping nbg -> int (default elsewhere)."""
        v = self.cfg["diffusion"][key]
        if isinstance(v, dict):
            v = v.get(nbg, default)
        return int(v or default)

    def nslices(self, nbg):
        return max(1, self.per_nbg("nslices", nbg, 1))

    def nclass(self, mode):
        if mode not in self._nclass:
            self._nclass[mode] = data.load_split(self.cfg["split"], mode).nclass
        return self._nclass[mode]

    def _resources(self, experiment, nbg=None):
        res = dict(self.cfg[experiment]["slurm"])
        if nbg is not None:
            res.update(self.cfg["diffusion"]["slurm_by_nbg"].get(nbg, {}))
        return res

    # ---------------------------------------------------------------- logreg runs

    def execute(self, runs, label):
        """Launch the runs that are not done and whose inputs exist.

        Returns
        -------
        str
            "ok" (all done), "incomplete" (some failed or lack inputs) or "submitted" (Slurm
            without waiting: results come later).
        """
        todo = [r for r in runs if not r.is_done()]
        ready = [r for r in todo if r.is_ready()]
        blocked = [r for r in todo if not r.is_ready()]
        log("%s: %d runs: %d done, %d to run, %d waiting for inputs" % (
            label, len(runs), len(runs) - len(todo), len(ready), len(blocked)))
        for r in blocked[:5]:
            log("  %s waits for %s" % (r.name, r.missing_deps()[0]))
        if self.launcher is None:
            for r in ready:
                print(r.shell_line(ROOT))
            return "ok"
        failed = self.launcher.execute(ready, label) if ready else []
        if ready and not self.launcher.waits:
            return "submitted"
        if failed or blocked:
            log("%s: %d runs failed, %d could not start; re-run this phase to redo them" % (
                label, len(failed), len(blocked)))
            return "incomplete"
        return "ok"

    def execute_stages(self, stages, phase_label):
        """Run stages (label, callable -> runs) in order; stop after an asynchronous submission."""
        status = "ok"
        for i, (label, make_runs) in enumerate(stages):
            runs = make_runs()
            if not runs:
                continue
            st = self.execute(runs, "%s %s" % (phase_label, label))
            if st == "submitted":
                rest = [l for l, _ in stages[i + 1:]]
                log("%s: jobs submitted; when they are done, run this phase again%s" % (
                    phase_label, " to go on with: " + ", ".join(rest) if rest else ""))
                return "submitted"
            if st != "ok":
                status = "incomplete"
        return status

    # ---------------------------------------------------------------- reading results

    def read_result(self, path):
        with open(path) as f:
            return json.load(f)

    def collect(self, runs):
        """Result JSONs of runs that are done: dict name -> result; plus the missing names."""
        got, missing = {}, []
        for r in runs:
            if r.is_done():
                got[r.name] = self.read_result(r.outputs[0])
            else:
                missing.append(r)
        return got, missing

    def collect_validation(self, runs, experiment):
        """Validation results for phase 2: all of them, or (``--partial``) those that exist."""
        got, missing = self.collect(runs)
        self._report_missing(missing, "%s validation" % experiment)
        if missing and not self.partial:
            raise InputError("%d of %d validation results are missing under %s: run phase 1 "
                             "again (or choose among complete grid points with --partial)" % (
                                 len(missing), len(runs), self.path(experiment, "val")))
        return got

    def _report_missing(self, missing, what):
        if missing:
            log("%s: %d results missing, e.g. %s" % (what, len(missing), ", ".join(
                os.path.relpath(r.outputs[0], self.rundir) for r in missing[:5])))

    # ---------------------------------------------------------------- phase 2: choices

    def result_columns(self, experiment):
        """Columns of the results table: list of (label, {n: [result JSON or None per seed]})."""
        cols = []
        seeds = self.cfg["seeds"]
        self.missing_results = []

        def column(label, files):
            cells = {}
            for n in self.cfg["nlabeled"]:
                cells[n] = []
                for s in seeds:
                    f = files(n, s)
                    cells[n].append(self.read_result(f) if os.path.exists(f) else None)
                    if cells[n][-1] is None:
                        self.missing_results.append(f)
            cols.append((label, cells))

        column("logreg", lambda n, s: self.path("logreg", "test", run_name(n, s) + ".json"))
        if experiment == "diffusion":
            for nbg, ind in self.variants():
                vn = variant_name(nbg, ind)
                column("diffusion %s" % bg_label(nbg, ind),
                       lambda n, s, vn=vn: self.path("diffusion", "test", run_name(n, s, vn) + ".json"))
            for nbg, ind in self.fusion_variants():
                vn = variant_name(nbg, ind)
                column("combined %s" % bg_label(nbg, ind),
                       lambda n, s, vn=vn: self.path("fusion", "test", run_name(n, s, vn) + ".json"))
        return cols

    def test_split_facts(self):
        """The test split's classes, its images (rows of the feature files) and the chance level of
        each top-k, for the tables: {"nclass", "nnovel", "ntest", "ntrain", "chance": {k: %}}; the
        image counts are None when the feature files cannot be read, the whole is None without the
        split file."""
        ddir = self.cfg["ddir"] or os.environ.get("DDIR")
        try:
            path = self.cfg["split"] or (data.resolve_split(None, ddir) if ddir else None)
            split = data.load_split(path, "test")
        except InputError as e:
            log("results: no class counts or chance level (%s)" % e)
            return None
        facts = {"nclass": split.nclass, "nnovel": int(split.is_novel.sum()), "ntest": None, "ntrain": None,
                 "chance": {k: 100.0 * min(k, split.nclass) / split.nclass for k in table_ks()}}
        try:
            paths = data.feature_paths(get_ddir(ddir))
            facts["ntest"] = int(data.load_labels(paths["val"], split, require_all=False)[0].size)
            facts["ntrain"] = int(data.load_labels(paths["train"], split, require_all=False)[0].size)
        except InputError as e:
            log("results: no image counts (%s)" % e)
        return facts

    def results(self, experiment):
        """Phase 4: tables (printed and written), JSON summary and plots under results/."""
        cols = self.result_columns(experiment)
        summary = summarize(cols, self.cfg["nlabeled"])
        nseeds = len(self.cfg["seeds"])
        seeds = ", ".join(map(str, self.cfg["seeds"]))
        facts = self.test_split_facts()
        text = []
        if facts:
            chance = facts["chance"]
            text.append("Test split: %d classes (%d base, %d novel)%s. n = labelled training images per novel "
                        "class (base classes: all their training images). **Chance level: %s** (k of %d "
                        "classes, guessed at random).\n" % (
                            facts["nclass"], facts["nclass"] - facts["nnovel"], facts["nnovel"],
                            "" if facts["ntest"] is None else ", %d test images, %d training images" % (
                                facts["ntest"], facts["ntrain"]),
                            ", ".join("top-%d %.1f%%" % (k, chance[k]) for k in table_ks()), facts["nclass"]))
        for k in table_ks():
            for metric, what in (("top%d" % k, "all classes"), ("top%d_novel" % k, "novel classes")):
                text.append("Top-%d accuracy (%%) on the test split, %s: mean ± std over seeds %s%s\n" % (
                    k, what, seeds, " (chance %.1f%%)" % facts["chance"][k] if facts else ""))
                text.append(markdown_table(summary, self.cfg["nlabeled"], metric, nseeds))
            note = unrecorded_note(summary, "top%d" % k)
            if note:
                text.append(note + "\n")
        text.append("Parameters chosen on the validation split by the mean %s (config metric: %s).\n" % (
            metric_phrase(self.cfg["metric"]), self.cfg["metric"]))
        missing = self.missing_results
        if missing:
            text.append("(k/%d): only k seeds have a result; %d results missing.\n" % (
                nseeds, len(missing)))
            log("missing results, e.g.: %s" % ", ".join(
                os.path.relpath(f, self.rundir) for f in missing[:5]))
        md = "\n".join(text)
        print(md)
        out = self.path("results", experiment)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with atomic_output(out + ".md") as tmp:
            with open(tmp, "w") as f:
                f.write(md)
        title = ("%s: accuracy on the test split%s vs labelled images per novel class\nmean ± std over seeds "
                 "%s; runs in %s" % ("logreg" if experiment == "logreg" else "logreg, diffusion and combined",
                                     " (%d classes, %d novel)" % (facts["nclass"], facts["nnovel"]) if facts else "",
                                     seeds, os.path.join(*self.rundir.split(os.sep)[-2:])))
        write_json(out + ".json", {"seeds": self.cfg["seeds"], "columns": summary, "test_split": facts,
                                   "plot_title": title})
        plot_results(summary, self.cfg["nlabeled"], out + ".png", title, chance=facts["chance"] if facts else None)
        log("wrote %s.md, %s.json, %s.png" % (out, out, out))
        return summary, missing

    # ---------------------------------------------------------------- the phases

    def phase(self, experiment, number):
        """Run one phase; return the exit status (0 ok, 1 incomplete)."""
        label = "%s phase %d" % (experiment, number)
        if experiment == "prepare":
            from lowshot import prepare
            get_ddir(self.cfg["ddir"])
            status = self.execute_stages(prepare.stages(self, number), label)
            return 0 if status in ("ok", "submitted") else 1
        if number in (1, 3):
            # fail here rather than in hundreds of runs
            if not (self.cfg["ddir"] or os.environ.get("DDIR")):
                raise InputError("no data directory: set $DDIR or the config's ddir")
            get_ddir(self.cfg["ddir"])
            if self.cfg["split"]:
                require_file(self.cfg["split"], "split file (config key split)")
        if number == 1:
            if experiment == "logreg":
                stages = [("validation grid", self.logreg_val_runs)]
            else:
                runs = self.diffusion_val_runs()
                stages = [("validation grid", lambda: runs[0]),
                          ("merge class slices", lambda: runs[1])]
            return 0 if self.execute_stages(stages, label) in ("ok", "submitted") else 1
        if number == 2:
            return self.choose_phase(experiment)
        if number == 3:
            return self.test_phase(experiment, label)
        if number == 4:
            self.results(experiment)
            return 0
        raise InputError("phase %r: phases are 1 (validation grid), 2 (choose), 3 (test runs), 4 "
                         "(results)" % number)

    def choose_phase(self, experiment):
        """Phase 2: choose each n's parameters on the validation results; 0 when every n has them."""
        if experiment == "logreg":
            chosen = self.choose_logreg()
            how = "chosen by bash run_logreg.bash 2 from %s" % self.path("logreg", "val")
        else:
            chosen = self.choose_diffusion()
            how = "chosen by bash run_diffusion.bash 2 from %s" % self.path("diffusion", "val")
        for line in format_choices(chosen):
            print(line)
        self.write_chosen(experiment, chosen, how)
        return 0 if all(n in chosen for n in self.cfg["nlabeled"]) else 1

    def test_phase(self, experiment, label):
        """Phase 3: the test runs with the chosen parameters, then (diffusion) the fusion weights
        chosen on validation and the fusion on test; 0 when all are done or submitted."""
        hint = "run phase 2 first (bash run_%s.bash 2)" % experiment
        chosen = self.read_chosen(experiment, hint)
        if experiment == "logreg":
            stages = [("test runs", lambda: self.logreg_test_runs(chosen))]
            return 0 if self.execute_stages(stages, label) in ("ok", "submitted") else 1
        runs = self.diffusion_test_runs(chosen)
        stages = [("test runs", lambda: runs[0]), ("merge class slices", lambda: runs[1])]
        if self.fusion_variants():
            stages.append(("fusion on validation", lambda: self.fusion_runs("val")))
        st = self.execute_stages(stages, label)
        if st == "submitted" or not self.fusion_variants() or self.launcher is None:
            return 0 if st in ("ok", "submitted") else 1
        weights = self.choose_fusion()
        for line in format_choices(weights or {}):
            print(line)
        if weights is None:
            log("%s: fusion weights not chosen: validation fusion results are missing (they "
                "need bash run_logreg.bash 3)" % label)
            return 1
        self.write_chosen("fusion", weights, "fusion weights chosen by bash run_diffusion.bash "
                          "3 from %s" % self.path("fusion", "val"))
        st2 = self.execute_stages([("fusion on test", lambda: self.fusion_runs("test", weights))],
                                  label)
        return 0 if st == "ok" and st2 in ("ok", "submitted") else 1


############################################################################################
# Command line (called by run_logreg.bash / run_diffusion.bash)
############################################################################################


def main(argv=None):
    """``python -m lowshot.phases {logreg,diffusion} PHASE [--config ...]``; see ``--help``."""
    p = ArgumentParser(
        prog="python -m lowshot.phases", formatter_class=HelpFormatter,
        description=__doc__)
    p.add_argument("experiment", choices=["prepare", "logreg", "diffusion"])
    p.add_argument("phase", type=int, choices=[1, 2, 3, 4])
    g = p.add_argument_group("configuration")
    # defaults from the environment of run_logreg.bash / run_diffusion.bash (read here, not at import)
    env = os.environ
    g.add_argument("--config", default=env.get("CONFIG") or os.path.join(ROOT, "configs", "paper.yaml"),
                   help="grids, sizes and resources (configs/paper.yaml or configs/small.yaml; $CONFIG)")
    g.add_argument("--rundir", default=env.get("RUNDIR") or None,
                   help="override the config's rundir ($RUNDIR)")
    g = p.add_argument_group("launcher")
    g.add_argument("--launcher", choices=["local", "slurm"], default=env.get("LAUNCHER") or "local",
                   help="$LAUNCHER")
    nproc = env.get("NPROC") or None
    if nproc is not None:
        try:
            nproc = positive_int(nproc)
        except ArgumentTypeError as e:
            raise InputError("$NPROC (parallel runs): %s" % e)
    g.add_argument("--nproc", type=positive_int, default=nproc, help="local: parallel runs (default: cores; $NPROC)")
    g.add_argument("--no-wait", dest="wait", action="store_false", default=env.get("WAIT", "1") != "0",
                   help="slurm: return after submitting (run the phase again later; $WAIT=0)")
    g.add_argument("--dry-run", action="store_true", help="print the commands of missing runs")
    g.add_argument("--partial", action="store_true",
                   help="choose among the grid points that have all seeds when results are missing")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    ph = Phases(cfg, rundir=args.rundir, partial=args.partial)
    if not args.dry_run:
        slurm_opts = dict(cfg["slurm"])
        ph.launcher = make_launcher(
            args.launcher, ROOT, slurm_dir=ph.path("slurm"), slurm_options=slurm_opts,
            nproc=args.nproc or cfg["local"]["nproc"] or available_cpus(),
            threads_per_run=cfg["local"]["threads_per_run"], wait=args.wait)
    log("%s phase %d: config %s, run directory %s, launcher %s" % (
        args.experiment, args.phase, args.config, ph.rundir,
        "dry run" if args.dry_run else args.launcher))
    return ph.phase(args.experiment, args.phase)


if __name__ == "__main__":
    sys.exit(run_main(main))
