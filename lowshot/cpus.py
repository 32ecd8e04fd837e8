"""The CPUs this process may actually use: its affinity mask, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the machine's cores. A Slurm task or a taskset'd process gets fewer (its
affinity mask; OpenMP and torch already follow it), and a container started with ``--cpus 2`` on a
64-core host keeps all 64 in its mask but may only use 2 cores' worth of time per period (its cgroup's
``cpu.max``): 64 threads then take turns on 2 cores' time and wait at every barrier for a descheduled
sibling. No import of numpy or torch here: :mod:`lowshot.omp_env` uses this before they load.
"""
import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"


def _own_cgroup(proc_cgroup="/proc/self/cgroup"):
    """The process' cgroup v2 path relative to the cgroup root ('' when unknown)."""
    try:
        with open(proc_cgroup) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip().lstrip("/")
    except OSError:
        pass
    return ""


def cgroup_cpu_limit(root=CGROUP_ROOT, proc_cgroup="/proc/self/cgroup"):
    """CPUs' worth of time the cgroup quota allows (a float), or None when there is no quota.

    Reads cgroup v2's ``cpu.max`` ("max 100000" or "QUOTA PERIOD") of the process' cgroup and of each
    parent (the smallest quota wins), then cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    """
    limits = []
    rel = _own_cgroup(proc_cgroup)
    parts = [p for p in rel.split("/") if p]
    for i in range(len(parts), -1, -1):
        path = os.path.join(root, *parts[:i], "cpu.max")
        try:
            with open(path) as f:
                quota, period = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and float(period) > 0:
            limits.append(float(quota) / float(period))
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = float(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = float(f.read())
        if quota > 0 and period > 0:
            limits.append(quota / period)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def available_cpus(root=CGROUP_ROOT, proc_cgroup="/proc/self/cgroup"):
    """Threads worth running: the CPUs in the affinity mask, at most the cgroup quota rounded up; >= 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:     # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit - 1e-9)))
    return max(1, n)
