#!/usr/bin/env bash
# Builds the graph_utils extension (graph_utils/_graph_utils_swig*.so + graph_utils_swig.py) inside the
# project's virtual environment, the way pip builds it for everyone (setup.py): the project installed
# in editable mode with .venv's own build tools,
#   .venv/bin/pip install --no-build-isolation -e <repo>
# SWIG from the swig wheel, numpy headers, and oneMKL when the mkl-devel wheel is in .venv (its
# mkl-dynamic-lp64-gomp.pc; LOWSHOT_MKL=auto|on|off decides, see setup.py), with an rpath to .venv's
# lib/ so no LD_LIBRARY_PATH is needed.
# Does nothing when the module is newer than every source and than the venv's last install, the
# project is installed from this checkout, and the module matches an explicit LOWSHOT_MKL=on|off.
# Usage: bash graph_utils/compile.bash [--force]
# Environment: VENV (default: <repo>/.venv), LOWSHOT_MKL, GRAPH_UTILS_CXXFLAGS (extra flags), CXX.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
cd "$ROOT"
[ -x "$PY" ] || { echo "error: $PY missing: run bash setup.bash (creates $VENV)" >&2; exit 1; }

SOURCES=(graph_utils/graph_utils.h graph_utils/graph_utils.cpp graph_utils/knn_scan.cpp graph_utils/graph_utils.i
         setup.py pyproject.toml graph_utils/compile.bash)
EXT_SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
MODULE=graph_utils/_graph_utils_swig$EXT_SUFFIX

# the installed distribution is an editable install of this checkout, and the module agrees with
# LOWSHOT_MKL when it says on or off (-I: not the metadata a build leaves in the checkout)
installed_here() {
  "$PY" -I - "$ROOT" <<'PYEOF'
import json, os, sys
from importlib import metadata
from urllib.parse import unquote, urlparse
try:
    url = json.loads(metadata.distribution("lowshot-diffusion").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    sys.exit(1)
src = unquote(urlparse(url.get("url", "")).path)
if not (url.get("dir_info", {}).get("editable") and os.path.realpath(src) == os.path.realpath(sys.argv[1])):
    sys.exit(1)
want = os.environ.get("LOWSHOT_MKL", "").strip().lower()
if want in ("on", "off"):
    import graph_utils
    sys.exit(0 if graph_utils.has_mkl() == (want == "on") else 1)
PYEOF
}

if [ "${1:-}" != "--force" ] && [ -f "$MODULE" ] && [ -f graph_utils/graph_utils_swig.py ]; then
  stale=0
  # a reinstalled venv (setup.bash rewrites .requirements.installed) may bring another MKL or numpy
  for s in "${SOURCES[@]}" "$VENV/.requirements.installed"; do
    if [ -e "$s" ] && [ "$s" -nt "$MODULE" ]; then stale=1; fi
  done
  if [ $stale = 0 ] && installed_here; then
    echo "graph_utils: $MODULE is up to date"
    exit 0
  fi
fi

echo "graph_utils: building (pip install --no-build-isolation -e $ROOT, LOWSHOT_MKL=${LOWSHOT_MKL:-auto})"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e "$ROOT"
(cd / && "$PY" -c "import graph_utils as g; print('graph_utils: built', g.__file__, 'with MKL' if g.has_mkl() else 'without MKL')")
