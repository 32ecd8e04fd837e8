"""Phases of run_logreg.bash / run_diffusion.bash: restartable runs, parameter choice, tables.

The launcher tests use a test-local stand-in command (a python one-liner that writes a result JSON
atomically, or crashes); the choice and table tests compare against numpy on hand-made result
files; the end-to-end test runs the real scripts on a tiny generated $DDIR with (a reduced)
configs/small.yaml, and checks that a diffusion run split into class slices gives the result of
one process, that a graph shard task run again keeps its finished chunks and merges to the graph of
one process, and that a phase killed with SIGKILL leaves no run behind.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import yaml

from lowshot import ivf_build, phase_choice, phase_config, phases, prepare
from lowshot.launch import LocalLauncher, Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# stand-in experiment: writes {"value": V, "pid": ...} to --result atomically; exits 3 without
# writing anything when the file named by the 4th argument exists
STANDIN = (
    "import json, os, sys\n"
    "res, value, crash = sys.argv[1], float(sys.argv[2]), sys.argv[3]\n"
    "print('stand-in run', res)\n"
    "if os.path.exists(crash):\n"
    "    print('error: asked to crash'); sys.exit(3)\n"
    "tmp = res + '.tmp'\n"
    "json.dump({'value': value, 'pid': os.getpid()}, open(tmp, 'w'))\n"
    "os.replace(tmp, res)\n")


def standin_runs(d, n, crash_files=None):
    """n stand-in runs r0..r{n-1}; run i crashes while ``crash_files[i]`` exists."""
    runs = []
    for i in range(n):
        base = os.path.join(d, "r%d" % i)
        crash = (crash_files or {}).get(i, base + ".nocrash")
        runs.append(Run("r%d" % i, [sys.executable, "-c", STANDIN, base + ".json", str(i), crash],
                        [base + ".json"], base + ".log", expect={"value": float(i)}))
    return runs


def small_cfg(**over):
    cfg = phase_config.load_config(os.path.join(ROOT, "configs", "small.yaml"))
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_configs_load():
    paper = phases.Phases(phase_config.load_config(os.path.join(ROOT, "configs", "paper.yaml")),
                          rundir="/nonexistent")
    # paper grid: 5 n x 3 lr x 3 wd x 3 batch sizes x 5 seeds; diffusion: 5 n x 4 nbg x 5 seeds
    assert len(paper.logreg_val_runs()) == 5 * 3 * 3 * 3 * 5
    assert len(set(r.outputs[0] for r in paper.logreg_val_runs())) == 675
    assert paper.variants() == [(0, False), (10**6, False), (10**7, False), (10**8, False)]
    assert paper.nslices(10**8) == 8 and paper.nslices(10**6) == 1
    small = phases.Phases(small_cfg(), rundir="/nonexistent")
    assert len(small.logreg_val_runs()) == 2 * 2 * 2 * 1 * 2


def test_config_rejects_unknown_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("logreg:\n  lrs: [0.1]\n")
    with pytest.raises(phases.InputError, match="unknown key 'lrs' in logreg"):
        phase_config.load_config(str(p))
    # the demo's template used as a config: a one-line error naming the key, not a traceback
    with pytest.raises(phases.InputError, match=r"diffusion.nbg must be a list of background sizes .*own_data.py --phases_template"):
        phase_config.load_config(os.path.join(ROOT, "configs", "demo.yaml"))
    p.write_text("fusion:\n  nbg: [-5]\n")
    with pytest.raises(phases.InputError, match=r"fusion.nbg must be a list"):
        phase_config.load_config(str(p))


def test_local_skips_existing_and_redoes_crashed(tmp_path):
    d = str(tmp_path / "runs")
    os.makedirs(d)
    crash = str(tmp_path / "crash_r2")
    ph = phases.Phases(small_cfg(), rundir=d, launcher=LocalLauncher(ROOT, nproc=2, progress_s=0))
    runs = standin_runs(d, 5, {2: crash})
    # r0 exists already (done), r1 exists with other parameters (stale: redone)
    with open(runs[0].outputs[0], "w") as f:
        json.dump({"value": 0.0, "pid": -1}, f)
    with open(runs[1].outputs[0], "w") as f:
        json.dump({"value": 99.0, "pid": -1}, f)
    open(crash, "w").close()

    assert ph.execute(runs, "t") == "incomplete"
    res = {r.name: json.load(open(r.outputs[0])) for r in runs if os.path.exists(r.outputs[0])}
    assert sorted(res) == ["r0", "r1", "r3", "r4"]        # the crash left no result
    assert res["r0"]["pid"] == -1                          # skipped, not re-run
    assert not os.path.exists(runs[0].log)
    assert res["r1"]["value"] == 1.0 and res["r1"]["pid"] != -1
    assert "error: asked to crash" in open(runs[2].log).read()

    # second pass: only the crashed run starts again
    os.remove(crash)
    before = {n: r["pid"] for n, r in res.items()}
    mtimes = {r.name: os.path.getmtime(r.log) for r in runs[1:]}
    assert ph.execute(runs, "t") == "ok"
    after = {r.name: json.load(open(r.outputs[0]))["pid"] for r in runs}
    assert {n: after[n] for n in before} == before
    assert after["r2"] not in before.values()
    for r in runs[1:]:
        assert (os.path.getmtime(r.log) != mtimes[r.name]) == (r.name == "r2")


def test_two_invocations_run_each_command_once(tmp_path):
    """`bash run_logreg.bash 1` twice at once (local launcher): each run starts once; the second
    invocation waits for the runs the first one holds and counts their outcome."""
    slow = (
        "import json, os, sys, time\n"
        "res, starts = sys.argv[1], sys.argv[2]\n"
        "with open(starts, 'a') as f: f.write('%s\\n' % os.path.basename(res))\n"
        "time.sleep(1.0)\n"
        "json.dump({'pid': os.getpid()}, open(res + '.tmp', 'w'))\n"
        "os.replace(res + '.tmp', res)\n")
    driver = (
        "import json, os, sys\n"
        "from lowshot.launch import LocalLauncher, Run\n"
        "d, slow = sys.argv[1], sys.argv[2]\n"
        "runs = [Run('r%d' % i, [sys.executable, '-c', slow, os.path.join(d, 'r%d.json' % i), os.path.join(d, 'starts')],\n"
        "            [os.path.join(d, 'r%d.json' % i)], os.path.join(d, 'r%d.log' % i)) for i in range(6)]\n"
        "runs = [r for r in runs if not r.is_done()]\n"
        "failed = LocalLauncher(os.getcwd(), nproc=2, progress_s=0, poll_s=0.02).execute(runs, 't')\n"
        "print(json.dumps([r.name for r in failed]))\n")
    d = str(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", driver, d, slow], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert [json.loads(o.strip().splitlines()[-1]) for o, _ in outs] == [[], []]
    starts = open(os.path.join(d, "starts")).read().split()
    assert sorted(starts) == ["r%d.json" % i for i in range(6)]      # each run started once
    assert any("running in another invocation" in o for o, _ in outs)


def test_shell_line_round_trips_through_bash(tmp_path):
    odd = "a b'c\"d$e\nf\\g\th"
    r = Run("odd", [sys.executable, "-c", "import sys; open(sys.argv[2], 'w').write(sys.argv[1])",
                    odd, str(tmp_path / "out")], [str(tmp_path / "out")], str(tmp_path / "log"))
    line = r.shell_line(str(tmp_path), {"OMP_NUM_THREADS": "1"})
    assert "\n" not in line
    subprocess.run(["bash", "-c", line], check=True)
    assert open(tmp_path / "out").read() == odd


def test_local_runs_wait_for_inputs(tmp_path):
    d = str(tmp_path)
    ph = phases.Phases(small_cfg(), rundir=d, launcher=LocalLauncher(ROOT, nproc=1, progress_s=0))
    r = standin_runs(d, 1)[0]
    r.deps = [str(tmp_path / "missing.npy")]
    assert ph.execute([r], "t") == "incomplete"
    assert not os.path.exists(r.log)


# ------------------------------------------------------------------------------------ phase 2


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _logreg_grid(cfg):
    c = cfg["logreg"]
    return [(lr, wd, bs) for lr in c["lr"] for wd in c["wd"] for bs in c["batchsize"]]


def test_phase2_logreg_choice_matches_numpy(tmp_path):
    cfg = small_cfg(seeds=[1, 2, 3], nlabeled=[1, 2, 5])
    cfg["logreg"].update(lr=[0.01, 0.001, 0.0001], wd=[0, 0.1], batchsize=[16, 64], maxiter=2500)
    ph = phases.Phases(cfg, rundir=str(tmp_path))
    grid = _logreg_grid(cfg)
    iters = [500, 1000, 1500, 2000, 2500]
    rng = np.random.default_rng(0)
    # acc[n, grid point, seed, iteration, metric]
    acc = rng.uniform(0.2, 0.9, size=(3, len(grid), 3, len(iters), 2))
    for run in ph.logreg_val_runs():
        e = run.expect
        a = acc[cfg["nlabeled"].index(e["nlabeled"]),
                grid.index((e["lr"], e["wd"], e["batchsize"])), e["seed"] - 1]
        _write(run.outputs[0], dict(e, script="logreg", evals=[
            {"iter": it, "top5": a[j, 0], "top5_novel": a[j, 1]} for j, it in enumerate(iters)]))
    assert ph.phase("logreg", 2) == 0
    chosen = yaml.safe_load(open(tmp_path / "chosen_logreg.yaml"))["logreg"]
    for i, n in enumerate(cfg["nlabeled"]):
        mean = acc[i, :, :, :, 0].mean(axis=1)            # (grid, iters), over seeds
        g, j = np.unravel_index(np.argmax(mean), mean.shape)
        lr, wd, bs = grid[g]
        c = chosen[n]
        assert (c["lr"], c["wd"], c["batchsize"], c["maxiter"]) == (lr, wd, bs, iters[j])
        assert c["val_top5"] == pytest.approx(mean[g, j])
        assert c["val_top5_std"] == pytest.approx(acc[i, g, :, j, 0].std())
        assert c["val_top5_novel"] == pytest.approx(acc[i, g, :, j, 1].mean())

    # novel-class metric
    cfg2 = copy.deepcopy(cfg)
    cfg2["metric"] = "top5_novel"
    chosen2 = phases.Phases(cfg2, rundir=str(tmp_path)).choose_logreg()
    mean = acc[0, :, :, :, 1].mean(axis=1)
    g, j = np.unravel_index(np.argmax(mean), mean.shape)
    assert (chosen2[1]["lr"], chosen2[1]["wd"], chosen2[1]["batchsize"], chosen2[1]["maxiter"]) \
        == grid[g] + (iters[j],)

    # a missing result stops phase 2; --partial chooses among the complete grid points
    g_best = grid.index((chosen[1]["lr"], chosen[1]["wd"], chosen[1]["batchsize"]))
    victim = [r for r in ph.logreg_val_runs() if r.expect["nlabeled"] == 1 and r.expect["seed"] == 2
              and (r.expect["lr"], r.expect["wd"], r.expect["batchsize"]) == grid[g_best]][0]
    os.remove(victim.outputs[0])
    with pytest.raises(phases.InputError, match="1 of 108 validation results are missing"):
        ph.choose_logreg()
    partial = phases.Phases(cfg, rundir=str(tmp_path), partial=True).choose_logreg()
    mean = acc[0, :, :, :, 0].mean(axis=1)
    mean[g_best] = -1
    g, j = np.unravel_index(np.argmax(mean), mean.shape)
    assert (partial[1]["lr"], partial[1]["wd"], partial[1]["batchsize"], partial[1]["maxiter"]) \
        == grid[g] + (iters[j],)


def test_choose_best_ties_go_to_first_point_and_iteration():
    per_seed = [[{"iter": it, "top5": 0.5, "top5_novel": 0.1} for it in (500, 1000)]] * 2
    best = phase_choice.choose_best([({"lr": 1}, per_seed), ({"lr": 2}, per_seed)], "iter", "top5")
    assert best[0] == {"lr": 1} and best[1] == 500
    # iterations missing for one seed are not compared
    uneven = [[{"iter": 500, "top5": 0.1, "top5_novel": 0}, {"iter": 1000, "top5": 0.9, "top5_novel": 0}],
              [{"iter": 500, "top5": 0.2, "top5_novel": 0}]]
    best = phase_choice.choose_best([({}, uneven)], "iter", "top5")
    assert best[1] == 500 and best[2]["val_top5"] == pytest.approx(0.15)


def test_choose_best_top1_picks_another_cell():
    """Point A is best by top-5, point B by top-1 (hand-made); the stats hold both metrics."""
    def evals(top1, top5):
        return [{"iter": 500, "top1": top1, "top1_novel": top1 / 2, "top5": top5, "top5_novel": top5 / 2}]
    a = [evals(0.30, 0.90), evals(0.34, 0.86)]       # means: top-1 0.32, top-5 0.88
    b = [evals(0.50, 0.80), evals(0.40, 0.82)]       # means: top-1 0.45, top-5 0.81
    points = [({"lr": "A"}, a), ({"lr": "B"}, b)]
    params, it, stats = phase_choice.choose_best(points, "iter", "top5")
    assert params == {"lr": "A"} and stats["val_top5"] == pytest.approx(0.88)
    assert stats["val_top1"] == pytest.approx(0.32) and stats["val_top1_std"] == pytest.approx(0.02)
    params, it, stats = phase_choice.choose_best(points, "iter", "top1")
    assert params == {"lr": "B"} and stats["val_top1"] == pytest.approx(0.45)
    assert stats["val_top1_novel"] == pytest.approx(0.225) and stats["nseeds"] == 2
    # results written before top-1 was recorded: top-5 still chooses, top-1 says why it cannot
    old = [[{"iter": 500, "top5": 0.5, "top5_novel": 0.1}]] * 2
    _, _, stats = phase_choice.choose_best([({}, old)], "iter", "top5")
    assert "val_top1" not in stats and stats["val_top5"] == 0.5
    with pytest.raises(phases.InputError, match="validation results without top1"):
        phase_choice.choose_best([({}, old)], "iter", "top1")


def test_phase2_metric_top1_chosen_and_recorded(tmp_path, capsys):
    """metric: top1 chooses the iteration where top-1 peaks (top-5 peaks elsewhere) and says so in
    chosen_diffusion.yaml and phase 4's tables."""
    top1 = [0.1, 0.6, 0.5, 0.4]
    top5 = [0.3, 0.7, 0.8, 0.9]
    for metric, want in (("top5", 3), ("top1", 1)):
        rundir = tmp_path / metric
        cfg = small_cfg(seeds=[1, 2], nlabeled=[1], metric=metric)
        cfg["diffusion"].update(nbg=[0], niter=3)
        ph = phases.Phases(cfg, rundir=str(rundir))
        for run in ph.diffusion_val_runs()[0]:
            _write(run.outputs[0], dict(run.expect, script="diffusion", iters=[
                {"iter": t, "top1": top1[t], "top1_novel": 0, "top5": top5[t], "top5_novel": 0}
                for t in range(4)]))
        assert ph.phase("diffusion", 2) == 0
        text = open(ph.chosen_path("diffusion")).read()
        chosen = yaml.safe_load(text)
        assert chosen["metric"] == metric and chosen["diffusion"][1]["nbg0"]["niter"] == want
        assert "of the validation %s (the config's metric" % metric in text
        out = capsys.readouterr().out
        assert "niter %d  val top-5 %.2f ± 0.00 (novel 0.00 ± 0.00), top-1 %.2f ± 0.00" % (
            want, 100 * top5[want], 100 * top1[want]) in out
        ph.phase("diffusion", 4)
        phrase = "top-%s accuracy over all classes (config metric: %s)" % (metric[3:], metric)
        assert phrase in open(rundir / "results" / "diffusion.md").read()
    # the same choice from results without top-1: one-line error
    for run in ph.diffusion_val_runs()[0]:
        _write(run.outputs[0], dict(run.expect, script="diffusion", iters=[
            {"iter": t, "top5": top5[t], "top5_novel": 0} for t in range(4)]))
    with pytest.raises(phases.InputError, match=r"^validation results without top1 \(written before it was "
                                                r"recorded\): delete them and run phase 1 again, or choose "
                                                r"on metric: top5$"):
        ph.phase("diffusion", 2)


def test_config_metric(tmp_path):
    p = tmp_path / "c.yaml"
    for text, want in (("seeds: [1]\n", "top5"), ("metric: top1\n", "top1"),
                       ("choose_on: top5_novel\n", "top5_novel"),           # the key's older name
                       ("choose_on: top1\nmetric: top1\n", "top1")):
        p.write_text(text)
        assert phase_config.load_config(str(p))["metric"] == want
    for text, msg in (("metric: top3\n", "config %s: metric 'top3': must be one of top1, top1_novel, top5, "
                                         "top5_novel" % p),
                      ("metric: [top1]\n", "metric \\['top1'\\]: must be one of"),
                      ("choose_on: top2\n", "choose_on 'top2': must be one of top1, top1_novel"),
                      ("metric: top1\nchoose_on: top5\n", "metric 'top1' and choose_on 'top5' \\(its older "
                                                           "name\\) disagree: keep one")):
        p.write_text(text)
        with pytest.raises(phases.InputError, match=msg) as e:
            phase_config.load_config(str(p))
        assert "\n" not in str(e.value)


def test_phase2_diffusion_choice_matches_numpy(tmp_path):
    cfg = small_cfg(seeds=[1, 2, 3, 4], nlabeled=[1, 5])
    cfg["diffusion"].update(nbg=[0, 1000, 5000], niter=7)
    ph = phases.Phases(cfg, rundir=str(tmp_path))
    rng = np.random.default_rng(1)
    acc = rng.uniform(0.2, 0.9, size=(2, 3, 4, 8, 2))     # n, nbg, seed, iteration 0..7, metric
    first, merges = ph.diffusion_val_runs()
    assert not merges
    for run in first:
        e = run.expect
        a = acc[cfg["nlabeled"].index(e["nlabeled"]), [0, 1000, 5000].index(e["nbg"]), e["seed"] - 1]
        _write(run.outputs[0], dict(e, script="diffusion", iters=[
            {"iter": t, "top5": a[t, 0], "top5_novel": a[t, 1]} for t in range(8)]))
    assert ph.phase("diffusion", 2) == 0
    chosen = yaml.safe_load(open(tmp_path / "chosen_diffusion.yaml"))["diffusion"]
    for i, n in enumerate(cfg["nlabeled"]):
        for b, nbg in enumerate([0, 1000, 5000]):
            mean = acc[i, b, :, :, 0].mean(axis=0)
            assert chosen[n]["nbg%d" % nbg]["niter"] == int(np.argmax(mean))
            assert chosen[n]["nbg%d" % nbg]["val_top5"] == pytest.approx(mean.max())


def test_phase2_chooses_the_method_and_phase3_runs_it(tmp_path):
    """diffusion.methods: phase 1 runs every method, phase 2 picks (method, iterations) by the mean
    validation metric over the seeds (the first maximum in method order, then iteration order, as
    numpy's argmax over the flattened grid), phase 3 runs the chosen method under the background's
    file name."""
    cfg = small_cfg(seeds=[1, 2, 3], nlabeled=[1, 5])
    methods = ["douze18", "spreading", "poisson:gaussian"]
    cfg["diffusion"].update(nbg=[0, 1000], niter=5, methods=methods)
    ph = phases.Phases(cfg, rundir=str(tmp_path))
    rng = np.random.default_rng(2)
    acc = rng.uniform(0.2, 0.9, size=(2, 2, 3, 3, 6))     # n, nbg, method, seed, iteration 0..5
    first, _ = ph.diffusion_val_runs()
    assert len(first) == 2 * 2 * 3 * 3
    for run in first:
        e = run.expect
        spec = {("douze18", "binary"): 0, ("spreading", "binary"): 1, ("poisson", "gaussian"): 2}[
            (e["variant"], e["weights"])]
        assert ("--variant" in run.cmd) == (spec > 0)
        a = acc[cfg["nlabeled"].index(e["nlabeled"]), [0, 1000].index(e["nbg"]), spec, e["seed"] - 1]
        _write(run.outputs[0], dict(e, script="diffusion", iters=[
            {"iter": t, "top5": a[t], "top5_novel": a[t]} for t in range(6)]))
    assert ph.phase("diffusion", 2) == 0
    chosen = yaml.safe_load(open(tmp_path / "chosen_diffusion.yaml"))["diffusion"]
    for i, n in enumerate(cfg["nlabeled"]):
        for b, nbg in enumerate([0, 1000]):
            mean = acc[i, b].mean(axis=1)                  # method, iteration
            mi, it = np.unravel_index(np.argmax(mean), mean.shape)
            c = chosen[n]["nbg%d" % nbg]
            assert (c["method"], c["niter"]) == (methods[mi], it)
            test, _ = ph._diffusion_runs("test", "test", n, 1, nbg, False, c["niter"], spec=c["method"])
            assert os.path.basename(test[0].outputs[0]) == "nl%d.nbg%d.seed1.json" % (n, nbg)
            assert test[0].expect["variant"] == methods[mi].split(":")[0]
    bad = dict(yaml.safe_load(open(os.path.join(ROOT, "configs", "small.yaml"))))
    bad["diffusion"] = dict(bad["diffusion"], methods=["douze18", "heat:binary"])
    with open(tmp_path / "bad.yaml", "w") as f:
        yaml.safe_dump(bad, f)
    with pytest.raises(Exception, match=r"diffusion.methods entry 'heat:binary': variant 'heat'"):
        phase_config.load_config(str(tmp_path / "bad.yaml"))


# ------------------------------------------------------------------------------------ phase 4


def test_phase4_tables_match_numpy(tmp_path):
    cfg = small_cfg(seeds=[1, 2, 3], nlabeled=[1, 2, 10])
    cfg["diffusion"].update(nbg=[0, 1000000])
    cfg["fusion"].update(nbg=[1000000])
    ph = phases.Phases(cfg, rundir=str(tmp_path))
    rng = np.random.default_rng(2)
    # columns: logreg, diffusion none, diffusion F1M, combined F1M
    acc = rng.uniform(0.1, 0.95, size=(4, 3, 3, 2))       # column, n, seed, metric
    files = []
    for i, n in enumerate(cfg["nlabeled"]):
        for s in cfg["seeds"]:
            a = acc[:, i, s - 1]
            files.append((ph.path("logreg", "test", "nl%d.seed%d.json" % (n, s)),
                          {"top5": a[0, 0], "top5_novel": a[0, 1], "top1": a[0, 0] / 2, "top1_novel": a[0, 1] / 3}))
            files.append((ph.path("diffusion", "test", "nl%d.nbg0.seed%d.json" % (n, s)),
                          {"top5": a[1, 0], "top5_novel": a[1, 1]}))
            files.append((ph.path("diffusion", "test", "nl%d.nbg1000000.seed%d.json" % (n, s)),
                          {"top5": a[2, 0], "top5_novel": a[2, 1]}))
            files.append((ph.path("fusion", "test", "nl%d.nbg1000000.seed%d.json" % (n, s)),
                          {"weights": [0.3], "top5": [a[3, 0]], "top5_novel": [a[3, 1]]}))
    # one missing result: that cell averages the seeds that exist, marked (2/3)
    files = [f for f in files if f[0] != ph.path("fusion", "test", "nl10.nbg1000000.seed2.json")]
    for path, obj in files:
        _write(path, obj)
    assert ph.phase("diffusion", 4) == 0
    summary = json.load(open(tmp_path / "results" / "diffusion.json"))["columns"]
    assert [c["label"] for c in summary] == ["logreg", "diffusion none", "diffusion F1M",
                                             "combined F1M"]
    md = open(tmp_path / "results" / "diffusion.md").read()
    for c in range(4):
        for i, n in enumerate(cfg["nlabeled"]):
            for m, metric in enumerate(("top5", "top5_novel")):
                v = 100 * acc[c, i, :, m]
                if c == 3 and n == 10:
                    v = v[[0, 2]]
                cell = summary[c]["cells"][str(n)]
                assert cell[metric] == pytest.approx(v.mean())
                assert cell[metric + "_std"] == pytest.approx(v.std())
                assert "%.2f ± %.2f" % (v.mean(), v.std()) in md
    assert "(2/3)" in md
    # top-1: the logreg results have it, the others were written before it was recorded: "n/a"
    top1 = md[md.index("Top-1 accuracy (%) on the test split, all classes"):]
    for i, n in enumerate(cfg["nlabeled"]):
        v, vn = 100 * acc[0, i, :, 0] / 2, 100 * acc[0, i, :, 1] / 3
        cell = summary[0]["cells"][str(n)]
        assert (cell["top1"], cell["top1_novel"]) == pytest.approx((v.mean(), vn.mean()))
        assert "| %d | %.2f ± %.2f | n/a | n/a | n/a |" % (n, v.mean(), v.std()) in top1
        assert all(summary[c]["cells"][str(n)]["top1"] is None for c in (1, 2, 3))
    assert "n/a: results written before top-1 was recorded" in top1
    assert md.index("Top-5 accuracy (%) on the test split, all classes") < md.index("Top-1 accuracy")
    png = open(tmp_path / "results" / "diffusion.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ end to end

SCRIPTS = ["logreg.py", "diffusion.py", "fusion.py", "generate_ddir.py", "build_graph.py"]
NBG = 1000


@pytest.fixture(scope="module")
def tiny_ddir(tmp_path_factory):
    """A generated $DDIR (20 classes, D=32, d=16) with the graph of its NBG background images.

    Made once per test session (test_slurm.py uses it too), under pytest's base temporary folder.
    """
    missing = [s for s in SCRIPTS if not os.path.exists(os.path.join(ROOT, s))]
    if missing:
        pytest.skip("experiment scripts not there yet: %s" % ", ".join(missing))
    d = str(tmp_path_factory.getbasetemp() / "tiny_ddir")
    done = os.path.join(d, "graph.done")
    if not os.path.exists(done):
        py = sys.executable
        subprocess.run([py, "generate_ddir.py", d, "--nclass", "20", "--ntrain", "12", "--ntest",
                        "6", "--D", "32", "--d", "16", "--nbg", str(NBG), "--seed", "1"],
                       cwd=ROOT, check=True, capture_output=True)
        subprocess.run([py, "build_graph.py", str(NBG), "--k", "16", "--ddir", d],
                       cwd=ROOT, check=True, capture_output=True)
        open(done, "w").close()
    return d


def tiny_config(path, ddir, rundir, seeds=(1,), **diffusion):
    """configs/small.yaml, shrunk to the fewest runs that still exercise every phase (logreg.py
    runs take seconds: torch start-up): one seed, 2 learning rates x 2 evaluations."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "small.yaml")))
    cfg.update(rundir=rundir, ddir=ddir, split=os.path.join(ddir, "label_idx.json"),
               seeds=list(seeds), nlabeled=[1])
    cfg["logreg"].update(lr=[0.1, 0.01], wd=[0], batchsize=[16], maxiter=1000)
    cfg["diffusion"].update(nbg=[NBG], k=10, niter=4, **diffusion)
    cfg["fusion"].update(nbg=[NBG], weights=[0, 0.5, 1])
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def run_phase(script, phase, config, **env):
    e = dict(os.environ, CONFIG=config, LAUNCHER="local", NPROC="2", PYTHON=sys.executable)
    e.update(env)
    p = subprocess.run(["bash", script, str(phase)], cwd=ROOT, env=e, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_end_to_end_small_config(tiny_ddir, tmp_path):
    rundir = str(tmp_path / "runs")
    config = tiny_config(tmp_path / "tiny.yaml", tiny_ddir, rundir)
    for phase in (1, 2, 3, 4):
        run_phase("run_logreg.bash", phase, config)
    for phase in (1, 2, 3, 4):
        out = run_phase("run_diffusion.bash", phase, config)
    ph = phases.Phases(phase_config.load_config(config))
    lr_chosen = yaml.safe_load(open(ph.chosen_path("logreg")))["logreg"][1]
    # the choice is the best (lr, iteration) of the validation JSONs
    vals = {}
    for lr in (0.1, 0.01):
        res = json.load(open(ph.path("logreg", "val", "nl1.lr%g.wd0.bs16.seed1.json" % lr)))
        assert [e["iter"] for e in res["evals"]] == [500, 1000]
        for e in res["evals"]:
            vals[(lr, e["iter"])] = e["top5"]
    # first maximum in grid order, then iteration order (ties are likely on tiny data)
    best = [k for k in vals if vals[k] == max(vals.values())][0]
    assert (lr_chosen["lr"], lr_chosen["maxiter"]) == best
    assert lr_chosen["val_top5"] == pytest.approx(vals[best])
    test = json.load(open(ph.path("logreg", "test", "nl1.seed1.json")))
    assert (test["lr"], test["maxiter"], test["mode"]) == (lr_chosen["lr"], lr_chosen["maxiter"], "test")
    # the stored validation probabilities are what the fusion read: its weight-0 point is logreg alone
    from lowshot import data, evaluate
    split = data.load_split(os.path.join(tiny_ddir, "label_idx.json"), "val")
    y, _ = data.load_labels(data.feature_paths(tiny_ddir)["val"], split)
    P = np.load(ph.path("logreg", "val_scores", "nl1.seed1.npy"))
    assert P.shape == (y.size, split.nclass) and np.allclose(P.sum(axis=1), 1, atol=1e-4)
    dif = yaml.safe_load(open(ph.chosen_path("diffusion")))["diffusion"][1]["nbg%d" % NBG]
    val = json.load(open(ph.path("diffusion", "val", "nl1.nbg%d.seed1.json" % NBG)))
    top = [it["top5"] for it in val["iters"]]
    assert dif["niter"] == int(np.argmax(top))
    assert json.load(open(ph.path("diffusion", "test", "nl1.nbg%d.seed1.json" % NBG)))["niter"] \
        == dif["niter"]
    fus = yaml.safe_load(open(ph.chosen_path("fusion")))["fusion"][1]["nbg%d" % NBG]
    fval = json.load(open(ph.path("fusion", "val", "nl1.nbg%d.seed1.json" % NBG)))
    assert fval["weights"][0] == 0 and fval["top5"][0] == evaluate.top5(P, y, split.is_novel)[0]
    assert fus["weight"] == fval["weights"][int(np.argmax(fval["top5"]))]
    # phase 4: the printed table holds the numbers of the test JSONs
    summary = json.load(open(ph.path("results", "diffusion.json")))["columns"]
    assert [c["label"] for c in summary] == ["logreg", "diffusion F1k", "combined F1k"]
    for col, sub in zip(summary, [("logreg", "test", "nl1.seed1.json"),
                                  ("diffusion", "test", "nl1.nbg%d.seed1.json" % NBG),
                                  ("fusion", "test", "nl1.nbg%d.seed1.json" % NBG)]):
        r = json.load(open(ph.path(*sub)))
        for m in ("top5", "top1"):
            v = 100 * (r[m][0] if isinstance(r[m], list) else r[m])
            assert col["cells"]["1"][m] == pytest.approx(v)
            assert "%.2f ± 0.00" % v in out
    assert "n/a" not in out
    import matplotlib.image
    png = matplotlib.image.imread(ph.path("results", "diffusion.png"))
    assert png.ndim == 3 and min(png.shape[:2]) > 200 and png[..., :3].std() > 0.01   # a drawn figure
    # a second pass has nothing to do
    out = run_phase("run_diffusion.bash", 3, config)
    assert "0 to run" in out and "1 to run" not in out


def test_class_slices_merge_to_single_process_result(tiny_ddir, tmp_path):
    one = tiny_config(tmp_path / "one.yaml", tiny_ddir, str(tmp_path / "one"))
    sliced = tiny_config(tmp_path / "sliced.yaml", tiny_ddir, str(tmp_path / "sliced"), nslices=3)
    run_phase("run_diffusion.bash", 1, one)
    run_phase("run_diffusion.bash", 1, sliced)
    name = "nl1.nbg%d.seed1" % NBG
    a = json.load(open(tmp_path / "one" / "diffusion" / "val" / (name + ".json")))
    b = json.load(open(tmp_path / "sliced" / "diffusion" / "val" / (name + ".json")))
    slices = sorted(os.listdir(tmp_path / "sliced" / "diffusion" / "val" / "slices"))
    assert [f for f in slices if f.endswith(".npz")] == [
        "%s.k10.niter4.slice%dof3.npz" % (name, i) for i in range(3)]
    assert b["merged_slices"] == 3
    assert b["iters"] == a["iters"] and len(a["iters"]) == 5
    assert (b["top5"], b["top5_novel"]) == (a["top5"], a["top5_novel"])
    assert (b["top1"], b["top1_novel"]) == (a["top1"], a["top1_novel"])


def test_config_values_have_their_types(tmp_path):
    """Every value of a config is accepted or refused with a one-line error naming its key."""
    p = tmp_path / "c.yaml"
    for text, msg in (("logreg:\n  lr: [0.1, fast]\n", r"logreg.lr must be a list whose items are each a number, not 'fast'"),
                      ("diffusion:\n  k: '30'\n", r"diffusion.k must be an integer, not '30'"),
                      ("diffusion:\n  indomain: [false, 1]\n", r"diffusion.indomain must be a list whose items are each a boolean"),
                      ("seeds: 3\n", r"seeds must be a list, not 3"),
                      ("prepare:\n  pca: {dout: 2.5}\n", r"prepare.pca.dout must be an integer")):
        p.write_text(text)
        with pytest.raises(phases.InputError, match=msg):
            phase_config.load_config(str(p))
    p.write_text("logreg:\n  wd: [0, 0.5]\nslurm: {mem: 16000, time: 60}\ndiffusion:\n  args: [--lslice, 64]\n")
    cfg = phase_config.load_config(str(p))
    assert cfg["logreg"]["wd"] == [0, 0.5] and cfg["slurm"]["mem"] == 16000


def test_rerun_of_a_shard_keeps_its_finished_chunk(tiny_ddir, tmp_path):
    """A graph shard task stopped after the first of its two chunks (say, scancel): run again, it
    computes only the other one (the launcher leaves its work alone), and the merged graph is the
    one process' graph."""
    ddir, ref = str(tmp_path / "ddir"), str(tmp_path / "ref")
    for d in (ddir, ref):
        shutil.copytree(tiny_ddir, d, ignore=shutil.ignore_patterns("knngraph", "graph.done"))
    config = tiny_config(tmp_path / "tiny.yaml", ddir, str(tmp_path / "runs"))
    cfg = yaml.safe_load(open(config))
    ivf = ["--method", "ivf", "--nlist", "4", "--chunk_rows", "250"]       # 4 chunks, 2 per shard
    cfg["prepare"] = {"graph_shards": {NBG: 2}, "graph_args": ivf}
    yaml.safe_dump(cfg, open(config, "w"))
    ph = phases.Phases(phase_config.load_config(config))
    launcher = LocalLauncher(ROOT, nproc=2)
    assert launcher.execute(prepare.graph_runs(ph, "prepare"), "graph prepare") == []
    assert launcher.execute(prepare.graph_runs(ph, "shards"), "graph shards") == []
    work = os.path.join(ddir, "knngraph", "ndis%d_k16.work" % NBG)
    first, second = [ivf_build.chunk_paths(work, j) for j in ivf_build.shard_chunks(4, 0, 2)]
    for p in second.values():
        os.remove(p)
    kept = {p: os.stat(p) for p in first.values()}
    todo = [r for r in prepare.graph_runs(ph, "shards") if not r.is_done()]
    assert [r.name for r in todo] == ["graph.nbg%d.shard0of2" % NBG]
    assert launcher.execute(todo, "graph shards") == []
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in first.values()} == {
        p: (s.st_ino, s.st_mtime_ns) for p, s in kept.items()}
    assert json.loads(open(todo[0].log).read().strip().splitlines()[-1])["chunks_computed"] == 1
    run_phase("run_prepare.bash", 3, config)                # the merge
    subprocess.run([sys.executable, "build_graph.py", str(NBG), "--k", "16", "--ddir", ref] + ivf,
                   cwd=ROOT, check=True, capture_output=True)
    for name in ("ndis%d_k16_I_11.int32" % NBG, "ndis%d_k16_D_11.float32" % NBG):
        assert open(os.path.join(ddir, "knngraph", name), "rb").read() == \
            open(os.path.join(ref, "knngraph", name), "rb").read()


def test_killed_phase_leaves_no_run_and_rerun_succeeds(tiny_ddir, tmp_path):
    """SIGKILL of `bash run_logreg.bash 1` (the phase's python: bash execs it) while its logreg.py
    runs: the runs die with it (no worker left to fight the rerun), and the rerun completes."""
    config = tiny_config(tmp_path / "tiny.yaml", tiny_ddir, str(tmp_path / "runs"))
    p = subprocess.Popen(["bash", "run_logreg.bash", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL,
                         env=dict(os.environ, CONFIG=config, LAUNCHER="local", NPROC="2", PYTHON=sys.executable))
    t0 = time.time()
    while True:
        assert time.time() - t0 < 60 and p.poll() is None, "the phase started no logreg.py"
        try:
            kids = psutil.Process(p.pid).children(recursive=True)
            if any("logreg.py" in " ".join(k.cmdline()) for k in kids):
                break
        except psutil.Error:          # a child that ended meanwhile
            pass
        time.sleep(0.02)
    p.kill()
    p.wait()
    gone, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, [k.cmdline() for k in alive]
    out = run_phase("run_logreg.bash", 1, config)
    assert "0 failed, 0 left" in out
    ph = phases.Phases(phase_config.load_config(config))
    assert all(r.is_done() for r in ph.logreg_val_runs())
    assert not [f for f in os.listdir(ph.path("logreg", "val")) if f.endswith(".lock")]
