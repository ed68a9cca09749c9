"""The demo's training figure: training loss, OOD loss and the mean cross-domain gradient cosine (tracker rows)
against step, one line per arm (mean over seeds) with a min-max band."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import ARM_LABELS as ARM_NAMES, OPTIMIZER_COLORS as ARM_COLORS, domain_label


def _band(ax, runs: list[list[dict]], key, arm: str) -> None:
    """Mean and min-max over seeds of `key(record)` on the steps every seed has."""
    runs = [r for r in runs if r]
    if not runs:
        return
    steps = sorted(set.intersection(*[{x["step"] for x in r} for r in runs]))
    vals = np.array([[next(key(x) for x in r if x["step"] == s) for s in steps] for r in runs], dtype=float)
    c = ARM_COLORS.get(arm)
    ax.plot(steps, np.nanmean(vals, 0), color=c, label=f"{ARM_NAMES.get(arm, arm)} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=c, alpha=0.2)


def training_figure(curves: dict, cosine: dict, ood: list[str], title: str = "", matched: dict | None = None) -> Figure:
    """curves: arm -> per-seed eval records; cosine: arm -> per-seed tracker rows; matched: arm -> [(step, loss)]."""
    panels = ["train", *ood, "cosine"]
    fig = Figure(figsize=(3.8 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, p in zip(axes, panels):
        for arm in curves:
            if p == "cosine":
                _band(ax, cosine.get(arm, []), lambda x: np.nan if x["mean_cosine"] is None else x["mean_cosine"], arm)
            else:
                _band(ax, curves[arm], (lambda x: x["train_loss"]) if p == "train" else (lambda x, p=p: x["losses"][p]),
                      arm)
            if matched and p == "train":
                pts = matched.get(arm, [])
                ax.plot([s for s, _ in pts], [v for _, v in pts], "o", ms=4, color=ARM_COLORS.get(arm), mec="k")
        ax.set_xlabel("optimizer step")
        if p == "cosine":
            ax.set_title("gradient alignment over training")
            ax.set_ylabel("mean cross-domain gradient cosine")
            ax.axhline(0, color="grey", lw=0.6)
        else:
            ax.set_title("training loss" if p == "train" else f"{domain_label(p, [p])} loss")
            ax.set_ylabel("evaluation loss")
    handles, _ = axes[0].get_legend_handles_labels()
    if matched:
        handles.append(Line2D([], [], ls="", marker="o", ms=4, mfc="white", mec="k", label="matched checkpoint"))
    handles.append(Line2D([], [], lw=6, color="grey", alpha=0.3, label="min-max over seeds"))
    axes[0].legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(title)
    return fig
