"""own_data.py: a folder of class sub-folders made here (drawn shapes, one unreadable file, RGBA,
greyscale, CMYK and EXIF-rotated images, near-duplicate versions grouped by --group) through the
published layout to the phases' results table."""
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from lowshot import data, owndata, stored_graph
from lowshot.common import InputError
from test_phases import ROOT, run_phase

SHAPES = ("disc", "square", "bar", "cross", "ring", "triangle")


def draw(shape, rs, size=40):
    """A coloured shape on a noisy background: one class per shape."""
    from PIL import ImageDraw
    img = Image.fromarray((rs.rand(size, size, 3) * 60).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    c = tuple(int(v) for v in 150 + rs.randint(0, 100, 3))
    o = rs.randint(2, 8)
    box = [o, o, size - o, size - o]
    if shape == "disc":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "bar":
        d.rectangle([o, size // 2 - 4, size - o, size // 2 + 4], fill=c)
    elif shape == "cross":
        d.rectangle([o, size // 2 - 3, size - o, size // 2 + 3], fill=c)
        d.rectangle([size // 2 - 3, o, size // 2 + 3, size - o], fill=c)
    elif shape == "ring":
        d.ellipse(box, outline=c, width=5)
    else:
        d.polygon([(size // 2, o), (o, size - o), (size - o, size - o)], fill=c)
    return img


def make_folders(root, per_class=8, nbg=12):
    rs = np.random.RandomState(0)
    for shape in SHAPES:
        os.makedirs(os.path.join(root, "photos", shape))
        for i in range(per_class):
            for v in (1, 2):          # two near-identical versions of each image: one group
                img = draw(shape, np.random.RandomState(1000 * SHAPES.index(shape) + i))
                img.save(os.path.join(root, "photos", shape, "%s%02d_v%d.png" % (shape, i, v)))
    d = os.path.join(root, "photos", "disc")
    img = draw("disc", rs)
    img.convert("RGBA").save(os.path.join(d, "rgba.png"))
    img.convert("L").save(os.path.join(d, "grey.png"))
    img.convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    exif = img.getexif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(os.path.join(d, "rotated.jpg"), exif=exif)
    with open(os.path.join(d, "broken.jpg"), "wb") as f:
        f.write(b"not an image")
    os.makedirs(os.path.join(root, "unlabelled"))
    for i in range(nbg):
        draw(SHAPES[i % len(SHAPES)], rs).save(os.path.join(root, "unlabelled", "u%02d.png" % i))


def test_split_keeps_groups_together_and_covers_the_classes(tmp_path):
    make_folders(str(tmp_path))
    classes = owndata.scan_classes(str(tmp_path / "photos"))
    assert [c for c, _ in classes] == sorted(SHAPES)
    split = owndata.make_split(classes, seed=3, group=r"^(.*)_v\d+$")
    group = lambda f: os.path.basename(f).split("_v")[0]    # noqa: E731
    train_groups = {group(f) for f, _ in split["train"]}
    assert not train_groups & {group(f) for f, _ in split["test"]}          # no group on both sides
    li = split["label_idx"]
    ids = [li[k] for k in ("base_classes_1", "novel_classes_1", "base_classes_2", "novel_classes_2")]
    assert sorted(sum(ids, [])) == list(range(1, 7)) and all(ids)            # four disjoint, non-empty
    assert li["label_names"] == sorted(SHAPES)
    assert split == owndata.make_split(classes, seed=3, group=r"^(.*)_v\d+$")  # deterministic
    with pytest.raises(InputError, match="test_fraction 1: must be between 0 and 1"):
        owndata.make_split(classes, test_fraction=1)
    with pytest.raises(InputError, match="the split needs 4"):
        owndata.make_split(classes[:3])


def test_split_caps_and_novel_classes_with_enough_training_images():
    """Caps taken round-robin over groups, novel classes only among classes with enough training
    images: checked by brute force on made-up file names (class c: groups g0..g{c+2}, c+1 files each)."""
    classes = [("c%02d" % c, ["/x/c%02d/g%d_%d.png" % (c, g, i) for g in range(c + 3) for i in range(c + 1)])
               for c in range(12)]
    group = lambda f: os.path.basename(f).split("_")[0]    # noqa: E731
    split = owndata.make_split(classes, seed=5, group=r"^(g\d+)_", min_novel_train=20,
                               max_train_per_class=30, max_test_per_class=9)
    ntrain = collections.Counter(c for _, c in split["train"])
    li = split["label_idx"]
    for c in li["novel_classes_1"] + li["novel_classes_2"]:
        assert ntrain[c - 1] >= 20
    for cid, (name, files) in enumerate(classes):
        tr = [f for f, c in split["train"] if c == cid]
        te = [f for f, c in split["test"] if c == cid]
        assert not {group(f) for f in tr} & {group(f) for f in te}
        ntest_groups = len({group(f) for f in te})
        assert len(te) == min(9, ntest_groups * (cid + 1))
        assert len(tr) == min(30, (cid + 3 - ntest_groups) * (cid + 1))
        for side in (tr, te):        # round-robin: group sizes differ by at most one
            sizes = collections.Counter(group(f) for f in side).values()
            assert max(sizes) - min(sizes) <= 1
    uncapped = owndata.make_split(classes, seed=5, group=r"^(g\d+)_")
    assert sorted(f for p in ("train", "test") for f, _ in uncapped[p]) == sorted(sum((f for _, f in classes), []))
    big = sum(n >= 45 for n in collections.Counter(c for _, c in uncapped["train"]).values())
    assert big < 6      # 12 classes: 6 novel needed
    with pytest.raises(InputError, match="only %d classes have >= 45 training images" % big):
        owndata.make_split(classes, seed=5, group=r"^(g\d+)_", min_novel_train=45)
    with pytest.raises(InputError, match="max_test_per_class 0: must be at least 1"):
        owndata.make_split(classes, max_test_per_class=0)


def test_own_images_to_results_table(tmp_path):
    make_folders(str(tmp_path))
    ddir = str(tmp_path / "my data" / "ddir")          # a space: the printed commands are quoted
    cmd = [sys.executable, os.path.join(ROOT, "own_data.py"), ddir, "--images", str(tmp_path / "photos"),
           "--unlabelled", str(tmp_path / "unlabelled"), "--group", r"^(.*)_v\d+$", "--size", "32",
           "--pca_dim", "16", "--seed", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    f = data.feature_paths(ddir)
    meta = json.load(open(os.path.join(ddir, "own_data.json")))
    # the unreadable image: named, left out of the lists and the feature files (no black row)
    import h5py
    broken = str(tmp_path / "photos" / "disc" / "broken.jpg")
    assert list(meta["unreadable"]) == [broken] and "WARNING: unreadable image %s" % broken in r.stdout
    for key, part in (("train", "train"), ("val", "test")):
        names = json.load(open(os.path.join(ddir, "lists", part + ".json")))["image_names"]
        assert broken not in names
        with h5py.File(f[key], "r") as h:
            assert h["bad_images"].size == 0 and h["count"][0] == len(names)
        assert not os.path.exists(f[key] + ".bad")
    assert meta["nbackground"] == 12 and os.path.getsize(f["background"]) == 12 * 16 * 4
    assert data.load_pca(f["pca"]).d_out == 16
    assert os.path.isfile(stored_graph.graph_paths(ddir, 12, 8)["I"])     # K = 8: the power of two below 12
    # 6 classes, 3 in the test split: top-5 would be 100%, validation maximises top-1 and says so
    ntest = len(data.load_split(os.path.join(ddir, "label_idx.json"), "test").classes)
    assert ntest == 3
    assert ("the test split has 3 classes, fewer than 10: phase 2 chooses on top-1 accuracy (metric: top1 in %s"
            % os.path.join(ddir, "phases.yaml")) in r.stdout
    assert "WARNING: the test split has 3 classes (<= 5): top-5 accuracy is 100% for every method" in r.stdout
    assert any(w.startswith("the test split has 3 classes") for w in meta["warnings"])
    # the printed commands, pasted as they are (the data root's path holds a space), work
    ready = re.search(r"ready: (.*) \(\.\.\. 4\), then (.*) \(\.\.\. 4\)$", r.stdout, re.M)
    for line, script in zip(ready.groups(), ("run_logreg.bash", "run_diffusion.bash")):
        assert line.startswith("CONFIG=") and script in line
        p = subprocess.run(["bash", "-c", line + " --dry-run"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHON=sys.executable))
        assert p.returncode == 0 and "dry run" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    # the generated config, shrunk to one seed, one n and a tiny logreg grid, through the phases
    cfg = yaml.safe_load(open(os.path.join(ddir, "phases.yaml")))
    assert cfg["metric"] == "top1"
    # the demo's grids: no background and all of it, each also with the in-domain images
    assert cfg["diffusion"]["nbg"] == [0, 12] and cfg["diffusion"]["indomain"] == [False, True]
    cfg.update(seeds=[1], nlabeled=[1])
    cfg["logreg"].update(lr=[0.1], wd=[0], maxiter=200)
    cfg["diffusion"]["niter"] = 3
    config = str(tmp_path / "tiny.yaml")
    yaml.safe_dump(cfg, open(config, "w"))
    # two BLAS threads per run: the PCA'd base vectors, the completion cache's key, are then the same
    # bits in every run of a split only if computed apart from the run's own rows
    threads = {k: "2" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    for script in ("run_logreg.bash", "run_diffusion.bash"):
        for phase in (1, 2, 3, 4):
            out = run_phase(script, phase, config, **threads)
    assert "| n | logreg |" in out and "diffusion F12" in out and "diffusion F12+in-domain" in out
    assert "Top-1 accuracy (%) on the test split, all classes" in out and "(config metric: top1)" in out
    # runs of 2 splits x 2 backgrounds (with and without in-domain rows, n labelled images): 4 cache folders
    cache = os.path.join(ddir, "cache", "completion")
    assert len([d for d in os.listdir(cache) if os.path.isdir(os.path.join(cache, d))]) == 4, os.listdir(cache)
    assert not [f for _, _, fs in os.walk(cfg["rundir"]) for f in fs if f.endswith(".lock")]
    # phase 4 says what chance is and what the numbers count
    res = json.load(open(os.path.join(cfg["rundir"], "results", "diffusion.json")))
    ntest_rows = len(data.load_labels(f["val"], data.load_split(os.path.join(ddir, "label_idx.json"), "test"))[0])
    assert res["test_split"]["nclass"] == 3 and res["test_split"]["ntest"] == ntest_rows
    assert "**Chance level: top-5 100.0%, top-1 33.3%** (k of 3 classes" in out
    assert "(chance 33.3%)" in out and "%d test images" % ntest_rows in out
    assert "accuracy on the test split (3 classes, " in res["plot_title"] and "seeds [" not in res["plot_title"]
    assert "metric: top1" in open(os.path.join(cfg["rundir"], "chosen_diffusion.yaml")).read()
    # a second run has nothing to do
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "exists:" in r.stdout and "running: save_features" not in r.stdout
    # --prepared: the same lists and split made elsewhere give the same feature files
    ddir2 = str(tmp_path / "ddir2")
    shutil.copytree(os.path.join(ddir, "lists"), os.path.join(ddir2, "lists"))
    shutil.copy(os.path.join(ddir, "label_idx.json"), ddir2)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "own_data.py"), ddir2, "--prepared", "--size", "32",
                        "--pca_dim", "16"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    f2 = data.feature_paths(ddir2)
    for key in ("train", "val"):
        with h5py.File(f[key], "r") as a, h5py.File(f2[key], "r") as b:
            np.testing.assert_array_equal(a["all_feats"][()], b["all_feats"][()])
    assert open(f["background"], "rb").read() == open(f2["background"], "rb").read()


def test_bad_split_is_loud(tmp_path):
    """What would make a split mislead, on a drawn folder: a --group written with the extension (it
    matches no name), an empty class folder, a one-image class, an empty and a truncated .png, a class
    holding most of the test images, 3 classes per split. Each is a WARNING line and in own_data.json;
    the unreadable files and the classes left out are in no list, no feature row, no label_names."""
    rs = np.random.RandomState(5)
    photos = tmp_path / "photos"
    for shape in SHAPES:
        os.makedirs(str(photos / shape))
        for i in range(30 if shape == "disc" else 4):
            for v in (1, 2):
                draw(shape, rs, size=24).save(str(photos / shape / ("%s%02d_v%d.png" % (shape, i, v))))
    os.makedirs(str(photos / "empty"))
    (photos / "empty" / "notes.txt").write_text("no image here")
    os.makedirs(str(photos / "single"))
    draw("disc", rs, size=24).save(str(photos / "single" / "only_v1.png"))
    blank, cut = str(photos / "square" / "blank_v1.png"), str(photos / "square" / "cut_v1.png")
    open(blank, "wb").close()
    whole = (photos / "square" / "square00_v1.png").read_bytes()
    open(cut, "wb").write(whole[:len(whole) // 2])
    ddir = str(tmp_path / "ddir")
    group = r"^(.*)_v\d+\.png$"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "own_data.py"), ddir, "--images", str(photos),
                        "--group", group, "--size", "32", "--pca_dim", "8", "--seed", "2"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    meta = json.load(open(os.path.join(ddir, "own_data.json")))
    # the --group expression: searched in the name without its extension, so it matches none
    assert ("WARNING: group %r matches no file name: it is searched (re.search) in the name without its "
            "extension" % group) in out and "leave the extension out" in out
    assert any(w.startswith("group %r matches no file name" % group) for w in meta["warnings"])
    # the classes left out, each with its reason, and out of label_names
    assert "WARNING: class 'empty' left out: empty: no image" in out
    assert "WARNING: class 'single' left out: 1 image" in out
    assert {d["name"]: d["reason"].split(":")[0] for d in meta["dropped"]} == {"empty": "empty", "single": "1 image"}
    split = json.load(open(os.path.join(ddir, "label_idx.json")))
    assert split["label_names"] == sorted(SHAPES) == [c["name"] for c in meta["classes"]]
    assert sorted(sum((split[k] for k in ("base_classes_1", "novel_classes_1", "base_classes_2",
                                          "novel_classes_2")), [])) == list(range(1, 7))
    # the empty and the truncated .png: named, in no list and no feature row
    assert sorted(meta["unreadable"]) == [blank, cut]
    for path in (blank, cut):
        assert "WARNING: unreadable image %s (" % path in out
    import h5py
    f = data.feature_paths(ddir)
    for key, part in (("train", "train"), ("val", "test")):
        lst = json.load(open(os.path.join(ddir, "lists", part + ".json")))
        assert not {blank, cut} & set(lst["image_names"])
        assert {os.path.basename(os.path.dirname(n)) for n in lst["image_names"]} == set(SHAPES)
        with h5py.File(f[key], "r") as h:
            assert h["count"][0] == len(lst["image_names"]) and h["bad_images"].size == 0
    # 3 classes per split, and disc holding most of its split's test images
    for what in ("validation", "test"):
        assert "WARNING: the %s split has 3 classes (<= 5): top-5 accuracy is 100%%" % what in out
    disc = [c for c in meta["classes"] if c["name"] == "disc"][0]
    which = "validation" if disc["group"].endswith("_1") else "test"
    mates = [c for c in meta["classes"] if c["group"][-1] == disc["group"][-1]]
    ntest = sum(c["test"] for c in mates)
    assert disc["test"] / ntest > 0.67
    msg = "class 'disc' holds %d of the %d test images of the %s split" % (disc["test"], ntest, which)
    assert "WARNING: " + msg in out and any(w.startswith(msg) for w in meta["warnings"])
    # --help says what the expression is matched against
    h = subprocess.run([sys.executable, os.path.join(ROOT, "own_data.py"), "--help"], cwd=ROOT,
                       capture_output=True, text=True).stdout
    assert "searched (re.search) in each file name without its extension" in " ".join(h.split())


def test_unreadable_images_are_listed_by_save_features(tmp_path):
    """save_features.py on a list (--prepared lists, a list of one's own) with an empty and a truncated
    .png: their rows hold a black image's features, as the published layout keeps the row numbering;
    the log names them and OUTFILE.bad lists index, file and reason."""
    rs = np.random.RandomState(6)
    names = []
    for i in range(6):
        names.append(str(tmp_path / ("img%d.png" % i)))
        draw(SHAPES[i], rs, size=24).save(names[-1])
    whole = open(names[0], "rb").read()
    open(names[2], "wb").close()
    open(names[4], "wb").write(whole[:len(whole) // 2])
    json.dump({"image_names": names, "image_labels": list(range(6))}, open(str(tmp_path / "list.json"), "w"))
    yaml.safe_dump({"dataset": {"type": "image_list", "path": str(tmp_path / "list.json")},
                    "transform": {"scale": 32, "crop": 32},
                    "loader": {"batch_size": 4, "num_workers": 0, "threads": 1}}, open(str(tmp_path / "c.yaml"), "w"))
    out = str(tmp_path / "f.hdf5")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "save_features.py"), "--cfg", str(tmp_path / "c.yaml"),
                        "--model", "EfficientNetLite0", "--outfile", out], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l.split("\t") for l in open(out + ".bad").read().splitlines()]
    assert [(int(i), n) for i, n, _ in lines] == [(2, names[2]), (4, names[4])]
    assert "cannot identify image file" in lines[0][2] and "truncated" in lines[1][2]
    assert "WARNING: 2 unreadable images computed on a black image" in r.stdout
    assert "%s, %s" % (names[2], names[4]) in r.stdout
    import h5py
    with h5py.File(out, "r") as h:
        assert h["bad_images"][()].tolist() == [2, 4]


def default_sigint():
    """Ctrl-C as at a terminal: a suite started in the background (``pytest &`` in a script) runs with
    SIGINT ignored, which its children would inherit (and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_and_the_rerun_continues(tmp_path):
    """SIGINT in the middle of a feature extraction: exit status 130, no traceback, one line naming
    what was kept (the rows done, in the .partial file); the same command then finishes the file."""
    rs = np.random.RandomState(7)
    names = []
    for i in range(300):
        names.append(str(tmp_path / ("img%03d.png" % i)))
        draw(SHAPES[i % 6], rs, size=96).save(names[-1])
    json.dump({"image_names": names, "image_labels": [i % 6 for i in range(300)]},
              open(str(tmp_path / "list.json"), "w"))
    yaml.safe_dump({"dataset": {"type": "image_list", "path": str(tmp_path / "list.json")},
                    "transform": {"scale": 96, "crop": 96}, "block_size": 8,
                    "loader": {"batch_size": 8, "num_workers": 0, "threads": 1}}, open(str(tmp_path / "c.yaml"), "w"))
    out = str(tmp_path / "f.hdf5")
    cmd = [sys.executable, os.path.join(ROOT, "save_features.py"), "--cfg", str(tmp_path / "c.yaml"),
           "--model", "EfficientNetLite0", "--outfile", out]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)
    for line in p.stdout:
        if "extracting 300 images" in line:
            p.send_signal(signal.SIGINT)
            break
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    said = [l for l in stderr.replace("\r", "\n").splitlines() if "interrupted" in l]
    assert len(said) == 1 and said[0].startswith("interrupted (Ctrl-C): kept the ")
    assert ("of 300 rows done, in %s.partial; the same command again continues from there" % out) in said[0]
    assert os.path.isfile(out + ".partial") and not os.path.exists(out)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming %s.partial" % out in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert data.feature_shape(out) == (300, 1280)
    # Ctrl-C in a terminal reaches the whole process group: own_data.py and its step say one line
    make_folders(str(tmp_path / "own"))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "own_data.py"), str(tmp_path / "own" / "dd"), "--images",
                          str(tmp_path / "own" / "photos"), "--size", "32", "--pca_dim", "8"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=default_sigint)
    for line in p.stdout:
        if "running: save_features" in line:
            os.killpg(p.pid, signal.SIGINT)
            break
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert [l for l in stderr.replace("\r", "\n").splitlines() if l.strip()] == [
        "interrupted (Ctrl-C): kept every output completed so far (each is written whole under its final name, or "
        "not at all); the same command again continues from there"]


def test_precomputed_features(tmp_path, capsys):
    """--features/--labels/--background instead of images: the rows go to the published layout with
    the same split rules, and diffusion.py runs on the result."""
    import diffusion
    rs = np.random.RandomState(2)
    centres = 4 * rs.randn(8, 24)
    labels = np.repeat(np.arange(8), 9)
    X = (centres[labels] + rs.randn(len(labels), 24)).astype(np.float32)
    B = (centres[rs.randint(8, size=80)] + rs.randn(80, 24)).astype(np.float32)
    groups = np.arange(len(labels)) // 3                 # rows in threes
    for name, a in (("X", X), ("y", labels), ("B", B), ("g", groups)):
        np.save(str(tmp_path / (name + ".npy")), a)
    ddir = str(tmp_path / "ddir")
    cmd = [sys.executable, os.path.join(ROOT, "own_data.py"), ddir, "--features", str(tmp_path / "X.npy"),
           "--labels", str(tmp_path / "y.npy"), "--background", str(tmp_path / "B.npy"),
           "--groups", str(tmp_path / "g.npy"), "--pca_dim", "8"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    split = json.load(open(os.path.join(ddir, "label_idx.json")))
    yte, rows_te = data.load_labels(data.feature_paths(ddir)["val"], data.load_split(
        os.path.join(ddir, "label_idx.json"), "test"))
    assert len(split["base_classes_2"]) + len(split["novel_classes_2"]) == len(np.unique(yte))
    # the test rows are whole groups of three rows of X
    import h5py
    with h5py.File(data.feature_paths(ddir)["val"], "r") as h:
        te = np.asarray(h["all_feats"])
    hit = [int(np.flatnonzero((X == row).all(1))[0]) for row in te]
    assert sorted(set(hit)) == sorted(hit)
    assert all(set(range(3 * (i // 3), 3 * (i // 3) + 3)) <= set(hit) for i in hit)
    capsys.readouterr()
    diffusion.main(["--ddir", ddir, "--mode", "test", "--nlabeled", "1", "--seed", "1", "--nbg", "80",
                    "--k", "10", "--niter", "2"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["graph"]["nodes"] > 80 and 0 < res["top5"] <= 1
    # both inputs, or labels of another length: one-line errors
    r = subprocess.run(cmd + ["--images", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "give --images (a folder of class folders) or --features" in r.stderr
    np.save(str(tmp_path / "y.npy"), labels[:-1])
    r = subprocess.run(cmd[:2] + [str(tmp_path / "other")] + cmd[3:], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "one class per row of --features (72 rows)" in r.stderr


def test_metric_top5_from_ten_test_classes(tmp_path):
    """own_data.py writes metric: top5 (the paper's) when the test split has 10 classes or more, and
    keeps a template's own metric."""
    rs = np.random.RandomState(3)
    labels = np.repeat(np.arange(20), 6)
    np.save(str(tmp_path / "X.npy"), rs.randn(len(labels), 12).astype(np.float32))
    np.save(str(tmp_path / "y.npy"), labels)
    (tmp_path / "t.yaml").write_text("metric: top1_novel\nseeds: [1]\n")
    for ddir, extra, want, said in (
            ("dd", [], "top5", "the test split has 10 classes: phase 2 chooses on top-5 accuracy, as the paper"),
            ("dt", ["--phases_template", "t.yaml"], "top1_novel",
             "the test split has 10 classes; metric: top1_novel, as the template sets it")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "own_data.py"), ddir, "--features", "X.npy",
                            "--labels", "y.npy", "--pca_dim", "8"] + extra, cwd=str(tmp_path),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert len(data.load_split(str(tmp_path / ddir / "label_idx.json"), "test").classes) == 10
        assert said in r.stdout
        assert yaml.safe_load((tmp_path / ddir / "phases.yaml").read_text())["metric"] == want


def test_phases_template_relative_paths_and_errors(tmp_path):
    """--phases_template: 'all' becomes the background size, the other keys are kept; relative paths
    work from any folder; a missing, broken or wrong template is a one-line error naming it."""
    rs = np.random.RandomState(4)
    labels = np.repeat(np.arange(8), 10)
    np.save(str(tmp_path / "X.npy"), rs.randn(80, 16).astype(np.float32))
    np.save(str(tmp_path / "y.npy"), labels)
    np.save(str(tmp_path / "B.npy"), rs.randn(50, 16).astype(np.float32))
    (tmp_path / "t.yaml").write_text("seeds: [1, 2]\nnlabeled: [1]\ndiffusion: {nbg: [0, all], k: 5}\n"
                                     "fusion: {nbg: [all]}\n")
    (tmp_path / "key.yaml").write_text("diffusion: {nbgs: [all]}\n")
    (tmp_path / "big.yaml").write_text("diffusion: {nbg: [51]}\n")
    (tmp_path / "broken.yaml").write_text("a: [1\n")

    def own(ddir, template):
        return subprocess.run([sys.executable, os.path.join(ROOT, "own_data.py"), ddir, "--features", "X.npy",
                               "--labels", "y.npy", "--background", "B.npy", "--pca_dim", "8",
                               "--phases_template", template], cwd=str(tmp_path), capture_output=True, text=True)

    r = own("dd", "t.yaml")                                   # relative to the caller's folder
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "dd" / "phases.yaml").read_text())
    assert cfg["diffusion"]["nbg"] == [0, 50] and cfg["fusion"]["nbg"] == [50] and cfg["seeds"] == [1, 2]
    assert cfg["ddir"] == str(tmp_path / "dd") and cfg["split"] == str(tmp_path / "dd" / "label_idx.json")
    for template, msg in (("none.yaml", "phases template %s: No such file or directory"),
                          ("broken.yaml", "phases template %s is not valid yaml"),
                          ("key.yaml", "%s: unknown key 'nbgs' in diffusion"),
                          ("big.yaml", "phases template %s: diffusion.nbg [51]: sizes must be 'all' or 0..50")):
        r = own("dd_" + template, template)
        assert r.returncode == 2 and (msg % (tmp_path / template)) in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_phases_from_template_edge_cases(tmp_path):
    """No unlabelled images: [0, all] is one size; a null section gets the defaults; a list section
    is refused; a cap below --min_novel_train is refused before any draw."""
    t = tmp_path / "t.yaml"
    t.write_text("diffusion:\nfusion: {nbg: [all]}\n")
    cfg = owndata.phases_from_template(str(tmp_path), 0, str(t))
    assert cfg["diffusion"]["nbg"] == [0] and cfg["fusion"]["nbg"] == [0]
    t.write_text("diffusion: {nbg: [0, all, 7]}\n")
    assert owndata.phases_from_template(str(tmp_path), 7, str(t))["diffusion"]["nbg"] == [0, 7]
    t.write_text("diffusion: [1, 2]\n")
    with pytest.raises(InputError, match="diffusion must be a mapping"):
        owndata.phases_from_template(str(tmp_path), 7, str(t))
    classes = [("c%d" % c, ["/x/c%d/%d.png" % (c, i) for i in range(10)]) for c in range(6)]
    with pytest.raises(InputError, match="max_train_per_class 3 is below min_novel_train 5"):
        owndata.make_split(classes, max_train_per_class=3, min_novel_train=5)


def test_threads_reach_the_feature_extraction_config(tmp_path, monkeypatch):
    import own_data
    import save_features
    from lowshot import features
    ddir = tmp_path / "d"
    os.makedirs(ddir / "lists")
    with open(ddir / "lists" / "background.json", "w") as f:
        json.dump({"image_names": [], "image_labels": []}, f)
    commands = []

    class Stop(Exception):
        pass

    def run(cmd):
        commands.append(cmd)
        raise Stop         # the first step is enough
    monkeypatch.setattr(own_data, "run", run)
    with pytest.raises(Stop):
        own_data.main([str(ddir), "--prepared", "--threads", "3"])
    with open(ddir / "features.yaml") as f:
        assert yaml.safe_load(f)["loader"]["threads"] == 3
    cmd = commands[-1]
    assert cmd[0] == "save_features.py" and cmd[cmd.index("--threads") + 1] == "3"
    # save_features.py --threads overrides the config's loader.threads (also a config given by --features_cfg)
    seen = {}
    monkeypatch.setattr(features, "extract_features", lambda cfg, *a, **k: seen.update(cfg) or {})
    save_features.main(cmd[1:cmd.index("--threads")] + ["--threads", "5"] + cmd[cmd.index("--threads") + 2:])
    assert seen["loader"]["threads"] == 5
    save_features.main(cmd[1:cmd.index("--threads")] + cmd[cmd.index("--threads") + 2:])
    assert seen["loader"]["threads"] == 3
    # without the flag: torch's default (0) in the config written, no flag passed on
    os.remove(ddir / "features.yaml")
    with pytest.raises(Stop):
        own_data.main([str(ddir), "--prepared"])
    with open(ddir / "features.yaml") as f:
        assert yaml.safe_load(f)["loader"]["threads"] == 0
    assert "--threads" not in commands[-1]
