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

The demo is one use of own_data.py: :func:`prepare` lays the chosen emoji out as class folders of
symbolic links named ``<emoji>__<vendor>__<file>`` (and a folder of unlabelled background emoji),
and run_demo.bash runs ``own_data.py --group '^(.+?)__'`` on them, which draws the split (by emoji
identity), computes the features, the PCA, the graph and the phases config. Layout under the demo's
data root::

    npm/emoji-datasource-{google,twitter}-16.0.0.tgz   what `npm pack` fetched
    npm/{google,twitter}/emoji.json, npm/{vendor}/img/{vendor}/64/*.png   extracted from them
    images/<subcategory>/*.png, unlabelled/*.png   links to them (own_data.py's input)
    demo_meta.json             what prepare chose (classes, background images, seed)
    label_idx.json, lists/, own_data.json, features/, knngraph/, phases.yaml   own_data.py's output

Nothing here reads the environment or touches files at import time.

Over 400 lines: the npm fetch, the choice of classes and the table of the demo (its plot and the
summary are lowshot/report.py's, shared with the phases).
"""
import collections
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np

from lowshot.common import InputError, atomic_output, logger, write_json

log = logger(__name__)

VENDORS = ("google", "twitter")
NPM_VERSION = "16.0.0"
MIN_EMOJI = 10
EXCLUDED_SUBCATEGORIES = ("country-flag",)


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


def choose(emoji, seed=0, nclass=None, max_background=None, min_emoji=MIN_EMOJI):
    """The demo's classes and background images (the split itself is own_data.py's).

    One ``np.random.RandomState(seed)``: a permutation of the eligible classes, of which the first
    ``nclass`` are used (all by default; for scaled-down runs), then, when capped, a permutation of
    the background images (the first ``max_background`` kept, in their listed order).

    Returns
    -------
    dict
        ``classes``: class name -> list of (emoji id, vendor, file name) of its images;
        ``background``: list of (vendor, file name) of the emoji of the other subcategories.
    """
    rs = np.random.RandomState(seed)
    names = eligible_classes(emoji, min_emoji)
    nclass = len(names) if nclass is None else nclass
    if not 4 <= nclass <= len(names):
        raise InputError("nclass=%d: must be between 4 and the %d eligible classes" % (nclass, len(names)))
    chosen = set(names[i] for i in rs.permutation(len(names))[:nclass])
    classes = {n: [] for n in sorted(chosen)}
    background = []
    for e in emoji:
        if e["subcategory"] in chosen:
            classes[e["subcategory"]].extend((e["unified"], v, n) for v, n in e["images"])
        elif e["subcategory"] not in names:
            background.extend(e["images"])
    if max_background is not None and len(background) > max_background:
        keep = np.sort(rs.permutation(len(background))[:max_background])
        background = [background[i] for i in keep]
    return {"classes": classes, "background": background}


def image_relpath(vendor, name):
    """Path, relative to the data root, of one fetched image."""
    return os.path.join("npm", vendor, "img", vendor, "64", name)


# own_data.py's --group for the class folders that prepare() writes: the emoji before "__"
GROUP_REGEX = r"^(.+?)__"


def prepare(ddir, seed=0, **choose_kw):
    """Lay out the chosen emoji as own_data.py's input, symbolic links to the fetched images::

        DDIR/images/<subcategory>/<emoji>__<vendor>__<file>.png   one folder per class
        DDIR/unlabelled/<vendor>__<file>.png                       the out-of-domain background
        DDIR/demo_meta.json                                        what was chosen

    ``own_data.py DDIR --images DDIR/images --unlabelled DDIR/unlabelled --group '^(.+?)__'`` then
    splits by emoji identity. Folders are written under temporary names and renamed.

    Returns
    -------
    dict
        Summary: numbers of classes and background images, the seed.
    """
    ch = choose(load_emoji(ddir), seed=seed, **choose_kw)
    links = {"images": [(os.path.join(c, "%s__%s__%s" % (u, v, n)), (v, n))
                        for c, imgs in ch["classes"].items() for u, v, n in imgs],
             "unlabelled": [("%s__%s" % (v, n), (v, n)) for v, n in ch["background"]]}
    for folder, items in links.items():
        final = os.path.join(ddir, folder)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for rel, (v, n) in items:
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(os.path.relpath(os.path.join(ddir, image_relpath(v, n)), os.path.dirname(path)), path)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    summary = {"nclass": len(ch["classes"]), "nimages": len(links["images"]),
               "nbackground": len(ch["background"]), "seed": seed}
    write_json(os.path.join(ddir, "demo_meta.json"), summary)
    return summary


def chance_level(nclass, k=5):
    """Top-k accuracy of random scores over ``nclass`` classes, in percent."""
    return 100.0 * min(k, nclass) / nclass


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
    summary as ``run_diffusion.bash 4``: mean and std over seeds of the test top-5, then top-1, in
    percent) and the chosen parameters ``chosen_{logreg,diffusion,fusion}.yaml``.

    Returns
    -------
    dict
        ``columns``: the phases summary (list of {"label", "cells": {n: {...}}}), ``missing``:
        number of (column, n, seed) results absent, ``chance``: {"top5": chance level in percent,
        "top1": ...}.
    """
    from lowshot import data, phase_config, phases, report

    meta = read_own_data(ddir)
    config = os.path.join(ddir, "phases.yaml")
    if not os.path.isfile(config):
        raise InputError("%s does not exist: run run_demo.bash (own_data.py writes it)" % config)
    cfg = phase_config.load_config(config)
    ph = phases.Phases(cfg)
    summary = report.summarize(ph.result_columns("diffusion"), cfg["nlabeled"])
    nseeds = len(cfg["seeds"])
    missing = sum(nseeds - cell["nseeds"] for col in summary for cell in col["cells"].values())
    if all(cell["nseeds"] == 0 for col in summary for cell in col["cells"].values()):
        raise InputError("no test result under %s: run the phases first (run_demo.bash)" % ph.rundir)
    split = data.load_split(cfg["split"], "test")
    ks = report.table_ks()
    chance = {k: chance_level(split.nclass, k) for k in ks}
    chosen = {}
    for exp in ("logreg", "diffusion", "fusion"):
        if os.path.isfile(ph.chosen_path(exp)):
            chosen[exp] = ph.read_chosen(exp, "")
    seeds = ", ".join(map(str, cfg["seeds"]))
    lines = ["# %s: low-shot top-%s accuracy on real emoji images" % (title, " and top-".join(map(str, ks))), ""]
    lines += _intro_lines(meta, split, seeds, chance)
    lines += _metric_tables(summary, cfg["nlabeled"], nseeds, chance)
    if missing:
        lines += ["(k/%d): only k seeds have a result; %d results missing." % (nseeds, missing), ""]
    lines += _chosen_lines(chosen, cfg["nlabeled"], cfg["metric"])
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
    return {"columns": summary, "missing": missing, "chance": {"top%d" % k: v for k, v in chance.items()},
            "out": out_md, "png": out_png}


def read_own_data(ddir):
    """``ddir/own_data.json``: the split own_data.py drew (InputError when missing)."""
    path = os.path.join(ddir, "own_data.json")
    if not os.path.isfile(path):
        raise InputError("%s does not exist: run run_demo.bash (own_data.py writes it)" % path)
    with open(path) as f:
        return json.load(f)


def _count_split_rows(meta, split, side):
    ids = set(int(c) + 1 for c in split.classes)
    return sum(c[side] for c in meta["classes"] if c["id"] in ids)


def _intro_lines(meta, split, seeds, chance):
    """The paragraphs above the tables: the split, the features, the metrics and chance levels (per k
    of ``chance``, top-5 first), the columns."""
    ks = list(chance)
    nnovel = int(split.is_novel.sum())
    return [
        "Test split: %d classes (%d base, %d novel), %d test images; %d training images, %d "
        "out-of-domain background images. Features: EfficientNet-Lite0 (ImageNet weights), "
        "1280-d for logreg, PCA-R256 for diffusion. n = labelled training images per novel class "
        "(base classes: all their training images). Top-%d accuracy (%%)%s, mean ± std over seeds %s. "
        "**Chance level: %.1f%%** (%d of %d classes%s)." % (
            split.nclass, split.nclass - nnovel, nnovel, _count_split_rows(meta, split, "test"),
            _count_split_rows(meta, split, "train"), meta["nbackground"], ks[0],
            "".join(", then top-%d" % k for k in ks[1:]), seeds, chance[ks[0]], min(ks[0], split.nclass),
            split.nclass, "".join("; top-%d: %.1f%%" % (k, chance[k]) for k in ks[1:])), "",
        "Columns: `logreg` logistic regression; `diffusion none` diffusion over labelled and test "
        "images only; `diffusion F%d` + the out-of-domain emoji background; `in-domain` + the "
        "novel classes' unlabelled training images; `combined` late fusion of logreg and diffusion "
        "(weight chosen on validation)." % meta["nbackground"], ""]


def _metric_tables(summary, nlabeled, nseeds, chance):
    """Markdown lines: per k of ``chance`` (top-5 first), the all-classes and novel-classes tables;
    titles ``**All test classes**`` for the first k, ``**All test classes, top-1**`` for the others."""
    from lowshot import report
    lines = []
    for i, k in enumerate(chance):
        for suffix, what in (("", "All test classes"), ("_novel", "Novel classes")):
            lines += ["**%s%s** (chance %.1f%%)" % (what, ", top-%d" % k if i else "", chance[k]), "",
                      report.markdown_table(summary, nlabeled, "top%d%s" % (k, suffix), nseeds)]
        note = report.unrecorded_note(summary, "top%d" % k)
        lines += [note, ""] if note else []
    return lines


def _chosen_lines(chosen, nlabeled, metric):
    """Markdown lines listing the parameters validation chose, per n, and the metric it maximised."""
    from lowshot import report
    if not chosen:
        return []
    out = ["Chosen on the validation split (phase 2, by the mean %s):" % report.metric_phrase(metric), ""]
    for n in nlabeled:
        parts = []
        lr = (chosen.get("logreg") or {}).get(n)
        if lr:
            parts.append("logreg lr %g wd %g batch %d, %d iterations" % (
                lr["lr"], lr["wd"], lr["batchsize"], lr["maxiter"]))
        dif = (chosen.get("diffusion") or {}).get(n) or {}
        its = ["%s: %s%d" % (v, "%s " % p["method"] if "method" in p else "", p["niter"])
               for v, p in sorted(dif.items())]
        if its:
            parts.append("diffusion iterations " + ", ".join(its))
        fus = (chosen.get("fusion") or {}).get(n) or {}
        ws = ["%s: %g" % (v, p["weight"] if isinstance(p, dict) else p) for v, p in sorted(fus.items())]
        if ws:
            parts.append("fusion weight of diffusion " + ", ".join(ws))
        if parts:
            out.append("- n = %d: %s" % (n, "; ".join(parts)))
    return out + [""]
