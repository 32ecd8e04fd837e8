#!/usr/bin/env bash
# Diffusion experiments of the paper and their fusion with logreg ("combined"), in 4 phases (each
# restartable: runs whose result JSON exists are skipped):
#   bash run_diffusion.bash 1   validation grid: n x background size x seeds, k = 30, 40 iterations
#                               evaluated after each one
#   bash run_diffusion.bash 2   per (n, background), the iteration count with the best mean
#                               validation metric over seeds (the config's metric: top5, or top1)
#                               -> $RUNDIR/chosen_diffusion.yaml
#   bash run_diffusion.bash 3   test runs with the chosen niter, seeds 1-5; for the fused
#                               backgrounds also the validation re-runs storing scores, then the
#                               fusion on validation over the weight grid, the weight choice
#                               -> $RUNDIR/chosen_fusion.yaml, and the fusion on test.
#                               The fusion needs the logreg scores: run bash run_logreg.bash 3 first.
#   bash run_diffusion.bash 4   tables (rows n; columns logreg, diffusion per background, combined
#                               per background; mean +- std over seeds, all / novel classes, top-5
#                               and top-1) and plots -> $RUNDIR/results/diffusion.{md,json,png}
# Runs that do not fit one machine: the config's nslices splits a run into class-slice tasks
# (diffusion.py --class_range a:b --store_slice) and a merge (diffusion.py --merge_slices) that
# gives the single-process result.
# Environment: CONFIG, LAUNCHER, NPROC, WAIT, RUNDIR, DDIR as in run_logreg.bash.
set -euo pipefail
cd "$(dirname "$0")"
PHASE=${1:?usage: bash run_diffusion.bash PHASE [options]  (1 validation, 2 choose, 3 test, 4 results)}
shift
# CONFIG, LAUNCHER, NPROC, WAIT and RUNDIR are read by lowshot.phases itself
exec "${PYTHON:-.venv/bin/python}" -m lowshot.phases diffusion "$PHASE" "$@"
