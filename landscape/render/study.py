"""Figures of the dose-response study: paired differences against gamma, and the tracker's cosine over training."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scipy import stats

from .style import OPTIMIZER_COLORS

PANELS = (("rate_difference", "alignment rate difference\n(Nexus's matched checkpoint)"),
          ("rate_difference@control", "alignment rate difference\n(the control's matched checkpoint)"),
          ("mean_cosine", "mean gradient cosine,\nNexus - control at equal loss"),
          ("ood_loss", "OOD loss,\nNexus - control at equal loss"),
          ("end:mean_cosine", "gradient cosine at the end,\nNexus - control (not at equal loss)"))


def dose_response_figure(summary: dict) -> Figure:
    """One panel per metric: mean and 95% CI against gamma, the +-MDE band, and the K = 1 null at the left."""
    comps, null = summary["comparisons"], {p["metric"]: p for p in summary["null"]}
    fig = Figure(figsize=(4.2 * len(PANELS), 3.4), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (k, title) in zip(axes, PANELS):
        ps = sorted((p for p in comps if p["metric"] == k), key=lambda p: p["gamma"])
        g = np.array([p["gamma"] for p in ps])
        m = np.array([np.nan if p["mean"] is None else p["mean"] for p in ps])
        lo = np.array([np.nan if p["ci_low"] is None else p["ci_low"] for p in ps])
        hi = np.array([np.nan if p["ci_high"] is None else p["ci_high"] for p in ps])
        mde = np.array([np.nan if p.get("mde") is None else p["mde"] for p in ps])
        ax.fill_between(g, -mde, mde, color="0.88", label="+- MDE (80% power)")
        ax.errorbar(g, m, yerr=[m - lo, hi - m], marker="o", color=OPTIMIZER_COLORS["nexus"], capsize=3,
                    label="mean, 95% CI")
        if k in null and null[k]["mean"] is not None:
            x0 = g.min() / 2.5 if len(g) else 0.01
            ax.errorbar([x0], [null[k]["mean"]], yerr=[[null[k]["mean"] - (null[k]["ci_low"] or 0)],
                                                       [(null[k]["ci_high"] or 0) - null[k]["mean"]]],
                        marker="s", color="k", capsize=3, label="K = 1 null")
        ax.axhline(0, color="0.5", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(list(g), [f"{x:g}" for x in g])
        ax.set_xlabel("gamma (K = 1 null at the left)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    n = len(summary["per_seed"])
    fig.suptitle(f"dose-response over {n} paired seeds (K = {summary['settings']['K']})", fontsize=10)
    return fig


def _band(ax, runs, color, label):
    runs = [r for r in runs if r]
    if not runs:
        return
    steps = sorted(set.intersection(*[{x["step"] for x in r} for r in runs]))
    v = np.array([[next((x["mean_cosine"] for x in r if x["step"] == s), np.nan) for s in steps] for r in runs],
                 dtype=float)
    mean = np.nanmean(v, 0)
    ax.plot(steps, mean, color=color, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        half = stats.t.ppf(0.975, len(runs) - 1) * np.nanstd(v, 0, ddof=1) / math.sqrt(len(runs))
        ax.fill_between(steps, np.clip(mean - half, -1, 1), np.clip(mean + half, -1, 1), color=color, alpha=0.2)


def cosine_curves_figure(summary: dict) -> Figure:
    """One panel per gamma (control vs Nexus) and one for the K = 1 pair: tracker cosine, mean and 95% band."""
    curves = summary["curves"]
    gs = summary["settings"]["gammas"]
    keys = [(f"gamma={g:g}", "control", f"nexus gamma={g:g}") for g in gs] + [("K = 1", "control K=1", "nexus K=1")]
    fig = Figure(figsize=(3.4 * len(keys), 3.2), layout="constrained")
    axes = fig.subplots(1, len(keys), sharey=True)
    for ax, (title, c, n) in zip(np.atleast_1d(axes), keys):
        _band(ax, curves.get(c, []), OPTIMIZER_COLORS["control"], "control")
        _band(ax, curves.get(n, []), OPTIMIZER_COLORS["nexus"], "Nexus")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("mean cross-domain gradient cosine")
    return fig
