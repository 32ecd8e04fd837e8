"""Reliability: a bad input is one line, two runs on the same outputs take turns, a killed parent
leaves no running child, a full disk or a read-only place is one line and leaves earlier outputs intact.

The table ``BAD`` is the reliability probe: each row runs a script's ``main`` under
``lowshot.common.run_main`` (what ``python script.py`` does) and expects exit status 2 and one line
``error: ...`` on stderr matching the row's pattern, never a traceback. A new flag without
validation belongs in it. Everything runs on one tiny generated data root, made once.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import build_graph
import diffusion
import fusion
import generate_ddir as generate_ddir_script
import logreg as logreg_script
import own_data
import save_features
import train_apply_pca
from lowshot import data, phases, stored_graph
from lowshot.common import run_main
from lowshot.generate import generate_ddir
from lowshot.owndata import write_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBG = 500


def diff_args(c, *extra):
    return ["--ddir", c["R"], "--split", c["split"], "--mode", "test", "--nlabeled", "2", "--seed", "3",
            "--k", "6", "--nbg", str(NBG), "--niter", "2", *extra]


def lr_args(c, *extra):
    return ["--ddir", c["R"], "--split", c["split"], "--mode", "test", "--nlabeled", "1", "--maxiter", "2", *extra]


def graph_args(c, *extra):
    return [str(NBG), "--ddir", c["R"], "--recall_nq", "0", *extra]


def own_args(c, ddir, *extra):
    return [ddir, "--features", c["X"], "--labels", c["y"], "--pca_dim", "4", *extra]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    t = tmp_path_factory.mktemp("reliability")
    R = str(t / "ddir")
    generate_ddir(R, nclass=24, ntrain=8, ntest=4, D=32, d=16, nbg=NBG, nclutter=6, block=256)
    build_graph.main([str(NBG), "--ddir", R, "--method", "exact", "--recall_nq", "0"])
    c = {"t": str(t), "R": R, "split": os.path.join(R, "label_idx.json")}
    # test-split scores with their record (diffusion.py --storeL), any logreg-like scores
    c["L_test"] = str(t / "L_test.npy")
    diffusion.main(diff_args(c, "--storeL", c["L_test"]))
    np.save(str(t / "lr.npy"), np.full((3, 3), 1 / 3, dtype=np.float32))
    # own data: features and labels, a root with its split, a pickled and a missing label file
    rs = np.random.RandomState(0)
    c["X"], c["y"] = str(t / "X.npy"), str(t / "y.npy")
    np.save(c["X"], rs.randn(48, 8).astype(np.float32))
    np.save(c["y"], np.repeat(np.arange(6), 8))
    np.save(str(t / "pickled.npy"), np.array([{"class": 1}], dtype=object), allow_pickle=True)
    c["own"] = str(t / "own")
    own_data.main(own_args(c, c["own"]))
    # a split whose validation and test lists share a class
    sp = json.load(open(c["split"]))
    sp["base_classes_1"] = sp["base_classes_1"] + sp["novel_classes_2"][:1]
    json.dump(sp, open(str(t / "leak.json"), "w"))
    # phases configs with a Slurm typo and a time that is not one
    small = open(os.path.join(ROOT, "configs", "small.yaml")).read()
    (t / "typo.yaml").write_text(small.replace("mem: 1G, cpus", "memory: 3G, cpus", 1))     # in logreg.slurm
    (t / "time.yaml").write_text(small.replace('time: "0:10:00"\n  mem: 1G', "time: soon\n  mem: 1G"))
    return c


# (name, script, argv(ctx), pattern of the one line)
BAD = [
    # diffusion.py: flags checked where they are declared
    ("diffusion bg_nprobe 0", diffusion, lambda c: diff_args(c, "--bg_nprobe", "0"), r"argument --bg_nprobe: must be >= 1, got 0"),
    ("diffusion bg_nprobe -3", diffusion, lambda c: diff_args(c, "--bg_nprobe", "-3"), r"argument --bg_nprobe: must be >= 1"),
    ("diffusion recall_nq -5", diffusion, lambda c: diff_args(c, "--recall_nq", "-5"), r"argument --recall_nq: must be >= 0"),
    ("diffusion seed -1", diffusion, lambda c: diff_args(c, "--seed", "-1"), r"argument --seed: a seed must be in 0\.\.4294967295"),
    ("diffusion seed 2^32", diffusion, lambda c: diff_args(c, "--seed", "4294967296"), r"argument --seed: a seed must be"),
    ("diffusion seed abc", diffusion, lambda c: diff_args(c, "--seed", "abc"), r"argument --seed: expected an integer, got 'abc'"),
    ("diffusion node_nprobe 0", diffusion, lambda c: diff_args(c, "--node_index", "ivf", "--node_nprobe", "0"),
     r"argument --node_nprobe: must be >= 1"),
    ("diffusion k 0", diffusion, lambda c: diff_args(c, "--k", "0"), r"argument --k: must be >= 1"),
    ("diffusion nbg -1", diffusion, lambda c: diff_args(c, "--nbg", "-1"), r"argument --nbg: must be >= 0"),
    ("diffusion niter -1", diffusion, lambda c: diff_args(c, "--niter", "-1"), r"argument --niter: must be >= 0"),
    ("diffusion bg_ef_search 0", diffusion, lambda c: diff_args(c, "--bg_ef_search", "0"), r"argument --bg_ef_search"),
    ("diffusion unknown flag", diffusion, lambda c: diff_args(c, "--nbgg", "3"), r"unrecognized arguments: --nbgg"),
    ("diffusion k too large", diffusion, lambda c: diff_args(c, "--k", "60", "--nbg", "0"), r"k = 60 but the graph has only"),
    ("diffusion nbg beyond file", diffusion, lambda c: diff_args(c, "--nbg", "600"), r"fewer than nbg = 600"),
    ("diffusion graph missing", diffusion, lambda c: diff_args(c, "--nbg", "400"), r"python build_graph.py 400"),
    ("diffusion class_range alone", diffusion, lambda c: diff_args(c, "--class_range", "0:2"), r"--class_range needs --store_slice"),
    ("diffusion storeLiters list", diffusion, lambda c: diff_args(c, "--storeLiters", "0,2"), r"this flag takes the 2018 code's"),
    ("diffusion split leak", diffusion, lambda c: diff_args(c, "--split", os.path.join(c["t"], "leak.json")),
     r"leak.json: class \d+ is in both base_classes_1 \(validation\) and novel_classes_2 \(test\)"),
    ("diffusion missing ddir", diffusion, lambda c: diff_args(c, "--ddir", os.path.join(c["t"], "none")), r"does not exist"),
    # build_graph.py
    ("build_graph nlist 0", build_graph, lambda c: graph_args(c, "--nlist", "0"), r"argument --nlist: must be >= 1"),
    ("build_graph nprobe 0", build_graph, lambda c: graph_args(c, "--nprobe", "0"), r"argument --nprobe: must be >= 1"),
    ("build_graph nlist > N", build_graph, lambda c: graph_args(c, "--method", "ivf", "--nlist", "600"),
     r"--nlist 600: more lists than the N = 500"),
    ("build_graph nprobe > nlist", build_graph, lambda c: graph_args(c, "--nlist", "8", "--nprobe", "9"),
     r"--nprobe 9: more than the --nlist 8"),
    ("build_graph recall_nq -1", build_graph, lambda c: graph_args(c, "--recall_nq", "-1"), r"argument --recall_nq: must be >= 0"),
    ("build_graph hnsw_M 1", build_graph, lambda c: graph_args(c, "--method", "hnsw", "--hnsw_M", "1"),
     r"argument --hnsw_M: must be >= 2"),
    ("build_graph nnd_L < K", build_graph, lambda c: graph_args(c, "--method", "nndescent", "--nnd_L", "4"),
     r"--nnd_L 4: NN-descent needs a candidate pool of at least K = 32"),
    ("build_graph N 1", build_graph, lambda c: ["1", "--ddir", c["R"]], r"argument N: must be >= 2"),
    ("build_graph shard", build_graph, lambda c: graph_args(c, "--shard", "3/2"), r"shard 3/2: need 0 <= i < S"),
    ("build_graph bs 0", build_graph, lambda c: graph_args(c, "--bs", "0"), r"argument --bs: must be >= 1"),
    # logreg.py
    ("logreg verbose -1", logreg_script, lambda c: lr_args(c, "--verbose", "-1"), r"argument --verbose: must be >= 0"),
    ("logreg threads -1", logreg_script, lambda c: lr_args(c, "--threads", "-1"), r"argument --threads: must be >= 0"),
    ("logreg device bogus", logreg_script, lambda c: lr_args(c, "--device", "bogus"),
     r"argument --device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
    ("logreg seed -1", logreg_script, lambda c: lr_args(c, "--seed", "-1"), r"argument --seed: a seed must be"),
    ("logreg seed 2^32", logreg_script, lambda c: lr_args(c, "--seed", "4294967296"), r"argument --seed: a seed must be"),
    ("logreg lr -1", logreg_script, lambda c: lr_args(c, "--lr", "-1"), r"--lr -1.0: must be > 0"),
    ("logreg nlabeled 50", logreg_script, lambda c: lr_args(c, "--nlabeled", "50"), r"fewer than nlabeled = 50"),
    ("logreg pcadim", logreg_script, lambda c: lr_args(c, "--pcadim", "2048"), r"--pcadim 2048 but the features"),
    # fusion.py
    ("fusion val given test scores", fusion,
     lambda c: ["--ddir", c["R"], "--split", c["split"], "--mode", "val", "--logreg_scores",
                os.path.join(c["t"], "lr.npy"), "--diffusion_scores", c["L_test"]],
     r"L_test.npy holds the test split's scores \(.*L_test.npy.json, written by diffusion.py\), not the val split's"),
    ("fusion weights", fusion,
     lambda c: ["--ddir", c["R"], "--split", c["split"], "--mode", "test", "--logreg_scores", c["L_test"],
                "--diffusion_scores", c["L_test"], "--weights", "0,2"], r"each in \[0, 1\]"),
    # train_apply_pca.py
    ("pca apply chunk 0", train_apply_pca, lambda c: ["apply", "--ddir", c["R"], "--chunk", "0"],
     r"argument --chunk: must be >= 1, got 0"),
    ("pca train dout 0", train_apply_pca, lambda c: ["train", "--ddir", c["R"], "--dout", "0"], r"argument --dout: must be >= 1"),
    ("pca no command", train_apply_pca, lambda c: [], r"required: command"),
    # own_data.py
    ("own_data pickled labels", own_data,
     lambda c: own_args(c, os.path.join(c["t"], "o1"))[:3] + ["--labels", os.path.join(c["t"], "pickled.npy")],
     r"--labels .*pickled.npy is not a .npy array \(.*allow_pickle"),
    ("own_data missing labels", own_data,
     lambda c: own_args(c, os.path.join(c["t"], "o2"))[:3] + ["--labels", os.path.join(c["t"], "none.npy")],
     r"--labels .*none.npy does not exist"),
    ("own_data pickled groups", own_data,
     lambda c: own_args(c, os.path.join(c["t"], "o3"), "--groups", os.path.join(c["t"], "pickled.npy")),
     r"--groups .*pickled.npy is not a .npy array"),
    ("own_data other seed", own_data, lambda c: own_args(c, c["own"], "--seed", "5"),
     r"already has a split, drawn with other parameters than --seed 5 \(the split's: 0\).*new data root"),
    ("own_data seed -1", own_data, lambda c: own_args(c, c["own"], "--seed", "-1"), r"argument --seed: a seed must be"),
    # save_features.py
    ("save_features i0 -1", save_features, lambda c: ["--cfg", "c.yaml", "--outfile", "o.hdf5", "--i0", "-1"],
     r"argument --i0: must be >= 0, got -1"),
    # generate_ddir.py
    ("generate seed -2", generate_ddir_script, lambda c: [os.path.join(c["t"], "g"), "--seed", "-2"],
     r"argument --seed: a seed must be"),
    ("generate d > D", generate_ddir_script, lambda c: [os.path.join(c["t"], "g"), "--D", "16", "--d", "32"],
     r"d 32 is larger than D 16"),
    # the phases' config
    ("phases slurm typo", phases, lambda c: ["logreg", "1", "--config", os.path.join(c["t"], "typo.yaml"), "--dry-run"],
     r"unknown Slurm option 'memory' in logreg.slurm"),
    ("phases slurm time", phases, lambda c: ["logreg", "1", "--config", os.path.join(c["t"], "time.yaml"), "--dry-run"],
     r"config .*time.yaml: slurm.time 'soon' is not a Slurm time"),
    ("phases nproc 0", phases, lambda c: ["logreg", "1", "--nproc", "0", "--dry-run"], r"argument --nproc: must be >= 1"),
]


def one_line_error(capsys, main, argv):
    """Run main under run_main: exit status 2 and one line ``error: ...`` on stderr; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.parametrize("name, script, argv, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(ctx, capsys, name, script, argv, pattern):
    line = one_line_error(capsys, script.main, argv(ctx))
    assert re.search(pattern, line), line


def run_script(args, env=None, **kw):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300, **kw)


def test_bad_input_from_the_command_line(ctx):
    """As users run them: one line, status 2, no traceback; faiss' abort on HNSW M 0 never reached."""
    for args, env, pattern in (
            (["build_graph.py"] + graph_args(ctx, "--method", "hnsw", "--hnsw_M", "0", "--force"), None,
             r"^error: argument --hnsw_M: must be >= 2, got 0$"),
            (["diffusion.py"] + diff_args(ctx, "--seed", "-1"), None, r"^error: argument --seed: a seed must be"),
            (["-m", "lowshot.phases", "logreg", "1", "--dry-run"], {"NPROC": "abc"},
             r"^error: \$NPROC \(parallel runs\): expected an integer, got 'abc'$")):
        r = run_script(args, env)
        assert r.returncode == 2 and re.search(pattern, r.stderr.strip()), r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def copy_root(ctx, tmp_path):
    root = str(tmp_path / "ddir")
    shutil.copytree(ctx["R"], root, ignore=shutil.ignore_patterns("cache"))
    return root


@pytest.mark.parametrize("damage, pattern", [
    ("nan", r"D\[7, 2\] = nan is not a finite similarity"),
    ("inf", r"D\[7, 2\] = inf is not a finite similarity"),
    ("unsorted", r"row 7 is not sorted by decreasing similarity"),
    ("random", r"(neither -1 nor a background id|not a finite similarity|not sorted)"),
])
def test_damaged_knn_table(ctx, copy_root, capsys, damage, pattern):
    """A k-NN table holding NaN, inf, unsorted rows or random bytes: one line naming the file."""
    p = stored_graph.graph_paths(copy_root, NBG, 32)
    D = np.fromfile(p["D"], dtype=np.float32).reshape(NBG, 32)
    if damage == "nan":
        D[7, 2] = np.nan
    elif damage == "inf":
        D[7, 2] = np.inf
    elif damage == "unsorted":
        D[7, [1, 3]] = D[7, [3, 1]] - [0, 0.5]
    else:
        rs = np.random.RandomState(0)
        with open(p["I"], "wb") as f:
            f.write(rs.bytes(NBG * 32 * 4))
        D = np.frombuffer(rs.bytes(NBG * 32 * 4), dtype=np.float32)
    D.tofile(p["D"])
    line = one_line_error(capsys, diffusion.main, diff_args({"R": copy_root, "split": ctx["split"]}))
    assert re.search(pattern, line) and "build_graph.py 500 --force" in line, line


def test_damaged_work_folder_is_redone(copy_root, capsys):
    """A corrupt plan.json, or a truncated lists.float32, in a build's work folder: the rerun says the
    work folder is damaged, redoes what it must and ends with the graph of an undamaged build."""
    base = [str(NBG), "--ddir", copy_root, "--method", "ivf", "--recall_nq", "0", "--force"]
    build_graph.main(base)
    p = stored_graph.graph_paths(copy_root, NBG, 32)
    ref = open(p["I"], "rb").read()
    for damage in ("plan", "lists"):
        build_graph.main(base + ["--prepare"])
        work = p["work"]
        if damage == "plan":
            with open(os.path.join(work, "plan.json"), "w") as f:
                f.write('{"nbg": 5')
        else:
            with open(os.path.join(work, "lists.float32"), "r+b") as f:
                f.truncate(100)
        capsys.readouterr()
        build_graph.main(base[:-1])
        out = capsys.readouterr().out
        assert "the work folder %s is damaged" % work in out and "prepare step is done again" in out, out
        assert open(p["I"], "rb").read() == ref and not os.path.exists(work)


def test_completion_cache_with_bad_ids_is_rebuilt(copy_root, ctx, capsys):
    args = diff_args({"R": copy_root, "split": ctx["split"]})
    diffusion.main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cache = first["graph"]["cache"]
    I = np.fromfile(os.path.join(cache, "1.I"), dtype=np.int32)
    I[5] = -9
    I.tofile(os.path.join(cache, "1.I"))
    diffusion.main(args)
    out = capsys.readouterr().out
    again = json.loads(out.strip().splitlines()[-1])
    assert "holds ids outside" in out and again["graph"]["cache_built"]
    assert again["top5"] == first["top5"] and again["iters"] == first["iters"]


# ---------------------------------------------------------------- two runs never fight

def start(args):
    return subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(procs):
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0] for o in outs]


def test_two_graph_builds_take_turns(tmp_path):
    """Two build_graph.py N started together (the resumable IVF build): both exit 0, one builds,
    the other waits and reuses its graph; no work folder is left."""
    root = str(tmp_path / "ddir")
    generate_ddir(root, nclass=8, ntrain=4, ntest=2, D=32, d=16, nbg=20000, nclutter=2, block=4096)
    cmd = ["build_graph.py", "20000", "--ddir", root, "--method", "ivf", "--recall_nq", "0"]
    outs = finish([start(cmd), start(cmd)])
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert sorted(r["reused"] for r in results) == [False, True]
    p = stored_graph.graph_paths(root, 20000, 32)
    assert not os.path.exists(p["work"]) and not os.path.exists(p["lock"])
    ref = open(p["I"], "rb").read()
    assert finish([start(cmd + ["--force"])]) and open(p["I"], "rb").read() == ref


def test_two_pca_applies_take_turns(ctx, tmp_path):
    rs = np.random.RandomState(1)
    blocks = str(tmp_path / "block%d.hdf5")
    for b in range(2):
        write_features(blocks % b, rs.randn(30000, 32).astype(np.float32), -np.ones(30000, dtype=np.int64))
    out = str(tmp_path / "out.raw")
    cmd = ["train_apply_pca.py", "apply", "--pcafile", data.feature_paths(ctx["R"])["pca"], "--inpattern", blocks,
           "--outfile", out, "--chunk", "4096"]
    finish([start(cmd), start(cmd)])
    got = open(out, "rb").read()
    assert len(got) == 60000 * 16 * 4 and not os.path.exists(out + ".partial")
    os.remove(out)
    finish([start(cmd)])
    assert open(out, "rb").read() == got and sorted(os.listdir(tmp_path)) == ["block0.hdf5", "block1.hdf5", "out.raw"]


def test_two_own_data_runs_take_turns(ctx, tmp_path):
    ddir = str(tmp_path / "own")
    cmd = ["own_data.py"] + own_args(ctx, ddir)
    outs = finish([start(cmd), start(cmd)])
    assert any("another run holds" in o for o in outs) or any("exists" in o for o in outs)
    assert os.path.isfile(os.path.join(ddir, "phases.yaml")) and not os.path.exists(os.path.join(ddir, "own_data.lock"))
    assert json.load(open(os.path.join(ddir, "label_idx.json"))) == json.load(
        open(os.path.join(ctx["own"], "label_idx.json")))


# ---------------------------------------------------------------- a killed parent leaves no child

def wait_for_child(pid, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        if kids:
            return kids
        time.sleep(0.01)
    return []


def test_killed_own_data_leaves_no_child(ctx, tmp_path):
    """SIGKILL of own_data.py while a step runs: the step dies too, and the rerun succeeds."""
    rs = np.random.RandomState(4)
    np.save(str(tmp_path / "B.npy"), rs.randn(3000, 8).astype(np.float32))
    ddir = str(tmp_path / "own")
    cmd = ["own_data.py"] + own_args(ctx, ddir, "--background", str(tmp_path / "B.npy"))
    p = subprocess.Popen([sys.executable] + cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = wait_for_child(p.pid)
    assert kids, "own_data.py started no step"
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, [k.cmdline() for k in alive]
    r = run_script(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(os.path.join(ddir, "phases.yaml"))
    assert os.path.isfile(stored_graph.graph_paths(ddir, 3000, 32)["I"])


def test_killed_launcher_leaves_no_run(tmp_path):
    code = ("import sys; from lowshot.launch import LocalLauncher, Run; "
            "LocalLauncher(sys.argv[1], nproc=1).execute([Run('x', ['sleep', '60'], [sys.argv[1] + '/x.out'], "
            "sys.argv[1] + '/x.log')], 'test')")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL)
    kids = wait_for_child(p.pid)
    assert kids
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive


# ---------------------------------------------------------------- full disk, read-only places

def mount(args, where):
    os.makedirs(where, exist_ok=True)
    r = subprocess.run(["mount"] + args + [where], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount (%s): needs root" % r.stderr.decode().strip())


def umount(where):
    subprocess.run(["umount", "-l", where], capture_output=True)


def fill(folder):
    """Fill the filesystem of ``folder`` to the last byte."""
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (2**16, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.fixture
def small_fs(tmp_path):
    where = str(tmp_path / "small")
    mount(["-t", "tmpfs", "-o", "size=8m", "tmpfs"], where)
    yield where
    umount(where)


def temporaries(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if ".tmp" in f]


def test_full_disk_result_files(ctx, small_fs, capsys):
    """--storeL and --result onto a full disk: one line naming the file, the earlier ones intact."""
    L, R = os.path.join(small_fs, "L.npy"), os.path.join(small_fs, "r.json")
    diffusion.main(diff_args(ctx, "--storeL", L, "--result", R))
    before = open(L, "rb").read(), open(R, "rb").read()
    fill(small_fs)
    line = one_line_error(capsys, diffusion.main, diff_args(ctx, "--seed", "4", "--storeL", L, "--result", R))
    assert re.search(r"^error: .*/L.npy(.json)?: cannot write: no space left on the device \(0.0 MiB free", line), line
    assert (open(L, "rb").read(), open(R, "rb").read()) == before and not temporaries(small_fs)


def test_full_disk_graph_and_cache(ctx, small_fs, capsys):
    """A data root on a full disk: building a graph (its memory-mapped files: no SIGBUS) and the
    completion cache stop with one line naming the file, leaving no partial files."""
    root = os.path.join(small_fs, "ddir")
    shutil.copytree(ctx["R"], root, ignore=shutil.ignore_patterns("cache", "knngraph", "*.hdf5"))
    for f in ("train", "val"):      # the features stay outside the small filesystem
        os.symlink(data.feature_paths(ctx["R"])[f], data.feature_paths(root)[f])
    fill(small_fs)
    line = one_line_error(capsys, build_graph.main, graph_args({"R": root}, "--method", "ivf"))
    assert re.search(r"^error: .*/knngraph/ndis500_k32.work/\S+: cannot write: no space left", line), line
    line = one_line_error(capsys, build_graph.main, graph_args({"R": root}, "--method", "exact"))
    assert re.search(r"^error: .*/knngraph/ndis500_k32_[ID]_11.\w+: cannot write: no space left", line), line
    assert not temporaries(root) and not os.path.exists(stored_graph.graph_paths(root, NBG, 32)["I"])
    os.remove(os.path.join(small_fs, "filler"))
    build_graph.main(graph_args({"R": root}, "--method", "exact"))
    fill(small_fs)
    line = one_line_error(capsys, diffusion.main, diff_args({"R": root, "split": ctx["split"]}))
    assert re.search(r"^error: .*/cache/completion/.*: cannot write: no space left", line), line
    assert not temporaries(root)


def test_read_only_data_root(ctx, tmp_path, capsys):
    """A data root on a read-only volume: diffusion runs without a completion cache and says so when
    it holds none (or keeps it where --completion_cache says), and reads the complete one it holds;
    build_graph reuses the graph; an output into a read-only folder is one line."""
    ro = str(tmp_path / "ro")           # a copy without a cache, then mounted read-only over itself
    shutil.copytree(ctx["R"], ro, ignore=shutil.ignore_patterns("cache"))
    mount(["--bind", "-o", "ro", ro], ro)
    args = diff_args({"R": ro, "split": os.path.join(ro, "label_idx.json")})
    try:
        capsys.readouterr()
        diffusion.main(args)
        out = capsys.readouterr().out
        assert "is not writable" in out and "runs without it" in out
        assert "cache" not in json.loads(out.strip().splitlines()[-1])["graph"]
        diffusion.main(args + ["--completion_cache", str(tmp_path / "mycache")])
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["graph"]["cache"].startswith(str(tmp_path / "mycache"))
        build_graph.main(graph_args({"R": ro}))
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"]
        line = one_line_error(capsys, diffusion.main, args + ["--result", os.path.join(ro, "r.json")])
        assert re.search(r"^error: .*/ro/r.json: cannot write: read-only file system$", line), line
        line = one_line_error(capsys, build_graph.main, graph_args({"R": ro}, "--force"))
        assert "read-only file system" in line, line
    finally:
        umount(ro)
    diffusion.main(args)                # writable again: the cache is written there
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["graph"]["cache_built"]
    mount(["--bind", "-o", "ro", ro], ro)
    try:
        diffusion.main(args)
        out = capsys.readouterr().out
        res = json.loads(out.strip().splitlines()[-1])
        assert "is not writable" not in out and not res["graph"]["cache_built"]
        assert res["graph"]["cache"].startswith(os.path.join(ro, "cache"))
    finally:
        umount(ro)
