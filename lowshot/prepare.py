"""The data-preparation phases of ``run_prepare.bash``: features, PCA, background graphs.

The stages before ``run_logreg.bash`` and ``run_diffusion.bash``, as runs of the same launchers
(local or Slurm job arrays, throttled; a run whose outputs exist is never started again, a failed
one is redone alone when the phase is run again), driven by the ``prepare`` section of the same
config (configs/paper.yaml documents each key):

1. features: ``save_features.py`` for each entry of ``prepare.features`` (``features/{name}.hdf5``,
   e.g. train and val), and for the background images in blocks of ``prepare.background.block``
   (``features/f100m/block{b}.hdf5``, images ``b * block .. (b + 1) * block``);
2. PCA: ``train_apply_pca.py train`` on block 0, then ``apply`` to every block
   (``features/PCAR256.vt``, ``features/f100m/concatenated_PCAR256.raw``);
3. graphs: ``build_graph.py N`` for every background size N > 0 of ``diffusion.nbg``. Where
   ``prepare.graph_shards`` gives S > 1 shards for N: ``--prepare`` (one task), then S tasks
   ``--shard i/S`` (one job array), then the merge (a plain ``build_graph.py N``).

Files of the run directory: ``prepare/{features,pca,graph}/<run>.log``, ``slurm/``.
"""
import os

from lowshot import data, ivf_build, stored_graph
from lowshot.common import InputError, get_ddir
from lowshot.launch import Run

def block_path(ddir, b):
    """``features/f100m/block{b}.hdf5``: background images ``b * block .. (b + 1) * block`` (the
    rows of the background file are the blocks' images, in order)."""
    return data.feature_paths(ddir)["blocks"] % b


def _x(v):
    """A path of the config, with $VAR and ~ expanded (as for rundir, ddir, split)."""
    return os.path.expandvars(os.path.expanduser(str(v)))


def _ddir(ph):
    return get_ddir(ph.cfg["ddir"])


def _ddir_args(ph):
    return ["--ddir", ph.cfg["ddir"]] if ph.cfg["ddir"] else []


def _resources(ph, stage):
    return dict(ph.cfg["prepare"]["slurm"].get(stage, {}))


def _log(ph, stage, name):
    return ph.path("prepare", stage, name + ".log")


def nblocks(ph):
    bgc = ph.cfg["prepare"]["background"]
    if not bgc:
        return 0
    return -(-int(bgc["nimages"]) // int(bgc["block"]))


def _model_args(ph):
    p = ph.cfg["prepare"]
    return ["--model", p["model"]] + (["--modelfile", _x(p["modelfile"])] if p["modelfile"] else [])


def feature_runs(ph):
    """Phase 1: one save_features.py run per feature file and per background block."""
    ddir, p = _ddir(ph), ph.cfg["prepare"]
    runs = []
    for name, spec in sorted(p["features"].items()):
        out = os.path.join(ddir, "features", "%s.hdf5" % name)
        cmd = ph._script("save_features.py") + ["--cfg", _x(spec["cfg"]), "--outfile", out] + _model_args(ph)
        for key in ("data", "root"):
            if spec.get(key):
                cmd += ["--" + key, _x(spec[key])]
        runs.append(Run("features.%s" % name, cmd + _ddir_args(ph), [out], _log(ph, "features", name),
                        resources=_resources(ph, "features")))
    bgc = p["background"]
    for b in range(nblocks(ph)):
        i0 = b * int(bgc["block"])
        i1 = min(int(bgc["nimages"]), i0 + int(bgc["block"]))
        out = block_path(ddir, b)
        cmd = ph._script("save_features.py") + ["--cfg", _x(bgc["cfg"]), "--outfile", out, "--i0", str(i0),
                                                "--i1", str(i1)] + _model_args(ph)
        if bgc.get("data"):
            cmd += ["--data", _x(bgc["data"])]
        runs.append(Run("background.block%d" % b, cmd + _ddir_args(ph), [out],
                        _log(ph, "features", "block%d" % b), resources=_resources(ph, "features")))
    return runs


def pca_runs(ph, step):
    """Phase 2: train the PCA on block 0 (step "train"), apply it to every block ("apply")."""
    ddir, p = _ddir(ph), ph.cfg["prepare"]
    fp = data.feature_paths(ddir)
    nb = nblocks(ph)
    if nb == 0:
        return []
    blocks = [block_path(ddir, b) for b in range(nb)]
    if step == "train":
        cmd = ph._script("train_apply_pca.py") + ["train"] + _ddir_args(ph) + ["--dout", str(p["pca"]["dout"])]
        if p["pca"].get("max_rows"):
            cmd += ["--max_rows", str(p["pca"]["max_rows"])]
        return [Run("pca.train", cmd, [fp["pca"]], _log(ph, "pca", "train"), deps=blocks[:1],
                    resources=_resources(ph, "pca"))]
    cmd = ph._script("train_apply_pca.py") + ["apply"] + _ddir_args(ph) + ["--nblock", str(nb)]
    return [Run("pca.apply", cmd, [fp["background"]], _log(ph, "pca", "apply"), deps=blocks + [fp["pca"]],
                resources=_resources(ph, "pca"))]


def graph_sizes(ph):
    return sorted({int(n) for n in ph.cfg["diffusion"]["nbg"] if int(n) > 0})


def graph_shards(ph, nbg):
    v = ph.cfg["prepare"]["graph_shards"]
    if isinstance(v, dict):
        v = v.get(nbg, 1)
    return max(1, int(v))


def graph_runs(ph, step):
    """Phase 3, one step of every background graph: "prepare" and "shards" (sharded sizes only),
    "merge" (every size: the merge, or the whole build when not sharded)."""
    ddir, p = _ddir(ph), ph.cfg["prepare"]
    K = stored_graph.graph_K(int(ph.cfg["diffusion"]["k"]))
    raw = data.feature_paths(ddir)["background"]
    runs = []
    for nbg in graph_sizes(ph):
        paths = stored_graph.graph_paths(ddir, nbg, K)
        final = [paths["I"], paths["D"], paths["index"]]
        if all(os.path.isfile(f) for f in final):
            continue
        S = graph_shards(ph, nbg)
        base = ph._script("build_graph.py") + [str(nbg), "--k", str(K)] + _ddir_args(ph) + list(p["graph_args"])
        res = dict(_resources(ph, "graph"))
        res.update(p["slurm_by_nbg"].get(nbg, {}))
        name = "graph.nbg%d" % nbg
        plan_file = os.path.join(paths["work"], "plan.json")
        if step == "prepare" and S > 1:
            runs.append(Run(name + ".prepare", base + ["--prepare"], [plan_file], _log(ph, "graph", name + ".prepare"),
                            deps=[raw], resources=res))
        elif step == "shards" and S > 1:
            plan = ivf_build.read_plan(paths["work"])
            if plan is None:
                continue          # its prepare task failed: reported by that stage
            for i in range(S):
                outs = [ivf_build.chunk_paths(paths["work"], j)[key]
                        for j in ivf_build.shard_chunks(plan["nchunks"], i, S) for key in ("D", "I")]
                runs.append(Run("%s.shard%dof%d" % (name, i, S), base + ["--shard", "%d/%d" % (i, S)], outs,
                                _log(ph, "graph", "%s.shard%dof%d" % (name, i, S)), deps=[plan_file],
                                resources=res, resumes=True))
        elif step == "merge":
            deps = [raw]
            if S > 1:
                plan = ivf_build.read_plan(paths["work"])
                deps = [plan_file] + ([] if plan is None else [
                    ivf_build.chunk_paths(paths["work"], j)["D"] for j in range(plan["nchunks"])])
            runs.append(Run(name, base, final, _log(ph, "graph", name), deps=deps, resources=res))
    return runs


def stages(ph, number):
    """The (label, callable -> runs) stages of preparation phase ``number``."""
    if number == 1:
        return [("features", lambda: feature_runs(ph))]
    if number == 2:
        return [("PCA training", lambda: pca_runs(ph, "train")), ("PCA apply", lambda: pca_runs(ph, "apply"))]
    if number == 3:
        return [("graph prepare", lambda: graph_runs(ph, "prepare")),
                ("graph shards", lambda: graph_runs(ph, "shards")),
                ("graph merge", lambda: graph_runs(ph, "merge"))]
    raise InputError("prepare has phases 1 (features), 2 (PCA) and 3 (graphs), not %d" % number)
