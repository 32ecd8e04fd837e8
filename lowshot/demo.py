"""The emoji demo: a small, real low-shot benchmark laid out as the paper's ``$DDIR``.

Images come from the npm packages ``emoji-datasource-google`` and ``emoji-datasource-twitter``
(64x64 PNGs of the Google Noto and Twitter Twemoji drawings, metadata in ``emoji.json``). A class is a
Unicode subcategory ("animal-bird", "food-fruit", ...) with at least ``MIN_EMOJI`` distinct emoji;
``country-flag`` is left out (flags are one class of near-identical rectangles). An image is one
drawing of one emoji: both vendors, and every skin-tone variant present as a file.

The two vendors' drawings and the skin-tone variants of one emoji are near-duplicates, so the data
are split by emoji identity (``unified``), never by image: all images of one emoji are either
training or test images. Emoji of the other subcategories (and of the country flags) form the
out-of-domain background, the stand-in for the paper's YFCC100M images.

Layout written under the demo's data root (the same names the experiment scripts read)::

    npm/emoji-datasource-{google,twitter}-16.0.0.tgz   what `npm pack` fetched
    npm/{google,twitter}/emoji.json, npm/{vendor}/img/{vendor}/64/*.png   extracted from them
    lists/{train,test,background}.json   {"image_names": [paths relative to the data root],
                               "image_labels": [0-based class id, -1 for background]}
                               (save_features.py composites the transparent PNGs on white)
    label_idx.json             class split in the form of the repository's data/label_idx.json
    demo_meta.json             per class: name, split group, number of emoji and images per side

Class split (``label_idx.json``, 1-based ids, four disjoint groups as in the paper: validation
base + novel, test base + novel) of 15/14/14/14 of the 57 classes. Novel classes are drawn among
the classes with at least 20 training images (n = 20 labelled images must exist), base classes
among the others and the leftovers; see :func:`make_split` for the exact draws.

Nothing here reads the environment or touches files at import time.

Over 400 lines: the npm fetch, the split, the config and the table of the demo (its plot and the
summary are lowshot/report.py's, shared with the phases).
"""
import collections
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np

from lowshot.common import InputError, atomic_output, log, write_json

VENDORS = ("google", "twitter")
NPM_VERSION = "16.0.0"
MIN_EMOJI = 10
EXCLUDED_SUBCATEGORIES = ("country-flag",)
# Class groups in the order val-base, val-novel, test-base, test-novel, of equal sizes. (The paper
# has ~39% base classes; here novel classes need >= 20 training images, which only 41 of the 57
# classes have, and equal groups leave the base groups a mix of small and large classes.)
GROUP_NAMES = ("base_classes_1", "novel_classes_1", "base_classes_2", "novel_classes_2")
GROUP_WEIGHTS = (1, 1, 1, 1)
# Fraction of each class's emoji (not images) that become test emoji.
TEST_FRACTION = 0.4
# The largest n of the protocol: a novel class needs that many training images.
MIN_NOVEL_TRAIN = 20
# The person-* classes have up to 52 skin-tone images per emoji; capping the test images per class
# keeps the all-classes accuracy from being an accuracy on 5 of the 57 classes (ImageNet's test set,
# 50 images per class, is balanced too).
MAX_TEST_PER_CLASS = 30


def package_name(vendor):
    """npm package name of one vendor's images."""
    return "emoji-datasource-%s" % vendor


def npm_paths(ddir):
    """Paths of the fetched npm material under the data root ``ddir``.

    Returns
    -------
    dict
        ``dir``: ``ddir/npm``; per vendor ``v``: ``tgz_v`` (the tarball), ``json_v`` (emoji.json) and
        ``img_v`` (the folder of 64x64 PNGs).
    """
    d = os.path.join(ddir, "npm")
    out = {"dir": d}
    for v in VENDORS:
        out["tgz_" + v] = os.path.join(d, "%s-%s.tgz" % (package_name(v), NPM_VERSION))
        out["json_" + v] = os.path.join(d, v, "emoji.json")
        out["img_" + v] = os.path.join(d, v, "img", v, "64")
    return out


def fetch_hint(ddir):
    """How to get the emoji images by hand, for error messages."""
    pk = " ".join("%s@%s" % (package_name(v), NPM_VERSION) for v in VENDORS)
    return ("install npm (Debian/Ubuntu: apt-get install npm; or Node.js from nodejs.org) and re-run, "
            "or fetch the tarballs elsewhere with `npm pack %s` and copy them into %s"
            % (pk, npm_paths(ddir)["dir"]))


def _extract(tgz, vendor, dest):
    """Extract emoji.json, LICENSE, README.md and img/<vendor>/64/ from an npm tarball into ``dest``."""
    prefix_img = "package/img/%s/64/" % vendor
    keep = ("package/emoji.json", "package/LICENSE", "package/README.md")
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            members = [m for m in tf.getmembers()
                       if m.isfile() and (m.name in keep or m.name.startswith(prefix_img))]
            if not any(m.name == "package/emoji.json" for m in members):
                raise InputError("%s has no package/emoji.json: not an emoji-datasource tarball; "
                                 "delete it and re-run" % tgz)
            if not any(m.name.startswith(prefix_img) for m in members):
                raise InputError("%s has no %s*.png: wrong package or version; delete it and re-run"
                                 % (tgz, prefix_img))
            for m in members:
                m.name = m.name[len("package/"):]
            tf.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError("%s is not a readable npm tarball (%s); delete it and re-run" % (tgz, e))
    os.replace(tmp, dest)


def fetch(ddir, npm="npm"):
    """Fetch both vendors' tarballs with ``npm pack`` (skipped when present) and extract them.

    Parameters
    ----------
    ddir : str
        Data root; tarballs go to ``ddir/npm``.
    npm : str
        The npm executable.

    Raises
    ------
    InputError
        When npm is missing or fails, with a message saying how to get the tarballs by hand.
    """
    p = npm_paths(ddir)
    os.makedirs(p["dir"], exist_ok=True)
    missing = [v for v in VENDORS if not os.path.isfile(p["tgz_" + v])]
    if missing:
        exe = shutil.which(npm)
        if exe is None:
            raise InputError("the demo's emoji images are not in %s and `%s` is not installed: %s"
                             % (p["dir"], npm, fetch_hint(ddir)))
        specs = ["%s@%s" % (package_name(v), NPM_VERSION) for v in missing]
        log("fetching %s with npm pack into %s" % (" ".join(specs), p["dir"]))
        tmp = os.path.join(p["dir"], ".pack.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        r = subprocess.run([exe, "pack", "--silent", "--pack-destination", tmp] + specs,
                           capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError("`npm pack %s` failed (exit %d: %s): check access to the npm registry, "
                             "or %s" % (" ".join(specs), r.returncode,
                                        (r.stderr.strip().splitlines() or ["no message"])[-1],
                                        fetch_hint(ddir)))
        for v in missing:
            src = os.path.join(tmp, os.path.basename(p["tgz_" + v]))
            if not os.path.isfile(src):
                raise InputError("npm pack did not produce %s; %s" % (src, fetch_hint(ddir)))
            os.replace(src, p["tgz_" + v])
        shutil.rmtree(tmp, ignore_errors=True)
    for v in VENDORS:
        if not os.path.isfile(p["json_" + v]) or not os.path.isdir(p["img_" + v]):
            log("extracting emoji.json and img/%s/64 from %s" % (v, p["tgz_" + v]))
            _extract(p["tgz_" + v], v, os.path.join(p["dir"], v))
    check_fetched(ddir)


def check_fetched(ddir):
    """Raise InputError (saying what is missing and how to get it) unless the npm material is there."""
    p = npm_paths(ddir)
    for v in VENDORS:
        if not os.path.isfile(p["json_" + v]):
            raise InputError("%s is missing: run `python demo.py fetch --ddir %s` (needs npm), or %s"
                             % (p["json_" + v], ddir, fetch_hint(ddir)))
        if not os.path.isdir(p["img_" + v]) or not os.listdir(p["img_" + v]):
            raise InputError("%s has no images: run `python demo.py fetch --ddir %s` (needs npm), or %s"
                             % (p["img_" + v], ddir, fetch_hint(ddir)))


def load_emoji(ddir):
    """The emoji of emoji.json with the images present as files.

    Returns
    -------
    list of dict
        One per emoji (in emoji.json order): ``unified`` (str), ``name``, ``subcategory``,
        ``images``: list of (vendor, file name) for every vendor and skin-tone variant whose PNG
        exists; emoji without any image are dropped.
    """
    check_fetched(ddir)
    p = npm_paths(ddir)
    with open(p["json_" + VENDORS[0]]) as f:
        entries = json.load(f)
    present = {v: set(os.listdir(p["img_" + v])) for v in VENDORS}
    out = []
    for e in entries:
        try:
            names = [e["image"]] + [s["image"] for s in (e.get("skin_variations") or {}).values()]
            row = {"unified": e["unified"], "name": e.get("name") or e.get("short_name") or "",
                   "subcategory": e["subcategory"]}
        except (KeyError, TypeError) as err:
            raise InputError("%s: entry without field %s" % (p["json_" + VENDORS[0]], err))
        row["images"] = [(v, n) for v in VENDORS for n in names if n in present[v]]
        if row["images"]:
            out.append(row)
    if not out:
        raise InputError("no image listed in %s exists under %s" % (p["json_" + VENDORS[0]], p["dir"]))
    return out


def eligible_classes(emoji, min_emoji=MIN_EMOJI, excluded=EXCLUDED_SUBCATEGORIES):
    """Subcategories with at least ``min_emoji`` distinct emoji, ``excluded`` left out, sorted by name."""
    counts = collections.Counter(e["subcategory"] for e in emoji)
    return sorted(s for s, c in counts.items() if c >= min_emoji and s not in excluded)


def group_sizes(nclass):
    """Split ``nclass`` classes into (val-base, val-novel, test-base, test-novel) sizes.

    Proportional to ``GROUP_WEIGHTS`` (largest remainders, ties to the first group), each at least 1.
    """
    if nclass < 4:
        raise InputError("the demo needs at least 4 classes (one per split group), got %d" % nclass)
    w = np.array(GROUP_WEIGHTS, dtype=float)
    exact = w / w.sum() * nclass
    sizes = np.maximum(np.floor(exact).astype(int), 1)
    while sizes.sum() < nclass:
        sizes[np.argmax(exact - sizes)] += 1
    while sizes.sum() > nclass:
        sizes[np.argmax(np.where(sizes > 1, sizes - exact, -np.inf))] -= 1
    return [int(s) for s in sizes]


def _round_robin(groups):
    """Interleave lists: first element of each, then the second of each, ..."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def make_split(emoji, seed=0, nclass=None, sizes=None, test_fraction=TEST_FRACTION,
               max_test_per_class=MAX_TEST_PER_CLASS, max_train_per_class=None,
               max_background=None, min_novel_train=MIN_NOVEL_TRAIN, min_emoji=MIN_EMOJI):
    """Choose the classes, split every class's emoji into training and test emoji, then the groups.

    One ``np.random.RandomState(seed)`` drives everything, in this order:

    1. a permutation of the eligible classes, of which the first ``nclass`` are used (all by
       default); classes get ids in name order;
    2. class by class in id order, a permutation of its ``m`` emoji (the first
       ``max(1, round(test_fraction * m))`` are test emoji, the others training emoji) and one
       permutation per emoji of its images; test (training) images are taken round-robin over the
       test (training) emoji, up to ``max_test_per_class`` (``max_train_per_class``);
    3. a permutation of the classes having at least ``min_novel_train`` training images: its first
       classes are the validation novel classes, the next ones the test novel classes (the largest
       n of the protocol needs that many labelled images per novel class);
    4. a permutation of the other classes: validation base classes, then test base classes;
    5. when capped, a permutation of the background images (the first ``max_background`` kept).

    Parameters
    ----------
    emoji : list of dict
        From :func:`load_emoji`.
    seed : int
    nclass : int or None
        Use only this many classes (None: all eligible ones); for scaled-down runs.
    sizes : sequence of 4 int or None
        Group sizes, order val-base, val-novel, test-base, test-novel (None: :func:`group_sizes`).
    test_fraction : float
    max_test_per_class, max_train_per_class, max_background : int or None
        Caps (None: no cap).
    min_novel_train : int
        Training images a novel class needs.
    min_emoji : int
        Distinct emoji a subcategory needs to be a class.

    Returns
    -------
    dict
        ``label_names`` (class names sorted, class id = position), ``groups`` (group name ->
        sorted 1-based class ids), ``train``/``test``/``background``: lists of (vendor, file name,
        0-based class id or -1), ``classes``: per-class statistics.
    """
    rs = np.random.RandomState(seed)
    names = eligible_classes(emoji, min_emoji)
    nclass = len(names) if nclass is None else nclass
    if not 4 <= nclass <= len(names):
        raise InputError("nclass=%d: must be between 4 and the %d eligible classes" % (nclass, len(names)))
    sizes = group_sizes(nclass) if sizes is None else [int(s) for s in sizes]
    if len(sizes) != 4 or min(sizes) < 1 or sum(sizes) != nclass:
        raise InputError("group sizes %s must be 4 positive numbers summing to %d" % (sizes, nclass))
    chosen = sorted(names[i] for i in rs.permutation(len(names))[:nclass])
    cid = {n: i for i, n in enumerate(chosen)}
    by_class = collections.defaultdict(list)
    background = []
    for e in emoji:
        if e["subcategory"] in cid:
            by_class[e["subcategory"]].append(e)
        elif e["subcategory"] not in names:
            background.extend((v, n, -1) for v, n in e["images"])
    train, test, stats = [], [], []
    for c, name in enumerate(chosen):
        es = by_class[name]
        ntest = max(1, int(round(test_fraction * len(es))))
        per_emoji = [[es[i]["images"][j] for j in rs.permutation(len(es[i]["images"]))]
                     for i in rs.permutation(len(es))]
        te = _round_robin(per_emoji[:ntest])[:max_test_per_class]
        tr = _round_robin(per_emoji[ntest:])[:max_train_per_class]
        test.extend((v, n, c) for v, n in te)
        train.extend((v, n, c) for v, n in tr)
        stats.append({"name": name, "id": c + 1, "emoji": len(es), "test_emoji": ntest,
                      "train_images": len(tr), "test_images": len(te)})
    big = np.array([c for c in range(nclass) if stats[c]["train_images"] >= min_novel_train])
    nnovel = sizes[1] + sizes[3]
    if big.size < nnovel:
        raise InputError("only %d classes have >= %d training images, %d novel classes are needed: "
                         "lower the largest n or the number of novel classes" % (
                             big.size, min_novel_train, nnovel))
    novel = big[rs.permutation(big.size)[:nnovel]]
    rest = np.setdiff1d(np.arange(nclass), novel)
    base = rest[rs.permutation(rest.size)]
    members = {GROUP_NAMES[0]: base[:sizes[0]], GROUP_NAMES[1]: novel[:sizes[1]],
               GROUP_NAMES[2]: base[sizes[0]:], GROUP_NAMES[3]: novel[sizes[1]:]}
    groups = {g: sorted(int(c) + 1 for c in members[g]) for g in GROUP_NAMES}
    for g in GROUP_NAMES:
        for c in groups[g]:
            stats[c - 1]["group"] = g
    if max_background is not None and len(background) > max_background:
        keep = np.sort(rs.permutation(len(background))[:max_background])
        background = [background[i] for i in keep]
    return {"label_names": chosen, "groups": groups, "train": train, "test": test,
            "background": background, "classes": stats}


def label_idx(split):
    """The split in the form of data/label_idx.json (1-based ids); ``base_classes`` = both base groups."""
    out = {"label_names": list(split["label_names"])}
    out.update({g: list(split["groups"][g]) for g in GROUP_NAMES})
    out["base_classes"] = sorted(out["base_classes_1"] + out["base_classes_2"])
    return out


def image_relpath(vendor, name):
    """Path, relative to the data root, of one fetched image."""
    return os.path.join("npm", vendor, "img", vendor, "64", name)


def prepare(ddir, seed=0, **split_kw):
    """Lay out the demo's data root: RGB images, image lists, label_idx.json and demo_meta.json.

    Parameters
    ----------
    ddir : str
        Data root holding ``npm/`` (see :func:`fetch`).
    seed : int
    **split_kw
        Passed to :func:`make_split` (scaled-down runs).

    Returns
    -------
    dict
        Summary: numbers of classes per group and of images per list.
    """
    emoji = load_emoji(ddir)
    split = make_split(emoji, seed=seed, **split_kw)
    for part in ("train", "test", "background"):
        write_json(os.path.join(ddir, "lists", part + ".json"),
                   {"image_names": [image_relpath(v, n) for v, n, _ in split[part]],
                    "image_labels": [int(c) for _, _, c in split[part]]})
    write_json(os.path.join(ddir, "label_idx.json"), label_idx(split))
    summary = {"nclass": len(split["label_names"]),
               "groups": {g: len(split["groups"][g]) for g in GROUP_NAMES},
               "ntrain": len(split["train"]), "ntest": len(split["test"]),
               "nbackground": len(split["background"]), "seed": seed}
    write_json(os.path.join(ddir, "demo_meta.json"), dict(summary, classes=split["classes"]))
    return summary


def phases_paths(ddir):
    """Where the demo keeps its phases config and runs: ``ddir/phases.yaml``, ``ddir/runs``."""
    return {"config": os.path.join(ddir, "phases.yaml"), "rundir": os.path.join(ddir, "runs")}


def read_meta(ddir):
    """``ddir/demo_meta.json`` as written by :func:`prepare` (InputError when missing)."""
    path = os.path.join(ddir, "demo_meta.json")
    if not os.path.isfile(path):
        raise InputError("%s does not exist: run `python demo.py prepare --ddir %s` first" % (path, ddir))
    with open(path) as f:
        return json.load(f)


def write_phases_config(ddir, template, out):
    """Write the phases config of the demo: ``template`` with its paths pointing into ``ddir``.

    ``ddir``, ``split`` (``ddir/label_idx.json``) and ``rundir`` (``ddir/runs``) are set to absolute
    paths; the background size ``all`` in ``diffusion.nbg`` / ``fusion.nbg`` becomes the number of
    background images that :func:`prepare` listed. The result is checked with
    :func:`lowshot.phase_config.load_config`.
    """
    import yaml

    from lowshot import phase_config

    nbg = int(read_meta(ddir)["nbackground"])
    try:
        with open(template) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError("phases config template %s: %s" % (template, e))
    ddir = os.path.abspath(ddir)
    cfg.update(ddir=ddir, split=os.path.join(ddir, "label_idx.json"),
               rundir=phases_paths(ddir)["rundir"])

    def fill(values):
        return values if values is None else [nbg if v == "all" else int(v) for v in values]

    cfg.setdefault("diffusion", {})
    cfg["diffusion"]["nbg"] = fill(cfg["diffusion"].get("nbg", ["all"]))
    if "fusion" in cfg:
        cfg["fusion"]["nbg"] = fill(cfg["fusion"].get("nbg"))
    if any(v > nbg for v in cfg["diffusion"]["nbg"]):
        raise InputError("%s: diffusion.nbg %s exceeds the %d background images of %s"
                         % (template, cfg["diffusion"]["nbg"], nbg, ddir))
    with atomic_output(out) as tmp:
        with open(tmp, "w") as f:
            f.write("# written by `python demo.py config` from %s\n" % template)
            yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None)
    phase_config.load_config(out)
    return cfg


def chance_top5(nclass):
    """Top-5 accuracy of random scores over ``nclass`` classes, in percent."""
    return 100.0 * min(5, nclass) / nclass


README_BEGIN = "<!-- demo-table:begin (copied from results/demo.md by run_demo.bash) -->"
README_END = "<!-- demo-table:end -->"


def copy_table_to_readme(table_md, readme):
    """Replace the text between the README's demo-table markers by the table file (its title dropped).

    The README then shows the table of the last ``run_demo.bash``, never numbers typed by hand.
    """
    with open(table_md) as f:
        body = f.read().split("\n", 1)[1].strip()
    with open(readme) as f:
        text = f.read()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise InputError("%s has no '%s' ... '%s' markers" % (readme, README_BEGIN, README_END))
    text = text[:i + len(README_BEGIN)] + "\n" + body + "\n" + text[j:]
    with atomic_output(readme) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_table(ddir, out_md, out_png, title="emoji demo"):
    """The demo's results: Markdown table (printed and written to ``out_md``) and plot ``out_png``.

    Reads the phases' run results under ``ddir/runs`` through :mod:`lowshot.phases` (the same
    summary as ``run_diffusion.bash 4``: mean and std over seeds of the test top-5, in percent) and
    the chosen parameters ``chosen_{logreg,diffusion,fusion}.yaml``.

    Returns
    -------
    dict
        ``columns``: the phases summary (list of {"label", "cells": {n: {...}}}), ``missing``:
        number of (column, n, seed) results absent, ``chance``: chance level in percent.
    """
    from lowshot import data, phase_config, phases, report

    meta = read_meta(ddir)
    paths = phases_paths(ddir)
    if not os.path.isfile(paths["config"]):
        raise InputError("%s does not exist: run `python demo.py config --ddir %s`" % (paths["config"], ddir))
    cfg = phase_config.load_config(paths["config"])
    ph = phases.Phases(cfg)
    summary = report.summarize(ph.result_columns("diffusion"), cfg["nlabeled"])
    nseeds = len(cfg["seeds"])
    missing = sum(nseeds - cell["nseeds"] for col in summary for cell in col["cells"].values())
    if all(cell["nseeds"] == 0 for col in summary for cell in col["cells"].values()):
        raise InputError("no test result under %s: run the phases first (run_demo.bash)" % ph.rundir)
    split = data.load_split(cfg["split"], "test")
    nnovel = int(split.is_novel.sum())
    chance = chance_top5(split.nclass)
    chosen = {}
    for exp in ("logreg", "diffusion", "fusion"):
        if os.path.isfile(ph.chosen_path(exp)):
            chosen[exp] = ph.read_chosen(exp, "")
    seeds = ", ".join(map(str, cfg["seeds"]))
    lines = [
        "# %s: low-shot top-5 accuracy on real emoji images" % title, "",
        "Test split: %d classes (%d base, %d novel), %d test images; %d training images, %d "
        "out-of-domain background images. Features: EfficientNet-Lite0 (ImageNet weights), "
        "1280-d for logreg, PCA-R256 for diffusion. n = labelled training images per novel class "
        "(base classes: all their training images). Top-5 accuracy (%%), mean ± std over seeds %s. "
        "**Chance level: %.1f%%** (5 of %d classes)." % (
            split.nclass, split.nclass - nnovel, nnovel, _count_split_rows(meta, split, "test"),
            _count_split_rows(meta, split, "train"), meta["nbackground"], seeds, chance,
            split.nclass), "",
        "Columns: `logreg` logistic regression; `diffusion none` diffusion over labelled and test "
        "images only; `diffusion F%d` + the out-of-domain emoji background; `in-domain` + the "
        "novel classes' unlabelled training images; `combined` late fusion of logreg and diffusion "
        "(weight chosen on validation)." % meta["nbackground"], ""]
    for metric, what in (("top5", "All test classes"), ("top5_novel", "Novel classes")):
        lines += ["**%s** (chance %.1f%%)" % (what, chance), "",
                  report.markdown_table(summary, cfg["nlabeled"], metric, nseeds)]
    if missing:
        lines += ["(k/%d): only k seeds have a result; %d results missing." % (nseeds, missing), ""]
    lines += _chosen_lines(chosen, cfg["nlabeled"])
    lines += ["Produced by `bash run_demo.bash` (`python demo.py table`); plot: %s." %
              os.path.basename(out_png), ""]
    md = "\n".join(lines)
    print(md, flush=True)
    with atomic_output(out_md) as tmp:
        with open(tmp, "w") as f:
            f.write(md)
    report.plot_results(summary, cfg["nlabeled"], out_png, "%s: test split, %d classes, seeds %s" % (
        title, split.nclass, seeds), chance=chance)
    log("wrote %s and %s" % (out_md, out_png))
    return {"columns": summary, "missing": missing, "chance": chance, "out": out_md, "png": out_png}


def _count_split_rows(meta, split, side):
    ids = set(int(c) + 1 for c in split.classes)
    return sum(c["%s_images" % side] for c in meta["classes"] if c["id"] in ids)


def _chosen_lines(chosen, nlabeled):
    """Markdown lines listing the parameters validation chose, per n."""
    if not chosen:
        return []
    out = ["Chosen on the validation split (phase 2):", ""]
    for n in nlabeled:
        parts = []
        lr = (chosen.get("logreg") or {}).get(n)
        if lr:
            parts.append("logreg lr %g wd %g batch %d, %d iterations" % (
                lr["lr"], lr["wd"], lr["batchsize"], lr["maxiter"]))
        dif = (chosen.get("diffusion") or {}).get(n) or {}
        its = ["%s: %d" % (v, p["niter"]) for v, p in sorted(dif.items())]
        if its:
            parts.append("diffusion iterations " + ", ".join(its))
        fus = (chosen.get("fusion") or {}).get(n) or {}
        ws = ["%s: %g" % (v, p["weight"] if isinstance(p, dict) else p) for v, p in sorted(fus.items())]
        if ws:
            parts.append("fusion weight of diffusion " + ", ".join(ws))
        if parts:
            out.append("- n = %d: %s" % (n, "; ".join(parts)))
    return out + [""]
