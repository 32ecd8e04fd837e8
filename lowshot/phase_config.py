"""The phases' configuration (``configs/*.yaml``): every knob with its default, the reader, and the
names of backgrounds in tables and files.

Used by lowshot.phases (the experiments), lowshot.prepare (the data preparation) and lowshot.demo.
"""
import os
import re

import yaml

from lowshot import diffuse as dif
from lowshot import evaluate
from lowshot.common import InputError, merge_config

# every knob of a config file, with its default (configs/paper.yaml documents each one)
DEFAULTS = {
    "rundir": "runs/paper",
    "ddir": None,
    "split": None,
    "python": None,
    "seeds": [1, 2, 3, 4, 5],
    "nlabeled": [1, 2, 5, 10, 20],
    "metric": "top5",
    "choose_on": None,
    "logreg": {"lr": [0.01, 0.001, 0.0001], "wd": [0, 0.01, 0.1], "batchsize": [16, 64, 128],
               "maxiter": 75000, "store_model": False, "args": [], "slurm": {}},
    "diffusion": {"nbg": [0, 1000000, 10000000, 100000000], "indomain": [False], "k": 30,
                  "methods": ["douze18"], "niter": 40, "lslice": 0, "nslices": 1, "args": [], "slurm": {},
                  "slurm_by_nbg": {}},
    "fusion": {"nbg": None, "weights": list(dif.FUSION_WEIGHTS), "args": [],
               "slurm": {}},
    "prepare": {"model": "ResNet50", "modelfile": None, "features": {}, "background": None,
                "pca": {"dout": 256, "max_rows": None}, "graph_shards": 1, "graph_args": [],
                "slurm": {}, "slurm_by_nbg": {}},
    "local": {"nproc": None, "threads_per_run": None},
    "slurm": {"partition": None, "time": "24:00:00", "mem": "16G", "cpus_per_task": 4, "gpus": 0,
              "throttle": 100, "max_array_size": 1000, "args": [], "poll_s": 30},
}
# values that are free-form mappings (not checked key by key)
_FREE = {("logreg", "slurm"), ("diffusion", "slurm"), ("diffusion", "slurm_by_nbg"),
         ("diffusion", "nslices"), ("diffusion", "lslice"), ("fusion", "slurm"), ("prepare", "features"),
         ("prepare", "background"), ("prepare", "graph_shards"), ("prepare", "slurm"),
         ("prepare", "slurm_by_nbg")}

# the result keys of every run (lowshot.evaluate.KS: top-1 and top-5, all and novel classes); the
# config's ``metric`` is one of them (``choose_on``: its older name, still read)
METRICS = tuple(evaluate.metric_names())


def read_mapping(path, what="config"):
    """The yaml mapping in ``path`` (empty file: {}); a one-line InputError naming ``what path`` when it
    cannot be read, is not yaml or is not a mapping."""
    try:
        with open(path) as f:
            given = yaml.safe_load(f) or {}
    except OSError as e:
        raise InputError("%s %s: %s" % (what, path, e.strerror))
    except yaml.YAMLError as e:
        raise InputError("%s %s is not valid yaml: %s" % (what, path, str(e).replace("\n", " ")))
    if not isinstance(given, dict):
        raise InputError("%s %s: expected a mapping at the top level" % (what, path))
    return given


def load_config(path):
    """Read a phases config (yaml) and fill in the defaults; unknown keys are errors.

    ``rundir``, ``ddir``, ``split`` and ``python`` may hold ``$VAR`` / ``~`` (expanded here).

    Returns
    -------
    dict
        Same structure as :data:`DEFAULTS`.
    """
    given = read_mapping(path)
    cfg = merge_config(DEFAULTS, given, path, free=_FREE)
    for key in ("rundir", "ddir", "split", "python"):
        if isinstance(cfg[key], str):
            cfg[key] = os.path.expandvars(os.path.expanduser(cfg[key]))
    _resolve_metric(cfg, given, path)
    methods = cfg["diffusion"]["methods"]
    if not isinstance(methods, list) or not methods:
        raise InputError("config %s: diffusion.methods must be a non-empty list of variant[:weights], not %r"
                         % (path, methods))
    for spec in methods:
        parse_method(spec, "config %s" % path)
    _check_types(DEFAULTS, cfg, path, [])
    _check_slurm(cfg, path)
    for key in ("seeds", "nlabeled"):
        if not cfg[key] or not all(isinstance(v, int) for v in cfg[key]):
            raise InputError("config %s: %s must be a non-empty list of integers" % (path, key))
    for key in ("diffusion", "fusion"):
        nbgs = cfg[key]["nbg"]
        if nbgs is None and key == "fusion":
            continue
        if not isinstance(nbgs, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in nbgs):
            raise InputError("config %s: %s.nbg must be a list of background sizes (integers >= 0), not %r%s" % (
                path, key, nbgs, "; 'all' is filled in by `own_data.py --phases_template`"
                if isinstance(nbgs, list) and "all" in nbgs else ""))
    return cfg


def _resolve_metric(cfg, given, path):
    """``cfg["metric"]``, what phase 2 maximises: the config's ``metric``, or ``choose_on`` (its
    older name); a one-line InputError for any other value."""
    old = given.get("choose_on")
    if old is not None:
        if "metric" in given and given["metric"] != old:
            raise InputError("config %s: metric %r and choose_on %r (its older name) disagree: keep one"
                             % (path, given["metric"], old))
        cfg["metric"] = old
    if cfg["metric"] not in METRICS:
        raise InputError("config %s: %s %r: must be one of %s" % (
            path, "metric" if old is None else "choose_on", cfg["metric"], ", ".join(METRICS)))


# Slurm's --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds, or unlimited; --mem: a size with an optional K/M/G/T unit
_SLURM_TIME = re.compile(r"(\d+)(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|infinite|unlimited", re.IGNORECASE)
_SLURM_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)


def _check_slurm(cfg, path):
    """Every Slurm request (``slurm``, ``{logreg,diffusion,fusion}.slurm``, ``diffusion.slurm_by_nbg.N``,
    ``prepare.slurm.STAGE``, ``prepare.slurm_by_nbg.N``) names known options with values Slurm takes:
    a typo (``memory: 3G``) or a ``time`` that is not a time is a one-line error, not a job that asks
    for the default."""
    requests = [("slurm", cfg["slurm"])] + [("%s.slurm" % e, cfg[e]["slurm"]) for e in ("logreg", "diffusion", "fusion")]
    for sec in ("diffusion", "prepare"):
        by = cfg[sec]["slurm_by_nbg"]
        if not isinstance(by, dict):
            raise InputError("config %s: %s.slurm_by_nbg must be a mapping of background sizes to requests" % (path, sec))
        requests += [("%s.slurm_by_nbg.%s" % (sec, n), r) for n, r in by.items()]
    stages = cfg["prepare"]["slurm"]
    if not isinstance(stages, dict):
        raise InputError("config %s: prepare.slurm must be a mapping of stages to requests" % path)
    requests += [("prepare.slurm.%s" % st, r) for st, r in stages.items()]
    known = DEFAULTS["slurm"]
    for where, req in requests:
        if not isinstance(req, dict):
            raise InputError("config %s: %s must be a mapping of Slurm options, not %r" % (path, where, req))
        for key, v in req.items():
            if key not in known:
                raise InputError("config %s: unknown Slurm option %r in %s (known: %s)" % (
                    path, key, where, ", ".join(sorted(known))))
            if v is None:
                continue
            if key == "time" and not (isinstance(v, int) and not isinstance(v, bool) and v > 0
                                      or isinstance(v, str) and _SLURM_TIME.fullmatch(v.strip())):
                raise InputError("config %s: %s.time %r is not a Slurm time (minutes, \"HH:MM:SS\" or "
                                 "\"D-HH:MM:SS\"; quote it in yaml)" % (path, where, v))
            if key == "mem" and not (isinstance(v, int) and not isinstance(v, bool) and v > 0
                                     or isinstance(v, str) and _SLURM_MEM.fullmatch(v.strip())):
                raise InputError("config %s: %s.mem %r is not a Slurm memory size (e.g. 16G)" % (path, where, v))
            if key in ("cpus_per_task", "gpus", "throttle", "max_array_size", "poll_s") and not (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= (0 if key == "gpus" else 1)):
                raise InputError("config %s: %s.%s %r: must be a number >= %d" % (
                    path, where, key, v, 0 if key == "gpus" else 1))
            if key == "args" and not isinstance(v, list):
                raise InputError("config %s: %s.args must be a list of sbatch flags, not %r" % (path, where, v))


def _kind(x):
    """The type a config value must have, from its default."""
    if isinstance(x, bool):
        return "a boolean", lambda v: isinstance(v, bool)
    if isinstance(x, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(x, float):
        return "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(x, str):
        return "a string", lambda v: isinstance(v, str)
    return None, None


def _check_types(default, cfg, where, path):
    """Every value of the config has the type of its default (a one-line error naming the key)."""
    for key, d in default.items():
        v, name = cfg[key], ".".join(path + [key])
        if (tuple(path + [key]) in _FREE or d is None or path[:1] == ["slurm"]   # Slurm takes its own forms
                or key == "nbg" or (v is None and key in ("split", "ddir", "python"))):   # nbg: below
            continue
        if isinstance(d, dict):
            _check_types(d, v, where, path + [key])
            continue
        if isinstance(d, list):
            if not isinstance(v, list):
                raise InputError("config %s: %s must be a list, not %r" % (where, name, v))
            if any(isinstance(e, float) for e in d):
                what, ok = _kind(0.5)
            elif d:
                what, ok = _kind(d[0])
            else:       # command-line arguments: scalars
                what, ok = "a string or number", lambda e: isinstance(e, (str, int, float)) and not isinstance(e, bool)
            bad = [e for e in v if not ok(e)]
            if bad:
                raise InputError("config %s: %s must be a list whose items are each %s, not %r" % (
                    where, name, what, bad[0]))
            continue
        what, ok = _kind(d)
        if ok is not None and not ok(v):
            raise InputError("config %s: %s must be %s, not %r" % (where, name, what, v))


def bg_label(nbg, indomain=False):
    """Column name of a background: 0 -> "none", 1000000 -> "F1M", 2000 -> "F2k"."""
    if nbg == 0:
        name = "none"
    else:
        for div, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
            if nbg >= div and nbg % (div // 10 if div > 1000 else div) == 0:
                name = "F%g%s" % (nbg / div, suffix)
                break
        else:
            name = "F%d" % nbg
    if indomain:
        name = "in-domain" if nbg == 0 else name + "+in-domain"
    return name


def parse_method(spec, where="config"):
    """``variant[:weights]`` (a ``diffusion.methods`` entry) -> lowshot.method.Method, one-line errors."""
    from lowshot import method
    variant, _, weights = str(spec).partition(":")
    try:
        return method.Method(variant, weights or "binary")
    except InputError as e:
        raise InputError("%s: diffusion.methods entry %r: %s" % (where, spec, e))


def method_name(spec):
    """File-name part of a diffusion method: empty for the paper's (douze18, binary weights: the file
    names of earlier run folders stay), ``.spreading``, ``.poisson-gaussian``, ..."""
    m = parse_method(spec)
    if m.variant == "douze18" and m.weights == "binary":
        return ""
    return "." + m.variant + ("" if m.weights == "binary" else "-" + m.weights)


def variant_name(nbg, indomain):
    """File-name part of a diffusion background: ``nbg1000000`` or ``nbg0.indomain``."""
    return "nbg%d%s" % (nbg, ".indomain" if indomain else "")


def parse_variant(name):
    """(nbg, indomain) of a :func:`variant_name`."""
    base, _, rest = name.partition(".")
    if not base.startswith("nbg") or rest not in ("", "indomain"):
        raise ValueError("not a background variant name: %r" % name)
    return int(base[3:]), rest == "indomain"


def run_name(n, seed, variant=None, lr=None, wd=None, batchsize=None):
    """File-name stem of one run: ``nl{n}.seed{s}``, ``nl{n}.{variant}.seed{s}`` (diffusion, fusion)
    or ``nl{n}.lr{lr}.wd{wd}.bs{batchsize}.seed{s}`` (the logreg grid)."""
    parts = ["nl%d" % n]
    if variant is not None:
        parts.append(variant)
    if lr is not None:
        parts += ["lr%g" % lr, "wd%g" % wd, "bs%d" % batchsize]
    return ".".join(parts + ["seed%d" % seed])

