"""Launchers for the phases of ``run_logreg.bash`` / ``run_diffusion.bash``: this machine or Slurm.

A :class:`Run` is one command (a ``logreg.py`` / ``diffusion.py`` / ``fusion.py`` call) with the log
that receives its stdout and stderr and the output files that mark it done. The scripts write their
outputs atomically (``--result R.json``, ``--storeL F.npy``), so a crashed or killed run leaves no
output and is simply started again next time (a run that ``resumes``, a graph shard task, keeps the
chunks an earlier attempt finished); a run whose outputs all exist (and whose result JSON records the
expected parameters) is never started again. A failed Slurm task is reported with the state Slurm's
accounting gives (``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``, ...) where ``sacct`` answers.

- :class:`LocalLauncher` runs N commands at a time on this machine and prints a progress line
  ``done / running / failed / left``.
- :class:`SlurmLauncher` submits the same commands as one ``sbatch`` job array per resource request
  (line ``i + 1`` of a tasks file is array task ``i``), throttled with ``%N``, then (by default) waits
  for the array to leave the queue and reports what is missing.

Nothing here reads the environment or touches files at import time.

Over 400 lines: the local and the Slurm launcher, two classes sharing the Run protocol.
"""
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import time

from lowshot.common import InputError, logger, start_child, write_json
from lowshot.cpus import available_cpus

log = logger(__name__)


class Run:
    """One command of a phase.

    Parameters
    ----------
    name : str
        Unique within its stage, e.g. ``"nl2.lr0.001.wd0.01.bs128.seed1"``.
    cmd : list of str
        The argv to run, relative paths resolved against the launcher's working directory.
    outputs : list of str
        Files the command writes; the run is done when all exist. ``outputs[0]`` is the result
        JSON when ``expect`` is given.
    log : str
        File that receives the command's stdout and stderr (overwritten at each attempt).
    deps : list of str, optional
        Files that must exist before the run can start (outputs of an earlier stage).
    expect : dict, optional
        Values the result JSON ``outputs[0]`` must record (e.g. ``{"maxiter": 29500}``); a result
        made with other parameters (say, before phase 2 was re-run) counts as not done.
    resources : dict, optional
        Overrides of the Slurm request for this run (``mem``, ``time``, ...).
    resumes : bool
        The command continues from the outputs an interrupted attempt left (each written
        atomically, e.g. the chunks of a ``build_graph.py --shard i/S`` task): a new attempt keeps
        them instead of computing them again.
    """

    def __init__(self, name, cmd, outputs, log, deps=(), expect=None, resources=None, resumes=False):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.outputs = list(outputs)
        self.log = log
        self.deps = list(deps)
        self.expect = dict(expect or {})
        self.resources = dict(resources or {})
        self.resumes = resumes

    def __repr__(self):
        return "Run(%s)" % self.name

    def result_matches(self):
        """True when the result JSON exists, parses and records the expected values."""
        try:
            with open(self.outputs[0]) as f:
                res = json.load(f)
        except (OSError, ValueError):
            return False
        for key, want in self.expect.items():
            if key not in res:
                continue
            if not _same(res[key], want):
                return False
        return True

    def is_done(self):
        """All outputs exist (and the result JSON matches ``expect``)."""
        if not all(os.path.exists(p) for p in self.outputs):
            return False
        return not self.expect or self.result_matches()

    def is_ready(self):
        """All dependencies exist."""
        return all(os.path.exists(p) for p in self.deps)

    def missing_deps(self):
        return [p for p in self.deps if not os.path.exists(p)]

    def clear(self):
        """Remove outputs of an earlier, incomplete or stale attempt (unless the run ``resumes``
        from them), and create output folders."""
        for p in self.outputs + [self.log]:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        if self.resumes:
            return
        for p in self.outputs:
            if os.path.exists(p):
                os.remove(p)

    def shell_line(self, cwd, env=None):
        """The run as one shell command line (used by Slurm tasks and ``--dry-run``)."""
        envs = ["%s=%s" % (k, shell_quote(str(v))) for k, v in sorted((env or {}).items())]
        return "cd %s && %s%s > %s 2>&1" % (
            shell_quote(cwd), " ".join(envs) + " " if envs else "",
            " ".join(shell_quote(c) for c in self.cmd), shell_quote(os.path.abspath(self.log)))


def shell_quote(s):
    """Quote for bash on one line: control characters (newlines) become a $'...' string."""
    if not any(ord(ch) < 32 for ch in s):
        return shlex.quote(s)
    esc = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "$'" + "".join(esc.get(ch, ch if ord(ch) >= 32 else "\\x%02x" % ord(ch))
                          for ch in s) + "'"


def _same(got, want):
    """Equality, with floats compared to a relative 1e-9 (values pass through repr and JSON)."""
    if isinstance(want, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(want)
                and all(_same(g, w) for g, w in zip(got, want)))
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9)
    return got == want


def last_line(path, default="(no log)"):
    """Last non-empty line of a log file: usually the script's ``error: ...`` message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    except OSError:
        return default
    return lines[-1].strip() if lines else "(empty log)"


def thread_env(nthreads):
    """Environment that caps the BLAS/OpenMP threads of one run (unless the user already set them)."""
    return {k: str(nthreads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
            if k not in os.environ}


class LocalLauncher:
    """Run commands on this machine, ``nproc`` at a time.

    Parameters
    ----------
    cwd : str
        Working directory of the commands (the repository root).
    nproc : int, optional
        Parallel runs; default: the available cores.
    threads_per_run : int, optional
        BLAS/OpenMP threads of each run; default: cores // nproc (at least 1).
    progress_s : float
        At most one progress line per this many seconds (failures and the end are always printed).
    """

    waits = True

    def __init__(self, cwd, nproc=None, threads_per_run=None, progress_s=10.0, poll_s=0.1):
        self.cwd = cwd
        self.nproc = max(1, int(nproc or available_cpus()))
        self.threads = max(1, int(threads_per_run or available_cpus() // self.nproc))
        self.progress_s = progress_s
        self.poll_s = poll_s

    def execute(self, runs, label):
        """Run ``runs`` (all not done); return the list of runs that failed (no complete outputs).

        Each run holds a lock (``flock`` on ``<log>.lock``, inherited by its process) while it
        runs: a second invocation of the same phase does not start it again but waits for it and
        counts its outcome. The lock file is removed when the run ends (:func:`release_lock`)."""
        ex = _LocalExecution(runs, label, self.cwd, dict(os.environ, **thread_env(self.threads)), self.progress_s)
        log("%s: %d runs, %d at a time, %d threads each" % (label, ex.total, self.nproc, self.threads))
        try:
            new_failure = False
            while ex.todo or ex.running:
                while ex.todo and len(ex.running) < self.nproc:
                    ex.start(ex.todo.pop(0))
                ex.progress(force=new_failure)
                time.sleep(self.poll_s)
                new_failure = ex.reap()
            ex.wait_elsewhere(self.poll_s)
        except BaseException:
            ex.stop()
            raise
        ex.progress(force=True)
        return ex.failed


class _LocalExecution:
    """The state of one :meth:`LocalLauncher.execute` call: runs left, running, run by another
    invocation, done and failed, and its progress line (at most one per ``progress_s`` seconds)."""

    def __init__(self, runs, label, cwd, env, progress_s):
        self.todo = list(runs)
        self.total = len(self.todo)
        self.label = label
        self.cwd, self.env = cwd, env
        self.progress_s = progress_s
        self.running = {}           # Popen -> (run, lock file descriptor)
        self.elsewhere = []         # runs another invocation is running
        self.ndone, self.failed = 0, []
        self._last_print = (0.0, None)

    def progress(self, force=False):
        """The progress line, when the counts changed and ``progress_s`` passed (or ``force``)."""
        state = (self.ndone, len(self.running), len(self.failed), len(self.todo))
        if state == self._last_print[1] or (not force and time.time() - self._last_print[0] < self.progress_s):
            return
        log("%s: %d done, %d running, %d failed, %d left (of %d)" % ((self.label,) + state + (self.total,)))
        self._last_print = (time.time(), state)

    def start(self, run):
        """Start ``run`` unless another invocation holds it or finished it meanwhile."""
        lock = run_lock(run)
        if lock is None:
            self.elsewhere.append(run)
            return
        if run.is_done():           # finished by another invocation meanwhile
            release_lock(run, lock)
            self.ndone += 1
            return
        run.clear()
        with open(run.log, "w") as logf:
            # a launcher killed outright (SIGKILL) takes its runs with it: none is left
            # running to fight the rerun for its outputs
            p = start_child(run.cmd, cwd=self.cwd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, pass_fds=(lock,))
        self.running[p] = (run, lock)

    def reap(self):
        """Count the runs that ended; True when one of them failed."""
        new_failure = False
        for p in [p for p in self.running if p.poll() is not None]:
            run, lock = self.running.pop(p)
            release_lock(run, lock)
            if p.returncode == 0 and run.is_done():
                self.ndone += 1
            else:
                self.failed.append(run)
                new_failure = True
                log_failure(self.label, run, "exit status %d" % p.returncode)
        return new_failure

    def wait_elsewhere(self, poll_s):
        """Wait for the runs that another invocation is running, and count their outcome."""
        if self.elsewhere:
            log("%s: %d runs are running in another invocation: waiting for them" % (self.label, len(self.elsewhere)))
        while self.elsewhere:
            time.sleep(poll_s)
            for run in list(self.elsewhere):
                lock = run_lock(run)
                if lock is None:
                    continue
                release_lock(run, lock)
                self.elsewhere.remove(run)
                if run.is_done():
                    self.ndone += 1
                else:
                    self.failed.append(run)
                    log_failure(self.label, run, "run by another invocation")
            self.progress()

    def stop(self):
        """Terminate the runs still running (the launcher is interrupted) and release their locks."""
        for p in self.running:
            p.terminate()
        for p, (run, lock) in self.running.items():
            p.wait()
            release_lock(run, lock)


def log_failure(label, run, why):
    """The ``FAILED`` line of a run: why (exit status, Slurm state) and its log's last line."""
    log("%s: FAILED %s (%s): %s  [log: %s]" % (label, run.name, why, last_line(run.log), run.log))


def run_lock(run):
    """An exclusive ``flock`` on ``<run.log>.lock`` (a file descriptor), or None when another
    process holds it. flock locks belong to the open file: the run's process inherits it and holds
    it as long as it lives, even if its launcher dies. The holder removes the file when the run is
    over (:func:`release_lock`): a lock taken on a file removed meanwhile is dropped and taken again
    on the file now at that path, so two processes never both hold the run."""
    path = run.log + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(run.log)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release_lock(run, fd):
    """Remove the run's lock file (while still holding it, so no other process holds that file),
    then release it: no ``*.log.lock`` stays beside the logs."""
    try:
        os.remove(run.log + ".lock")
    except OSError:
        pass
    os.close(fd)


class SlurmLauncher:
    """Submit commands as Slurm job arrays.

    Parameters
    ----------
    cwd : str
        Working directory of the commands (the repository root; must be visible from the nodes).
    slurm_dir : str
        Where tasks files, array scripts and the per-task Slurm outputs go.
    options : dict
        Default request: ``partition``, ``time``, ``mem``, ``cpus_per_task``, ``gpus``,
        ``throttle`` (at most this many tasks of an array at once: ``--array=0-N%throttle``),
        ``max_array_size`` (longer lists are split into several arrays), ``args`` (extra sbatch
        flags, e.g. ``["--account=abc"]``), ``poll_s`` (seconds between ``squeue`` polls).
        A run's ``resources`` override these.
    wait : bool
        Wait until the arrays leave the queue (then report what is missing); otherwise return
        right after submission.
    """

    def __init__(self, cwd, slurm_dir, options, wait=True):
        self.cwd = cwd
        self.slurm_dir = slurm_dir
        self.options = dict(options)
        self.waits = wait

    def _request(self, run):
        opts = dict(self.options)
        opts.update(run.resources)
        return opts

    def sbatch_args(self, opts, name, ntask):
        """The sbatch flags for one array of ``ntask`` tasks."""
        args = ["--parsable", "--job-name=%s" % name,
                "--output=%s" % os.path.join(self.slurm_dir, name + "_%A_%a.out")]
        throttle = opts.get("throttle")
        args.append("--array=0-%d%s" % (ntask - 1, "%%%d" % throttle if throttle else ""))
        if opts.get("partition"):
            args.append("--partition=%s" % opts["partition"])
        if opts.get("time"):
            args.append("--time=%s" % opts["time"])
        if opts.get("mem"):
            args.append("--mem=%s" % opts["mem"])
        if opts.get("cpus_per_task"):
            args.append("--cpus-per-task=%d" % int(opts["cpus_per_task"]))
        if opts.get("gpus"):
            args.append("--gres=gpu:%d" % int(opts["gpus"]))
        args += [str(a) for a in opts.get("args") or []]
        return args

    def submit(self, runs, label):
        """Submit ``runs``; runs with equal requests share one array.

        Returns
        -------
        list of (jobid, [(array index, Run), ...])
        """
        if shutil.which("sbatch") is None:
            raise InputError("LAUNCHER=slurm but sbatch is not on the PATH")
        os.makedirs(self.slurm_dir, exist_ok=True)
        groups = {}
        for run in runs:
            opts = self._request(run)
            groups.setdefault(json.dumps(opts, sort_keys=True, default=str), (opts, []))[1].append(run)
        prefix = "%s-%s" % (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-"),
                            time.strftime("%Y%m%d-%H%M%S"))
        jobs = []
        for opts, group in groups.values():
            chunk = int(opts.get("max_array_size") or 1000)
            threads = int(opts.get("cpus_per_task") or 1)
            for ci in range(0, len(group), chunk):
                part = group[ci:ci + chunk]
                k = 0
                while os.path.exists(os.path.join(self.slurm_dir, "%s-%d.tasks" % (prefix, k))):
                    k += 1
                name = "%s-%d" % (prefix, k)
                tasks = os.path.join(self.slurm_dir, name + ".tasks")
                script = os.path.join(self.slurm_dir, name + ".sh")
                with open(tasks, "w") as f:
                    for run in part:
                        run.clear()
                        f.write(run.shell_line(self.cwd, thread_env(threads)) + "\n")
                with open(script, "w") as f:
                    f.write(ARRAY_SCRIPT.format(label=label, n=len(part), tasks=tasks))
                cmd = ["sbatch"] + self.sbatch_args(opts, name, len(part)) + [script]
                p = subprocess.run(cmd, cwd=self.cwd, capture_output=True, text=True)
                if p.returncode != 0:
                    raise InputError("sbatch failed (%s): %s" % (shlex.join(cmd), p.stderr.strip()))
                jobid = p.stdout.strip().split(";")[0]
                log("%s: submitted job array %s (%d tasks: %s), Slurm outputs %s" % (
                    label, jobid, len(part), tasks, os.path.join(self.slurm_dir, name + "_*.out")))
                jobs.append((jobid, list(enumerate(part))))
        self._record(jobs)
        return jobs

    def _state_path(self):
        return os.path.join(self.slurm_dir, "submitted.json")

    def _load_state(self):
        try:
            with open(self._state_path()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _record(self, jobs):
        """Remember which array task makes which result (to not submit it twice)."""
        state = self._load_state()
        for jobid, part in jobs:
            for i, run in part:
                state[os.path.abspath(run.outputs[0])] = "%s_%d" % (jobid, i)
        write_json(self._state_path(), state)

    def queued_tasks(self, jobids):
        """Ids ``"jobid_index"`` of these jobs' tasks still pending or running."""
        if not jobids:
            return set()
        p = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(sorted(jobids))],
                           capture_output=True, text=True)
        if p.returncode != 0:
            if "Invalid job id" in p.stderr:
                return set()
            raise InputError("squeue failed: %s" % p.stderr.strip())
        return {l.strip() for l in p.stdout.splitlines() if l.strip()}

    def still_queued(self, runs):
        """Runs whose task from an earlier submission is still pending or running.

        Returns
        -------
        list of (jobid, [(array index, Run), ...])
        """
        state = self._load_state()
        mine = {r: state.get(os.path.abspath(r.outputs[0])) for r in runs}
        queued = self.queued_tasks({t.split("_")[0] for t in mine.values() if t})
        jobs = {}
        for r, t in mine.items():
            if t in queued:
                jobid, i = t.split("_")
                jobs.setdefault(jobid, []).append((int(i), r))
        return sorted(jobs.items())

    def wait(self, jobs, label):
        """Poll ``squeue`` until the jobs left the queue; print a line when the count changes."""
        jobids = {j for j, _ in jobs}
        total = sum(len(part) for _, part in jobs)
        prev = None
        while True:
            n = len(self.queued_tasks(jobids))
            if n != prev:
                ndone = sum(r.is_done() for _, part in jobs for _, r in part)
                log("%s: %d done, %d queued or running, %d left the queue without result (of %d)"
                    % (label, ndone, n, total - n - ndone, total))
                prev = n
            if n == 0:
                return
            time.sleep(float(self.options.get("poll_s") or 30))

    def execute(self, runs, label):
        """Submit, wait (when ``wait``) and return the runs without complete outputs.

        Runs still queued from an earlier submission (say, ``WAIT=0`` and the phase started again
        too early) are not submitted twice: they are waited for like the new ones. Without
        waiting, returns an empty list right after submission; callers check ``waits`` to know
        that the results are not there yet.
        """
        old = self.still_queued(runs)
        busy = {r for _, part in old for _, r in part}
        for jobid, part in old:
            log("%s: %d runs are still queued or running as tasks of job %s: not submitted again"
                % (label, len(part), jobid))
        jobs = list(old)
        if len(busy) < len(runs):
            jobs += self.submit([r for r in runs if r not in busy], label)
        if not self.waits:
            return []
        self.wait(jobs, label)
        failed = [(jobid, i, run) for jobid, part in jobs for i, run in part if not run.is_done()]
        states = task_states({jobid for jobid, _, _ in failed})
        for jobid, i, run in failed:
            task = "%s_%d" % (jobid, i)
            log_failure(label, run, "task %s: %s" % (task, states[task]) if task in states else "task " + task)
        return [run for _, _, run in failed]


def task_states(jobids):
    """How the tasks of these job arrays ended, as Slurm's accounting recorded it.

    Returns
    -------
    dict
        ``{"jobid_i": "CANCELLED by 1000, exit code 0:15"}`` (``TIMEOUT``, ``OUT_OF_MEMORY``,
        ``FAILED``, ...); empty where ``sacct`` is missing or fails (accounting off), and then the
        ``FAILED`` lines give the task's log alone.
    """
    if not jobids or shutil.which("sacct") is None:
        return {}
    try:
        p = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(sorted(jobids))],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    if p.returncode != 0:
        return {}
    states = {}
    for line in p.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            states[fields[0]] = "%s, exit code %s" % (fields[1], fields[2])
    return states


ARRAY_SCRIPT = """#!/bin/bash
# lowshot job array: {label}, {n} tasks; line i+1 of the tasks file is array task i:
# {tasks}
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "{tasks}")
echo "task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname) at $(date)"
echo "$line"
eval "$line"
rc=$?
echo "exit status $rc at $(date)"
exit $rc
"""


def make_launcher(kind, cwd, slurm_dir=None, slurm_options=None, nproc=None, threads_per_run=None,
                  wait=True):
    """``"local"`` -> :class:`LocalLauncher`, ``"slurm"`` -> :class:`SlurmLauncher`."""
    if kind == "local":
        return LocalLauncher(cwd, nproc=nproc, threads_per_run=threads_per_run)
    if kind == "slurm":
        return SlurmLauncher(cwd, slurm_dir, slurm_options or {}, wait=wait)
    raise InputError("unknown launcher %r (LAUNCHER=local or slurm)" % kind)
