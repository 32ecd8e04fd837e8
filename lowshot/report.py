"""Tables and plots of the phases' results (``run_*.bash 4``) and of the demo (``demo.py table``):
mean and std over seeds per (method, n), Markdown tables, PNG plots, the chosen parameters.
"""
import numpy as np

from lowshot.common import atomic_output
from lowshot.phase_config import METRICS, bg_label, parse_variant


def format_choices(chosen):
    """One line per choice: ``n=2 F1M: niter 3  val top-5 66.80 ± 0.12 (novel 50.10 ± 0.30)``."""
    lines = []
    for n in sorted(chosen):
        entries = chosen[n].items() if "val_top5" not in chosen[n] else [(None, chosen[n])]
        def order(e):       # in-domain variants last, then by background size
            return (0, 0) if e[0] is None else parse_variant(e[0])[::-1]
        for vn, c in sorted(entries, key=order):
            if vn is not None:
                vn = bg_label(*parse_variant(vn))
            params = ", ".join("%s %s" % (k, c[k]) for k in ("lr", "wd", "batchsize", "maxiter",
                                                              "niter", "weight") if k in c)
            lines.append("n=%d%s: %s  val top-5 %.2f ± %.2f (novel %.2f ± %.2f), %d seeds" % (
                n, "" if vn is None else " " + vn, params, 100 * c["val_top5"],
                100 * c["val_top5_std"], 100 * c["val_top5_novel"], 100 * c["val_top5_novel_std"],
                c["nseeds"]))
    return lines


def _final(res, metric):
    v = res[metric]
    return float(v[0] if isinstance(v, list) else v)


def summarize(columns, nlabeled):
    """Mean and std (numpy, ddof=0) over the available seeds of each (column, n), in percent.

    Parameters
    ----------
    columns : list of (label, {n: [result dict or None per seed]})

    Returns
    -------
    list of {"label", "cells": {n: {"nseeds", "top5", "top5_std", "top5_novel", ...}}}
    """
    out = []
    for label, cells in columns:
        col = {"label": label, "cells": {}}
        for n in nlabeled:
            got = [r for r in cells.get(n, []) if r is not None]
            cell = {"nseeds": len(got)}
            for m in METRICS:
                if got:
                    v = 100 * np.array([_final(r, m) for r in got])
                    cell[m], cell[m + "_std"] = float(v.mean()), float(v.std())
                else:
                    cell[m] = cell[m + "_std"] = None
            col["cells"][n] = cell
        out.append(col)
    return out


def markdown_table(summary, nlabeled, metric, nseeds):
    """Rows n, one column per method x background; ``mean ± std`` with 2 decimals."""
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
            s = "%.2f ± %.2f" % (cell[metric], cell[metric + "_std"])
            if cell["nseeds"] < nseeds:
                s += " (%d/%d)" % (cell["nseeds"], nseeds)
            row.append(s)
        lines.append("| %d | %s |" % (n, " | ".join(row)))
    return "\n".join(lines) + "\n"


# line style per method family: logreg solid, diffusion dashed, combined dotted (equal curves, e.g.
# combined with fusion weight 0 and logreg, stay visible)
_STYLES = {"logreg": ("-", "o"), "diffusion": ("--", "s"), "combined": (":", "^")}


def plot_results(summary, nlabeled, path, title, chance=None):
    """Top-5 accuracy vs n (log scale), one line per column with std error bars, all classes and
    novel classes side by side; ``chance``: a dashed line at that accuracy. PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, metric, what in zip(axes, METRICS, ("all classes", "novel classes")):
        for c in summary:
            ns = [n for n in nlabeled if c["cells"][n]["nseeds"]]
            if not ns:
                continue
            family = c["label"].split()[0]
            ls, marker = _STYLES.get(family, ("-", "o"))
            ax.errorbar(ns, [c["cells"][n][metric] for n in ns],
                        yerr=[c["cells"][n][metric + "_std"] for n in ns], ls=ls, marker=marker,
                        capsize=3, label=c["label"], lw=2.2 if family == "logreg" else 1.4)
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(nlabeled)
        ax.set_xticklabels([str(n) for n in nlabeled])
        ax.set_xlabel("labelled images per novel class (n)")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-5 accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
