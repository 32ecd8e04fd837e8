"""Tables and plots of the phases' results (``run_*.bash 4``) and of the demo (``demo.py table``):
mean and std over seeds per (method, n), Markdown tables, PNG plots, the chosen parameters.

Every top-k of lowshot.evaluate.KS gets its tables and plots, the paper's top-5 first. Results
written before top-1 was recorded have only the top-5 keys: their top-1 cells read "n/a".
"""
import numpy as np

from lowshot import evaluate
from lowshot.common import atomic_output
from lowshot.phase_config import METRICS, bg_label, parse_variant

UNRECORDED = "n/a"


def table_ks():
    """The k of the tables and plots: 5 (the paper's metric, whose tables keep their place) first,
    then the others of lowshot.evaluate.KS in increasing order."""
    return sorted(evaluate.KS, key=lambda k: (k != 5, k))


def metric_phrase(metric):
    """``top5`` -> "top-5 accuracy over all classes", ``top1_novel`` -> "top-1 accuracy over the
    novel classes" (what validation maximised, in the tables)."""
    k, _, novel = metric[3:].partition("_")
    return "top-%s accuracy over %s" % (k, "the novel classes" if novel else "all classes")


def _val_accuracies(c):
    """``val top-5 66.80 ± 0.12 (novel 50.10 ± 0.30), top-1 ...`` for the k the choice has."""
    return ", ".join("top-%d %.2f ± %.2f (novel %.2f ± %.2f)" % (
        k, 100 * c["val_top%d" % k], 100 * c["val_top%d_std" % k], 100 * c["val_top%d_novel" % k],
        100 * c["val_top%d_novel_std" % k]) for k in table_ks() if "val_top%d" % k in c)


def format_choices(chosen):
    """One line per choice: ``n=2 F1M: niter 3  val top-5 66.80 ± 0.12 (novel 50.10 ± 0.30),
    top-1 40.20 ± 0.50 (novel 30.00 ± 1.00), 5 seeds``."""
    lines = []
    for n in sorted(chosen):
        entries = chosen[n].items() if "nseeds" not in chosen[n] else [(None, chosen[n])]
        def order(e):       # in-domain variants last, then by background size
            return (0, 0) if e[0] is None else parse_variant(e[0])[::-1]
        for vn, c in sorted(entries, key=order):
            if vn is not None:
                vn = bg_label(*parse_variant(vn))
            params = ", ".join("%s %s" % (k, c[k]) for k in ("lr", "wd", "batchsize", "maxiter",
                                                              "method", "niter", "weight") if k in c)
            lines.append("n=%d%s: %s  val %s, %d seeds" % (
                n, "" if vn is None else " " + vn, params, _val_accuracies(c), c["nseeds"]))
    return lines


def _final(res, metric):
    v = res[metric]
    return float(v[0] if isinstance(v, list) else v)


def _mean_std(got, metric):
    """Mean and std in percent of ``metric`` over the results ``got``; (None, None) when one of
    them lacks it (written before the metric was recorded)."""
    if not got or any(metric not in r for r in got):
        return None, None
    v = 100 * np.array([_final(r, metric) for r in got])
    return float(v.mean()), float(v.std())


def summarize(columns, nlabeled):
    """Mean and std (numpy, ddof=0) over the available seeds of each (column, n), in percent.

    Parameters
    ----------
    columns : list of (label, {n: [result dict or None per seed]})

    Returns
    -------
    list of {"label", "cells": {n: {"nseeds", "top5", "top5_std", "top5_novel", ...}}}: a metric
    is None where no seed has a result, or one of them lacks the metric (results written before
    top-1 was recorded).
    """
    out = []
    for label, cells in columns:
        col = {"label": label, "cells": {}}
        for n in nlabeled:
            got = [r for r in cells.get(n, []) if r is not None]
            cell = {"nseeds": len(got)}
            for m in METRICS:
                cell[m], cell[m + "_std"] = _mean_std(got, m)
            col["cells"][n] = cell
        out.append(col)
    return out


def markdown_table(summary, nlabeled, metric, nseeds):
    """Rows n, one column per method x background; ``mean ± std`` with 2 decimals, "–" where no
    seed has a result, "n/a" where the results do not hold ``metric`` (see :func:`unrecorded_note`)."""
    cols = [c for c in summary if any(cell["nseeds"] for cell in c["cells"].values())]
    lines = ["| n | " + " | ".join(c["label"] for c in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for n in nlabeled:
        row = []
        for c in cols:
            cell = c["cells"][n]
            if not cell["nseeds"]:
                row.append("–")
                continue
            if cell[metric] is None:
                row.append(UNRECORDED)
                continue
            s = "%.2f ± %.2f" % (cell[metric], cell[metric + "_std"])
            if cell["nseeds"] < nseeds:
                s += " (%d/%d)" % (cell["nseeds"], nseeds)
            row.append(s)
        lines.append("| %d | %s |" % (n, " | ".join(row)))
    return "\n".join(lines) + "\n"


def unrecorded_note(summary, metric):
    """The line explaining the "n/a" cells of ``metric``'s tables, or None when there are none."""
    if any(cell["nseeds"] and cell[metric] is None for c in summary for cell in c["cells"].values()):
        return ("%s: results written before %s was recorded (delete them and run phase 3 again to get "
                "it)." % (UNRECORDED, metric.split("_")[0].replace("top", "top-")))
    return None


# line style per method family: logreg solid, diffusion dashed, combined dotted (equal curves, e.g.
# combined with fusion weight 0 and logreg, stay visible)
_STYLES = {"logreg": ("-", "o"), "diffusion": ("--", "s"), "combined": (":", "^")}


def _plot_panel(ax, summary, nlabeled, metric):
    """One panel: ``metric`` vs n, a line with std error bars per column (the n it has)."""
    for c in summary:
        ns = [n for n in nlabeled if c["cells"][n]["nseeds"] and c["cells"][n][metric] is not None]
        if not ns:
            continue
        family = c["label"].split()[0]
        ls, marker = _STYLES.get(family, ("-", "o"))
        ax.errorbar(ns, [c["cells"][n][metric] for n in ns],
                    yerr=[c["cells"][n][metric + "_std"] for n in ns], ls=ls, marker=marker,
                    capsize=3, label=c["label"], lw=2.2 if family == "logreg" else 1.4)


def plot_results(summary, nlabeled, path, title, chance=None):
    """Accuracy vs n (log scale), one line per column with std error bars: a row of two panels
    (all classes, novel classes) per top-k that some result holds, top-5 first; ``chance``: {k:
    accuracy} drawn as dashed lines. PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k in table_ks() if any(cell["top%d" % k] is not None
                                       for c in summary for cell in c["cells"].values())] or [5]
    fig, axes = plt.subplots(len(ks), 2, figsize=(11, 4.4 * len(ks)), sharey="row", squeeze=False)
    for row, k in zip(axes, ks):
        for ax, suffix, what in zip(row, ("", "_novel"), ("all classes", "novel classes")):
            _plot_panel(ax, summary, nlabeled, "top%d%s" % (k, suffix))
            if chance is not None and k in chance:
                ax.axhline(chance[k], color="gray", ls="--", lw=1, label="chance")
            ax.set_xscale("log")
            ax.set_xticks(nlabeled)
            ax.set_xticklabels([str(n) for n in nlabeled])
            ax.set_xlabel("labelled images per novel class (n)")
            ax.set_title("top-%d, %s" % (k, what), fontsize=10)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("top-%d accuracy (%%)" % k)
    if axes[0][1].get_legend_handles_labels()[0]:
        axes[0][1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
