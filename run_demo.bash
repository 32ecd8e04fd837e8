#!/usr/bin/env bash
# The paper's whole pipeline on real images, from a fresh clone, on CPU (about 10-15 min on 2 cores):
#   1. bash setup.bash: .venv with the pinned requirements, the graph_utils build
#   2. python demo.py fetch: `npm pack emoji-datasource-{google,twitter}@16.0.0` (64x64 emoji PNGs)
#   3. python demo.py prepare: 57 classes (Unicode subcategories with >= 10 emoji), laid out as
#      class folders (and a folder of out-of-domain background emoji) of links to the images
#   4-7. own_data.py, the path of your own images: the class split by emoji identity (--group),
#      EfficientNet-Lite0 features (real ImageNet weights from its pip wheel) -> features/train.hdf5,
#      features/val.hdf5 (the test images), features/f100m/block0.hdf5 (the background);
#      PCA-R256; the background k-NN graph; the phases config from configs/demo.yaml
#   8. phases 1-4 of run_logreg.bash and run_diffusion.bash (validation chooses the logreg
#      parameters, the diffusion iterations and the fusion weight)
#   9. python demo.py table: results/demo.md (the table the README shows) and results/demo.png
# Every step is skipped when its output exists, so a second run takes seconds to a minute or two.
# Environment (defaults give the full demo; tests/test_demo.py runs a scaled-down demo with them):
#   DEMO_DDIR=demo_ddir       data root (ignored by git); DEMO_RESULTS=results: table and plot
#   DEMO_SETUP=1              0: skip setup.bash      NPROC: parallel runs (default: the cores)
#   DEMO_PREPARE_ARGS         extra flags of `demo.py prepare` (fewer classes / images)
#   DEMO_OWN_DATA_ARGS        extra flags of own_data.py (they override the demo's below)
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

step "classes and background, as class folders"
if [ ! -f "$DD/demo_meta.json" ]; then
  # shellcheck disable=SC2086
  $PY demo.py prepare --ddir "$DD" ${DEMO_PREPARE_ARGS:-}
else
  echo "exists: $DD/demo_meta.json"
fi

# The split: by emoji identity (the file names start with the emoji, the vendors' drawings and skin
# tones are near-duplicates); 40% of each class's emoji are test emoji, at most 30 test images per
# class (the person-* classes have up to 52 skin-tone images per emoji: uncapped, the all-classes
# accuracy would be one on 5 classes); novel classes among those with >= 20 training images (n = 20
# must exist); half of the classes validation, half test, half of each novel.
step "split, features, PCA-R256, background graph and phases config (own_data.py)"
# shellcheck disable=SC2086
$PY own_data.py "$DD" --images "$DD/images" --unlabelled "$DD/unlabelled" --group '^(.+?)__' \
  --test_fraction 0.4 --max_test_per_class 30 --min_novel_train 20 --seed 0 \
  --features_cfg "$FCFG" --model EfficientNetLite0 --phases_template "$TEMPLATE" ${DEMO_OWN_DATA_ARGS:-}

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
