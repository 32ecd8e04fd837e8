"""Imported first by the stage scripts, never by the library: OpenMP threads that wait (at the end of
a parallel region, at a barrier) sleep instead of spinning: ``OMP_WAIT_POLICY=PASSIVE`` unless the
user set it. The OpenMP runtimes (graph_utils', faiss', torch's) read it once, when they load, so this
comes before numpy, faiss, torch and graph_utils are imported.

Why: on a machine shared with another multi-threaded job, spinning threads burn the cores the other
job's threads need, and each side then waits longer at its own barriers. Measured on 2 cores
(benchmarks/README.md, "On a busy machine"): ``build_graph.py 200000 --force`` beside a 2-thread torch
matrix-product loop took 59.3 s with the default (spinning) against 31.3 s passive; alone 17.5 s and
16.8 s.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
