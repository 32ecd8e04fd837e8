"""LAUNCHER=slurm against a real Slurm: slurmctld + slurmd (Debian's slurm-wlm) and munged on
localhost, configured and started by a session fixture, stopped at the end.

Install the packages with ``bash ci/install_slurm.bash`` (CI does); without them these tests skip.
The cluster lives in a temporary directory (its own munge key and socket, slurm.conf, state and
spool directories, free TCP ports), so it does not touch a Slurm or munge already on the machine.
It keeps no accounting (no slurmdbd): the tests of what ``sacct`` reports, and of what a resubmission
keeps, use stand-in commands on the PATH and need no cluster.
"""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import numpy as np
import yaml

from lowshot import phase_config, phases
from lowshot.common import pid_alive
from lowshot.launch import Run, SlurmLauncher
from test_phases import ROOT, run_phase, standin_runs, tiny_config, tiny_ddir, NBG  # noqa: F401

DAEMONS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid, timeout=5):
    """Wait for ``pid`` to exit, then SIGTERM, then SIGKILL it (only this one process)."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and pid_alive(pid):
            os.kill(pid, sig)
        t0 = time.time()
        while pid_alive(pid) and time.time() - t0 < timeout:
            time.sleep(0.1)
        if not pid_alive(pid):
            return


def _cluster_processes(conf):
    """Pids of processes started by this cluster (daemons, slurmstepd, job tasks): their
    environment holds our SLURM_CONF. This process and its ancestors are left out."""
    keep, pid = set(), os.getpid()
    while pid > 1:
        keep.add(pid)
        try:
            pid = int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    mark = ("SLURM_CONF=%s" % conf).encode()
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in keep:
            try:
                env = open("/proc/%s/environ" % d, "rb").read().split(b"\0")
            except OSError:
                continue
            if mark in env:
                found.append(int(d))
    return found


def _logs(base):
    out = []
    for name in ("slurmctld.log", "slurmd.log", "munged.log"):
        p = os.path.join(base, "log", name)
        if os.path.exists(p):
            out.append("== %s\n%s" % (p, "".join(open(p).readlines()[-20:])))
    return "\n".join(out)


SLURM_CONF = """\
# one-node Slurm on localhost for tests/test_slurm.py (no cgroups, no accounting)
ClusterName=lowshottest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.sock
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start munged, slurmctld and slurmd on localhost; yield the config path; stop them."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip("Slurm/munge not installed (no %s): run bash ci/install_slurm.bash (Debian "
                    "packages slurm-wlm and munge)" % ", ".join(missing))
    base = str(tmp_path_factory.mktemp("slurm"))
    os.chmod(base, 0o755)
    for sub in ("munge", "state", "spool", "run", "log", "munge-key"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.chmod(os.path.join(base, "munge-key"), 0o700)
    key = os.path.join(base, "munge-key", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    user = pwd.getpwuid(os.getuid()).pw_name
    cpus = len(os.sched_getaffinity(0))
    mem_mib = int(open("/proc/meminfo").readline().split()[1]) // 1024
    conf = os.path.join(base, "slurm.conf")
    with open(conf, "w") as f:
        f.write(SLURM_CONF.format(base=base, user=user, cpus=cpus, mem=int(mem_mib * 0.8),
                                  ctld_port=_free_port(), d_port=_free_port()))
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    pidfiles = [os.path.join(base, "run", n) for n in ("slurmd.pid", "slurmctld.pid", "munged.pid")]
    pids = [None] * 3
    try:
        subprocess.run(["munged", "--force", "--socket=%s/munge/munge.sock" % base,
                        "--key-file=%s" % key, "--log-file=%s/log/munged.log" % base,
                        "--pid-file=%s/run/munged.pid" % base,
                        "--seed-file=%s/munge/munged.seed" % base], check=True)
        subprocess.run(["slurmctld", "-f", conf], check=True)
        subprocess.run(["slurmd", "-f", conf, "-N", "localhost"], check=True)
        t0 = time.time()
        state = ""
        while time.time() - t0 < 60:
            p = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"],
                               capture_output=True, text=True)
            state = p.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail("the test Slurm node did not become idle (state %r)\n%s" % (state, _logs(base)))
        # read now: slurmd removes its pid file as soon as it starts shutting down
        pids = [_pid(pf) for pf in pidfiles]
        yield {"conf": conf, "base": base}
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel"] + sorted(set(jobs)), capture_output=True)
        pids = [pid or _pid(pf) for pid, pf in zip(pids, pidfiles)]
        subprocess.run(["scontrol", "shutdown"], capture_output=True)
        for pid in pids[:2]:        # slurmd, slurmctld
            if pid:
                _stop(pid)
        subprocess.run(["munged", "--stop", "--socket=%s/munge/munge.sock" % base],
                       capture_output=True)
        if pids[2]:
            _stop(pids[2])
        # whatever survived (a slurmstepd of a task stuck at the end of a failed test)
        for pid in _cluster_processes(conf):
            _stop(pid, timeout=2)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def _queue_state(jobid, index):
    p = subprocess.run(["squeue", "-h", "-r", "-j", jobid, "-o", "%i %t"], capture_output=True,
                       text=True)
    for line in p.stdout.splitlines():
        i, st = line.split()
        if i == "%s_%d" % (jobid, index):
            return st
    return None


def test_slurm_array_kill_one_task_and_redo_only_it(slurm_cluster, tmp_path):
    d = str(tmp_path / "runs")
    os.makedirs(d)
    slow = str(tmp_path / "slow")
    open(slow, "w").close()
    runs = standin_runs(d, 4)
    # r3 sleeps as long as the file `slow` exists, so that it can be killed while running
    runs[3].cmd[2] = ("import os, sys, time\n"
                      "while os.path.exists(%r): time.sleep(0.2)\n" % slow) + runs[3].cmd[2]
    opts = {"time": "0:05:00", "mem": "100M", "cpus_per_task": 1, "throttle": 2, "poll_s": 0.5}
    launcher = SlurmLauncher(ROOT, str(tmp_path / "slurm"), opts, wait=True)
    jobs = launcher.submit(runs, "kill test")
    assert len(jobs) == 1 and len(jobs[0][1]) == 4
    jobid = jobs[0][0]
    t0 = time.time()
    while not (all(r.is_done() for r in runs[:3]) and _queue_state(jobid, 3) == "R"):
        assert time.time() - t0 < 60, "array tasks did not run"
        time.sleep(0.3)
    # started again while r3 still runs, the phase does not submit r3 a second time
    again = SlurmLauncher(ROOT, str(tmp_path / "slurm"), opts, wait=False)
    assert again.still_queued([runs[3]]) == [(jobid, [(3, runs[3])])]
    assert again.execute([runs[3]], "kill test") == []
    assert len([f for f in os.listdir(tmp_path / "slurm") if f.endswith(".tasks")]) == 1
    subprocess.run(["scancel", "%s_3" % jobid], check=True)
    launcher.wait(jobs, "kill test")
    assert [r.is_done() for r in runs] == [True, True, True, False]
    os.remove(slow)
    pids = {r.name: json.load(open(r.outputs[0]))["pid"] for r in runs[:3]}

    # re-running submits an array with only the killed task
    ph = phases.Phases(phase_config.load_config(os.path.join(ROOT, "configs", "small.yaml")),
                       rundir=d, launcher=launcher)
    assert ph.execute(runs, "kill test") == "ok"
    assert all(r.is_done() for r in runs)
    assert {r.name: json.load(open(r.outputs[0]))["pid"] for r in runs[:3]} == pids
    tasks = sorted(f for f in os.listdir(tmp_path / "slurm") if f.endswith(".tasks"))
    assert len(tasks) == 2
    lines = open(tmp_path / "slurm" / tasks[-1]).read().splitlines()
    assert len(lines) == 1 and "r3.json" in lines[0]
    outs = [f for f in os.listdir(tmp_path / "slurm") if f.endswith(".out")]
    assert len(outs) == 5                                  # per-task Slurm outputs


def test_slurm_phase_with_real_scripts(slurm_cluster, tiny_ddir, tmp_path):
    rundir = tmp_path / "runs"
    config = tiny_config(tmp_path / "tiny.yaml", tiny_ddir, str(rundir), seeds=(1, 2))
    # WAIT=0 returns right after submission (held here: sbatch --hold from the config's args);
    # started again before the tasks ran, the phase submits nothing new and waits for them
    held = tiny_config(tmp_path / "held.yaml", tiny_ddir, str(rundir), seeds=(1, 2))
    cfg = yaml.safe_load(open(held))
    cfg["slurm"]["args"] = ["--hold"]
    yaml.safe_dump(cfg, open(held, "w"))
    out = run_phase("run_diffusion.bash", 1, held, LAUNCHER="slurm", WAIT="0")
    m = re.search(r"submitted job array (\d+) \(2 tasks", out)
    assert m and "jobs submitted; when they are done, run this phase again" in out
    p = subprocess.Popen(["bash", "run_diffusion.bash", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, CONFIG=config, LAUNCHER="slurm", PYTHON=sys.executable))
    first = ""
    for _ in range(6):       # the phase prints this before it starts waiting
        first += p.stdout.readline()
        if "still queued" in first:
            break
    subprocess.run(["scontrol", "release", m.group(1)], check=True)
    assert "still queued or running as tasks of job %s" % m.group(1) in first
    out = first + p.stdout.read()
    assert p.wait() == 0 and "submitted job array" not in out
    val = rundir / "diffusion" / "val"
    names = ["nl1.nbg%d.seed%d.json" % (NBG, s) for s in (1, 2)]
    res = [json.load(open(val / n)) for n in names]
    assert all(r["niter"] == 4 and len(r["iters"]) == 5 for r in res)
    # the same run outside Slurm gives the same numbers
    local = tmp_path / "local.json"
    subprocess.run([sys.executable, "diffusion.py", "--mode", "val", "--nlabeled", "1", "--seed", "1",
                    "--k", "10", "--nbg", str(NBG), "--niter", "4", "--ddir", tiny_ddir, "--split",
                    os.path.join(tiny_ddir, "label_idx.json"), "--result", str(local)],
                   cwd=ROOT, check=True, capture_output=True)
    assert json.load(open(local))["iters"] == res[0]["iters"]
    # delete one result: the next submission holds only that run
    mtime = os.path.getmtime(val / names[0])
    os.remove(val / names[1])
    out = run_phase("run_diffusion.bash", 1, config, LAUNCHER="slurm")
    assert "1 done, 1 to run" in out and "(1 tasks" in out
    assert os.path.getmtime(val / names[0]) == mtime
    assert json.load(open(val / names[1]))["iters"] == res[1]["iters"]
    # phase 2 only reads: it works the same under LAUNCHER=slurm
    run_phase("run_diffusion.bash", 2, config, LAUNCHER="slurm")
    chosen = yaml.safe_load(open(rundir / "chosen_diffusion.yaml"))["diffusion"][1]["nbg%d" % NBG]
    mean = np.mean([[it["top5"] for it in r["iters"]] for r in res], axis=0)
    assert chosen["niter"] == int(np.argmax(mean)) and chosen["val_top5"] == pytest.approx(mean.max())


def test_slurm_prepare_phases(slurm_cluster, tmp_path):
    """run_prepare.bash under a real Slurm: features (one array task per block), PCA, the graph as
    --prepare, 2 --shard tasks and the merge; the outputs checked as in test_prepare.py."""
    from test_prepare import check_prepared, prepare_config
    ddir = str(tmp_path / "ddir")
    os.makedirs(ddir)
    config = prepare_config(tmp_path, ddir)
    cfg = yaml.safe_load(open(config))
    cfg["slurm"].update(mem="2G", cpus_per_task=1, poll_s=1)
    yaml.safe_dump(cfg, open(config, "w"))
    out = run_phase("run_prepare.bash", 1, config, LAUNCHER="slurm")
    assert "submitted job array" in out and "(5 tasks" in out
    run_phase("run_prepare.bash", 2, config, LAUNCHER="slurm")
    out = run_phase("run_prepare.bash", 3, config, LAUNCHER="slurm")
    assert "(2 tasks" in out       # the shards as one array
    check_prepared(ddir)
    slurm_dir = tmp_path / "runs" / "slurm"
    # one array per step: features, PCA train, PCA apply, graph prepare, graph shards, graph merge
    assert len([f for f in os.listdir(slurm_dir) if f.endswith(".tasks")]) == 6


# ---------------------------------------------------------------- without a cluster: stand-in commands

def _fake_commands(folder, **scripts):
    """Executables ``folder/name`` running the given bash bodies (stand-ins for sbatch, sacct, ...)."""
    os.makedirs(folder, exist_ok=True)
    for name, body in scripts.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write("#!/bin/bash\n" + body + "\n")
        os.chmod(path, 0o755)
    return folder


@pytest.mark.parametrize("sacct", ["printf '42_0|CANCELLED by 1000|0:15\\n42_1|OUT_OF_MEMORY|0:125\\n'",
                                   "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1"])
def test_failed_line_gives_the_slurm_state(tmp_path, monkeypatch, capsys, sacct):
    """A task that left the queue without its outputs: the FAILED line says how it ended (sacct's
    state and exit code); without accounting, the log's last line alone, as before."""
    bin_dir = _fake_commands(str(tmp_path / "bin"), sbatch="echo 42", squeue="true", sacct=sacct)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    runs = standin_runs(str(tmp_path / "runs"), 2)
    for r in runs:
        os.makedirs(os.path.dirname(r.log), exist_ok=True)
        with open(r.log, "w") as f:
            f.write("table: chunk 1 of 2 done\n")
    launcher = SlurmLauncher(ROOT, str(tmp_path / "slurm"), {"poll_s": 0.01})
    assert launcher.execute(runs, "test") == runs
    out = capsys.readouterr().out
    if sacct.startswith("printf"):
        assert "test: FAILED r0 (task 42_0: CANCELLED by 1000, exit code 0:15): table: chunk 1 of 2 done" in out
        assert "test: FAILED r1 (task 42_1: OUT_OF_MEMORY, exit code 0:125): table" in out
    else:
        assert "test: FAILED r0 (task 42_0): table: chunk 1 of 2 done  [log: %s]" % runs[0].log in out


def test_resubmission_keeps_the_finished_chunks_of_a_shard(tmp_path, monkeypatch):
    """Submitted again, a run that resumes (a graph shard task) keeps what its earlier attempt
    finished; any other run's stale outputs are removed."""
    bin_dir = _fake_commands(str(tmp_path / "bin"), sbatch="echo 42")
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    d = tmp_path / "work"
    d.mkdir()
    outs = [str(d / n) for n in ("chunk0.I", "chunk0.D", "chunk2.I", "chunk2.D")]
    for p in outs[:2]:
        open(p, "w").write("finished")
    shard = Run("shard0of2", ["true"], outs, str(d / "shard.log"), resumes=True)
    other = Run("other", ["true"], [str(d / "other.json")], str(d / "other.log"))
    open(other.outputs[0], "w").write("stale")
    SlurmLauncher(ROOT, str(tmp_path / "slurm"), {}).submit([shard, other], "test")
    assert [open(p).read() for p in outs[:2]] == ["finished", "finished"]
    assert not os.path.exists(other.outputs[0])
