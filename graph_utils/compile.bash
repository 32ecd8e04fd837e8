#!/usr/bin/env bash
# Builds the graph_utils extension (graph_utils/_graph_utils_swig*.so + graph_utils_swig.py) inside the
# project's virtual environment: SWIG from the swig wheel, oneMKL from the mkl-devel wheel (found through
# its relocatable pkg-config file, linked with GNU OpenMP like torch and faiss), Python / numpy headers
# from the interpreter, an rpath to the venv's lib/ so no LD_LIBRARY_PATH is needed.
# Does nothing when the module is newer than every source and than the venv's last install. Usage: bash graph_utils/compile.bash [--force]
# Environment: VENV (default: <repo>/.venv), CXX (default: g++), GRAPH_UTILS_CXXFLAGS (extra flags).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
CXX=${CXX:-g++}
cd "$HERE"

SOURCES=(graph_utils.h graph_utils.cpp knn_scan.cpp graph_utils.i compile.bash)
EXT_SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
MODULE=_graph_utils_swig$EXT_SUFFIX

if [ "${1:-}" != "--force" ] && [ -f "$MODULE" ] && [ -f graph_utils_swig.py ]; then
  stale=0
  # a reinstalled venv (setup.bash rewrites .requirements.installed) may bring another MKL or numpy
  for s in "${SOURCES[@]}" "$VENV/.requirements.installed"; do
    if [ -e "$s" ] && [ "$s" -nt "$MODULE" ]; then stale=1; fi
  done
  if [ $stale = 0 ]; then
    echo "graph_utils: $MODULE is up to date"
    exit 0
  fi
fi

[ -x "$VENV/bin/swig" ] || { echo "error: $VENV/bin/swig missing: pip install the swig wheel (requirements.txt)" >&2; exit 1; }
export PKG_CONFIG_PATH=$VENV/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
MKL_PC=mkl-dynamic-lp64-gomp
[ -f "$VENV/lib/pkgconfig/$MKL_PC.pc" ] || { echo "error: $VENV/lib/pkgconfig/$MKL_PC.pc missing: pip install mkl-devel (requirements.txt)" >&2; exit 1; }
if command -v pkg-config > /dev/null; then
  pc() { pkg-config "$@" "$MKL_PC"; }
else
  # no pkg-config binary (slim images): read the .pc file with its variables expanded
  pc() {
    "$PY" - "$VENV/lib/pkgconfig/$MKL_PC.pc" "$1" <<'PYEOF'
import os, re, sys
path, what = sys.argv[1], sys.argv[2]
env = {"pcfiledir": os.path.dirname(os.path.abspath(path))}
fields = {}
expand = lambda v: re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), v)
for line in open(path):
    line = line.split("#", 1)[0].strip()
    m = re.match(r"^(\w[\w.]*)\s*([=:])\s*(.*)$", line)
    if m and m.group(2) == "=":
        env[m.group(1)] = expand(m.group(3))
    elif m:
        fields[m.group(1)] = expand(m.group(3))
key = {"--cflags": "Cflags", "--libs": "Libs", "--modversion": "Version"}.get(what)
print((fields.get(key, "") if key else env.get(what.split("=", 1)[1], "")).replace("\"", ""))
PYEOF
  }
fi
MKL_CFLAGS=$(pc --cflags)
MKL_LIBS=$(pc --libs)
# the .pc names the libraries by full path; their directory goes into the rpath
MKL_LIBDIR=$(pc --variable=libdir)
MKL_LIBDIR=$(cd "$MKL_LIBDIR" && pwd)
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')

# Portable baseline (any x86-64 of the last ~12 years); the hot loop carries its own AVX2 / AVX-512
# clones chosen at load time (target_clones in graph_utils.cpp).
case $(uname -m) in
  x86_64) ARCH_FLAGS="-march=x86-64-v2 -mtune=generic" ;;
  *) ARCH_FLAGS="" ;;
esac
CXXFLAGS="-std=c++17 -O3 -fPIC -fopenmp -Wall -Wno-unused-function $ARCH_FLAGS ${GRAPH_UTILS_CXXFLAGS:-}"

mkdir -p build
echo "graph_utils: swig $("$VENV/bin/swig" -version | awk '/Version/{print $3}'), mkl $(pc --modversion), $($CXX -dumpfullversion)"
"$VENV/bin/swig" -c++ -python -o build/graph_utils_wrap.cxx -outdir build graph_utils.i
$CXX $CXXFLAGS $MKL_CFLAGS -I"$HERE" -c graph_utils.cpp -o build/graph_utils.o
$CXX $CXXFLAGS $MKL_CFLAGS -I"$HERE" -c knn_scan.cpp -o build/knn_scan.o
# SWIG's generated code trips a few warnings we do not own
$CXX $CXXFLAGS -Wno-missing-field-initializers -Wno-deprecated-declarations $MKL_CFLAGS -I"$HERE" \
  -I"$PY_INC" -I"$NP_INC" -c build/graph_utils_wrap.cxx -o build/graph_utils_wrap.o
# rpath: relative to the module first (the checkout and its .venv move together), absolute second
REL_LIBDIR=$("$PY" -c "import os; print(os.path.relpath('$MKL_LIBDIR', '$HERE'))")
$CXX -shared -fopenmp -o "build/$MODULE" build/graph_utils.o build/knn_scan.o build/graph_utils_wrap.o $MKL_LIBS \
  -Wl,-rpath,"\$ORIGIN/$REL_LIBDIR" -Wl,-rpath,"$MKL_LIBDIR"
# install both products together, module last, so an interrupted build is rebuilt next time
cp build/graph_utils_swig.py graph_utils_swig.py
cp "build/$MODULE" "$MODULE.tmp" && mv "$MODULE.tmp" "$MODULE"
"$PY" -c "import sys; sys.path.insert(0, '$ROOT'); import graph_utils; print('graph_utils: built', graph_utils.__file__)"
