#!/usr/bin/env bash
# Data preparation of the paper, in 3 phases (each restartable: runs whose outputs exist are skipped,
# a killed or failed one is redone alone by running the phase again), from the config's `prepare`
# section (configs/paper.yaml documents it):
#   bash run_prepare.bash 1   features: save_features.py for the labelled sets (train, val) and for
#                             the background images, one task per block of prepare.background.block
#                             -> $DDIR/features/{train,val}.hdf5, $DDIR/features/f100m/block{b}.hdf5
#   bash run_prepare.bash 2   PCA-R256 trained on block 0, applied to every block
#                             -> $DDIR/features/PCAR256.vt, features/f100m/concatenated_PCAR256.raw
#   bash run_prepare.bash 3   the background graph of every size of diffusion.nbg; sizes with
#                             prepare.graph_shards S > 1: build_graph.py N --prepare, then a job
#                             array of S tasks --shard i/S, then the merge
#                             -> $DDIR/knngraph/ndis{N}.index, ndis{N}_k{K}_{I,D}_11.*
# Then run_logreg.bash and run_diffusion.bash. Environment: CONFIG, LAUNCHER, NPROC, WAIT, RUNDIR,
# DDIR as in run_logreg.bash; extra arguments go to python -m lowshot.phases (--dry-run lists the
# commands). `python -m lowshot.plan N --shards S` prints what each graph task needs.
set -euo pipefail
cd "$(dirname "$0")"
PHASE=${1:?usage: bash run_prepare.bash PHASE [options]  (1 features, 2 PCA, 3 graphs)}
shift
# CONFIG, LAUNCHER, NPROC, WAIT and RUNDIR are read by lowshot.phases itself
exec "${PYTHON:-.venv/bin/python}" -m lowshot.phases prepare "$PHASE" "$@"
