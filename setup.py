"""Build of graph_utils' C++ extension for `pip install .` and `pip install -e .` (the project's
metadata is in pyproject.toml; `bash setup.bash` does the editable install into .venv).

SWIG (the swig wheel, a build requirement) turns graph_utils/graph_utils.i into a C++ wrapper and the
Python module graph_utils_swig.py; g++ compiles it with graph_utils.cpp and knn_scan.cpp (C++17,
OpenMP) into graph_utils/_graph_utils_swig*.so, with the flags of the 2018 build: -O3, -march=x86-64-v2
-mtune=generic on x86-64 (the hot loops carry their own AVX2 / AVX-512 versions, chosen at load time).

oneMKL is optional (graph_utils.has_mkl() tells which build you have), chosen by LOWSHOT_MKL:
  auto (default)  link MKL when mkl-devel's mkl-dynamic-lp64-gomp.pc (GNU OpenMP, like torch and
                  faiss) is in this environment's lib/pkgconfig (sys.prefix: with
                  --no-build-isolation, the venv pip installs into) or in a folder of PKG_CONFIG_PATH
  on              the same, and stop with an error when it is not found
  off             build without MKL: the hand-written kernels do all the work
The module then gets an rpath to MKL's lib/ (relative to the installed module first, absolute second),
so no LD_LIBRARY_PATH is needed. GRAPH_UTILS_CXXFLAGS adds compiler flags (e.g. -march=native).
"""
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MKL_PC = "mkl-dynamic-lp64-gomp.pc"
PKG = "graph_utils"
SOURCES = ["graph_utils/graph_utils.cpp", "graph_utils/knn_scan.cpp"]
INTERFACE = "graph_utils/graph_utils.i"
DEPENDS = ["graph_utils/graph_utils.h", INTERFACE, "setup.py"]
# SWIG's generated code trips warnings we do not own
WRAPPER_FLAGS = ["-Wno-missing-field-initializers", "-Wno-deprecated-declarations"]


def read_pc(path):
    """(fields, variables) of a pkg-config file with ${var} expanded: no pkg-config binary needed."""
    env = {"pcfiledir": os.path.dirname(os.path.abspath(path))}
    fields = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^(\w[\w.]*)\s*([=:])\s*(.*)$", line)
            if not m:
                continue
            value = re.sub(r"\$\{(\w+)\}", lambda v: env.get(v.group(1), ""), m.group(3))
            (env if m.group(2) == "=" else fields)[m.group(1)] = value
    return fields, env


def find_mkl():
    """Path of MKL's .pc file to link with, or None (LOWSHOT_MKL, see the module docstring)."""
    mode = os.environ.get("LOWSHOT_MKL", "").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise SystemExit("error: LOWSHOT_MKL=%s: expected auto, on or off" % mode)
    if mode == "off":
        return None
    dirs = [os.path.join(sys.prefix, "lib", "pkgconfig")]
    dirs += [d for d in os.environ.get("PKG_CONFIG_PATH", "").split(os.pathsep) if d]
    for d in dirs:
        if os.path.isfile(os.path.join(d, MKL_PC)):
            return os.path.join(d, MKL_PC)
    if mode == "on":
        raise SystemExit("error: LOWSHOT_MKL=on but %s is in none of %s: pip install mkl-devel into this "
                         "environment and build with pip install --no-build-isolation" % (MKL_PC, ", ".join(dirs)))
    return None


def swig_executable():
    try:
        import swig   # the swig wheel; importing it sets SWIG_LIB for its binary
        exe = os.path.join(swig.BIN_DIR, "swig")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    exe = shutil.which("swig")
    if not exe:
        raise SystemExit("error: SWIG not found: pip install swig (a build requirement in pyproject.toml)")
    return exe


class BuildGraphUtils(build_ext):
    """build_ext that runs SWIG first (the wrapper into build_temp, graph_utils_swig.py next to the
    module: into build_lib, and into the source tree for editable installs), configures MKL, compiles
    the sources in parallel and rebuilds everything when the configuration changed."""

    def run(self):
        # build into build_lib, then (inplace: editable installs, build_ext --inplace) install the
        # module and graph_utils_swig.py into the source tree ourselves, each written to a temporary
        # name and renamed: a process that has the old module loaded keeps reading intact pages
        # (setuptools' own copy rewrites the file in place)
        self._to_source = bool(self.inplace)
        self.inplace = False
        try:
            super().run()
        finally:
            self.inplace = self._to_source
        if self._to_source:
            ext = self.extensions[0]
            module, built = self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)
            swig_py = os.path.join(os.path.dirname(built), "graph_utils_swig.py")
            for src, dst in ((swig_py, os.path.join(os.path.dirname(module), "graph_utils_swig.py")), (built, module)):
                shutil.copy2(src, dst + ".tmp")
                os.replace(dst + ".tmp", dst)
                print("installed %s" % dst)

    def get_outputs(self):
        return super().get_outputs() + [os.path.join(self.build_lib, PKG, "graph_utils_swig.py")]

    def build_extensions(self):
        import numpy

        ext = self.extensions[0]
        mkl_pc = find_mkl()
        cflags = ["-std=c++17", "-O3", "-fopenmp", "-Wall", "-Wno-unused-function",
                  "-g0", "-fno-wrapv"]   # undo Python's own -g -fwrapv: the 2018 build's flags
        if platform.machine() in ("x86_64", "AMD64"):
            cflags += ["-march=x86-64-v2", "-mtune=generic"]
        cflags += shlex.split(os.environ.get("GRAPH_UTILS_CXXFLAGS", ""))
        ldflags = ["-fopenmp"]
        macros = []
        if mkl_pc:
            fields, env = read_pc(mkl_pc)
            libdir = os.path.realpath(env["libdir"])
            # rpath: relative to where the module will lie first (the source tree for editable
            # installs, site-packages otherwise), absolute second
            final = os.path.abspath(PKG) if self._to_source else os.path.join(sysconfig.get_paths()["platlib"], PKG)
            cflags += shlex.split(fields.get("Cflags", ""))
            ldflags += shlex.split(fields.get("Libs", ""))
            ldflags += ["-Wl,-rpath,$ORIGIN/" + os.path.relpath(libdir, final), "-Wl,-rpath," + libdir]
            macros.append(("GRAPH_UTILS_MKL", "1"))
        ext.include_dirs = [PKG, numpy.get_include()]
        ext.define_macros = macros
        ext.extra_compile_args = cflags
        ext.extra_link_args = ldflags
        print("graph_utils: %s, compiler flags %s" % (
            "MKL %s (%s)" % (read_pc(mkl_pc)[0].get("Version", "?"), mkl_pc) if mkl_pc else "without MKL",
            " ".join(cflags)))

        # any change of configuration (MKL or not, flags, numpy) rebuilds everything
        config = json.dumps({"mkl": mkl_pc, "cflags": cflags, "ldflags": ldflags, "numpy": numpy.get_include()})
        stamp = os.path.join(self.build_temp, "graph_utils-config.json")
        if not os.path.exists(stamp) or open(stamp).read() != config:
            self.force = True

        wrapper = os.path.join(self.build_temp, "graph_utils_wrap.cxx")
        pydir = os.path.join(self.build_lib, PKG)
        os.makedirs(self.build_temp, exist_ok=True)
        os.makedirs(pydir, exist_ok=True)
        outputs = [wrapper, os.path.join(pydir, "graph_utils_swig.py")]
        if self.force or any(not os.path.exists(o) or os.path.getmtime(o) < os.path.getmtime(s)
                             for o in outputs for s in DEPENDS):
            cmd = [swig_executable(), "-c++", "-python", "-o", wrapper, "-outdir", pydir, INTERFACE]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
        ext.sources = SOURCES + [wrapper]
        self.compiler.compile = self._parallel_compile
        super().build_extensions()
        with open(stamp, "w") as f:
            f.write(config)

    def _parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                          extra_preargs=None, extra_postargs=None, depends=None):
        """CCompiler.compile with one process per source (the wrapper is the longest)."""
        cc = self.compiler
        macros, objects, extra_postargs, pp_opts, build = cc._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = cc._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            if obj not in build:
                return
            src, ext = build[obj]
            post = extra_postargs + (WRAPPER_FLAGS if src.endswith("_wrap.cxx") else [])
            cc._compile(obj, src, ext, cc_args, post, pp_opts)

        with ThreadPoolExecutor(max(1, min(len(objects), os.cpu_count() or 1))) as pool:
            list(pool.map(one, objects))
        return objects


setup(
    ext_modules=[Extension("graph_utils._graph_utils_swig", sources=SOURCES, depends=DEPENDS, language="c++")],
    cmdclass={"build_ext": BuildGraphUtils},
)
