"""Imported first by the stage scripts, never by the library: the OpenMP environment of a process
that shares its machine. Unless the user set them:

- ``GOMP_SPINCOUNT=1000``: an OpenMP thread that waits (at the end of a parallel region, at a
  barrier) spins about a microsecond, then sleeps; GNU OpenMP's default spins 300 times longer
  (unless ``OMP_WAIT_POLICY`` is set: the user's choice then stands);
- ``OMP_NUM_THREADS`` = the CPUs a cgroup quota allows, when that is fewer than the CPUs in the
  affinity mask (a container started with ``--cpus``; :func:`lowshot.cpus.available_cpus`). The
  affinity mask itself (Slurm, taskset) is already followed by OpenMP, torch and OpenBLAS.

The OpenMP runtimes (graph_utils', faiss' and torch's copies of GNU OpenMP) and OpenBLAS read these
once, when they load, so this comes before numpy, faiss, torch and graph_utils are imported. (LLVM's
OpenMP, torch's runtime on macOS, reads ``KMP_BLOCKTIME`` instead; not measured, not set.)

Why: on a machine shared with another multi-threaded job, spinning threads burn the cores the other
job's threads need, and each side then waits longer at its own barriers; threads beyond the quota take
turns on its time and wait for each other. A short spin keeps the idle speed (waking a sleeping thread
for each of torch's many small parallel regions costs a quarter of the feature extraction's speed:
``OMP_WAIT_POLICY=PASSIVE``) and gives the CPU away beside other jobs. Measured on 2 cores beside a
2-thread torch job (benchmarks/README.md, "On a busy machine": ``benchmarks/bench_busy.py``): the
1M graph build, the F1M diffusion, feature extraction and logreg ran at 20-30% of their idle speed with
the default spin, and at 40% or more with this one.
"""
import os

from lowshot.cpus import available_cpus

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
if "OMP_NUM_THREADS" not in os.environ:
    _n = available_cpus()
    try:
        _mask = len(os.sched_getaffinity(0))
    except AttributeError:
        _mask = os.cpu_count() or 1
    if _n < _mask:
        os.environ["OMP_NUM_THREADS"] = str(_n)
