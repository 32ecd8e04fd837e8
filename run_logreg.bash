#!/usr/bin/env bash
# Logistic-regression baseline of the paper, in 4 phases (each restartable: runs whose result JSON
# exists are skipped, so running a phase again only fills the gaps):
#   bash run_logreg.bash 1   validation grid: n x lr x wd x batch size x seeds (675 runs in the paper
#                            config), up to 75000 iterations evaluated every 500
#   bash run_logreg.bash 2   per n, the lr, wd, batch size and iteration count with the best mean
#                            validation metric over seeds (the config's metric: top5, or top1)
#                            -> $RUNDIR/chosen_logreg.yaml
#   bash run_logreg.bash 3   test runs with the chosen parameters, seeds 1-5 (storing test scores),
#                            and the validation re-runs that store the scores the fusion needs
#   bash run_logreg.bash 4   tables (rows n, mean +- std over seeds, all / novel classes, top-5 and
#                            top-1) and plots -> $RUNDIR/results/logreg.{md,json,png}
# Environment:
#   CONFIG=configs/paper.yaml (default) or configs/small.yaml: grids, sizes, resources
#   LAUNCHER=local (default: NPROC runs at a time, default = cores) or slurm (one sbatch job array
#   per phase step; WAIT=0 returns right after submission: run the phase again once it is done)
#   RUNDIR overrides the config's rundir; DDIR is the data root (unless the config sets ddir)
# Extra arguments go to python -m lowshot.phases (--dry-run lists the commands, --partial lets
# phase 2 choose among complete grid points when results are missing).
set -euo pipefail
cd "$(dirname "$0")"
PHASE=${1:?usage: bash run_logreg.bash PHASE [options]  (1 validation, 2 choose, 3 test, 4 results)}
shift
# CONFIG, LAUNCHER, NPROC, WAIT and RUNDIR are read by lowshot.phases itself
exec "${PYTHON:-.venv/bin/python}" -m lowshot.phases logreg "$PHASE" "$@"
