#!/usr/bin/env bash
# Sets up everything the project needs, idempotently: the virtual environment .venv with the pinned
# requirements, and the graph_utils C++ library. Usage: bash setup.bash
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.requirements.installed; then
  echo "== installing pinned requirements into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi
# the repository root on .venv's import path (an editable install without packaging): scripts,
# benchmarks and tests import lowshot and graph_utils from any working directory
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$(pwd)" > "$SITE/lowshot-diffusion.pth"
bash graph_utils/compile.bash
