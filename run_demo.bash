#!/usr/bin/env bash
# The paper's whole pipeline on real images, from a fresh clone, on CPU (about 10-15 min on 2 cores):
#   1. bash setup.bash: .venv with the pinned requirements, the graph_utils build
#   2. python demo.py fetch: `npm pack emoji-datasource-{google,twitter}@16.0.0` (64x64 emoji PNGs)
#   3. python demo.py prepare: 57 classes (Unicode subcategories), split by emoji identity, the
#      class split label_idx.json (validation base/novel, test base/novel), image lists
#   4-6. own_data.py --prepared, the path of your own data from this point: save_features.py --model
#      EfficientNetLite0 (real ImageNet weights from its pip wheel) -> features/train.hdf5,
#      features/val.hdf5 (the test images), features/f100m/block0.hdf5 (the out-of-domain
#      background); train_apply_pca.py train + apply -> features/PCAR256.vt,
#      features/f100m/concatenated_PCAR256.raw; build_graph.py -> knngraph/ndis{N}_k32_*
#   7. phases 1-4 of run_logreg.bash and run_diffusion.bash with configs/demo.yaml (validation
#      chooses the logreg parameters, the diffusion iterations and the fusion weight)
#   8. python demo.py table: results/demo.md (the table the README shows) and results/demo.png
# Every step is skipped when its output exists, so a second run takes seconds to a minute or two.
# Environment (defaults give the full demo; tests/test_demo.py runs a scaled-down demo with them):
#   DEMO_DDIR=demo_ddir       data root (ignored by git); DEMO_RESULTS=results: table and plot
#   DEMO_SETUP=1              0: skip setup.bash      NPROC: parallel runs (default: the cores)
#   DEMO_PREPARE_ARGS         extra flags of `demo.py prepare` (fewer classes / images)
#   DEMO_TEMPLATE=configs/demo.yaml              grids of the phases
#   DEMO_FEATURES_CFG=configs/demo_save_data.yaml   save_features.py config (input size)
set -euo pipefail
cd "$(dirname "$0")"
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

DD=${DEMO_DDIR:-demo_ddir}
RES=${DEMO_RESULTS:-results}
TEMPLATE=${DEMO_TEMPLATE:-configs/demo.yaml}
FCFG=${DEMO_FEATURES_CFG:-configs/demo_save_data.yaml}
PY=.venv/bin/python

if [ "${DEMO_SETUP:-1}" != 0 ]; then
  step "setup (.venv, pinned requirements, graph_utils)"
  bash setup.bash
fi

step "fetch the emoji images (npm) into $DD/npm"
mkdir -p "$DD"
$PY demo.py fetch --ddir "$DD"

step "classes, split and image lists"
if [ ! -f "$DD/demo_meta.json" ]; then
  # shellcheck disable=SC2086
  $PY demo.py prepare --ddir "$DD" ${DEMO_PREPARE_ARGS:-}
else
  echo "exists: $DD/demo_meta.json"
fi

step "features, PCA-R256 and the background k-NN graph (own_data.py on the prepared lists)"
$PY own_data.py "$DD" --prepared --features_cfg "$FCFG" --model EfficientNetLite0

step "phases config"
$PY demo.py config --ddir "$DD" --template "$TEMPLATE"
export CONFIG="$DD/phases.yaml"
for phase in 1 2 3; do
  step "logistic regression, phase $phase"
  bash run_logreg.bash $phase
done
for phase in 1 2 3; do
  step "diffusion and fusion, phase $phase"
  bash run_diffusion.bash $phase
done
step "phase 4: the phases' own tables ($DD/runs/results/)"
bash run_diffusion.bash 4 > /dev/null

step "demo table"
README_ARG=()
if [ "$RES" = results ]; then README_ARG=(--readme README.md); fi   # the README shows this table
$PY demo.py table --ddir "$DD" --out "$RES/demo.md" --png "$RES/demo.png" ${README_ARG[@]+"${README_ARG[@]}"}
step "done in $(( $(date +%s) - T0 )) s: $RES/demo.md, $RES/demo.png"
