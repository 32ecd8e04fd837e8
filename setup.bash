#!/usr/bin/env bash
# Sets up everything the project needs, idempotently: the virtual environment .venv with the pinned
# requirements, and the project installed in it in editable mode (pip install --no-build-isolation -e .,
# through graph_utils/compile.bash: it builds the graph_utils C++ extension, with MKL since
# requirements.txt brings mkl-devel, and skips all that when nothing changed). Scripts, benchmarks
# and tests then import lowshot and graph_utils from any working directory. Usage: bash setup.bash
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
# setups before the editable install put the checkout on .venv's path with this file
rm -f "$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/lowshot-diffusion.pth"
bash graph_utils/compile.bash
