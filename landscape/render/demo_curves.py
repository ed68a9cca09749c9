"""The demo's training figure: training loss, OOD loss and the mean cross-domain gradient cosine (tracker rows)
against step. Top row: each arm's mean over seeds with a min-max band. Bottom row: each arm's difference from
AdamW, paired by seed (the arms' curves overlap at this scale; the differences show who is ahead), mean with a
min-max band over seeds. The legend sits outside the panels."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import ARM_LABELS as ARM_NAMES, OPTIMIZER_COLORS as ARM_COLORS, domain_label

BASELINE = "adamw"


def _series(runs: list[list[dict]], key) -> tuple[list[int], np.ndarray]:
    """(steps every seed has, seeds x steps values of `key(record)`)."""
    runs = [r for r in runs if r]
    if not runs:
        return [], np.zeros((0, 0))
    steps = sorted(set.intersection(*[{x["step"] for x in r} for r in runs]))
    vals = np.array([[next(key(x) for x in r if x["step"] == s) for s in steps] for r in runs], dtype=float)
    return steps, vals


def _plot_band(ax, steps, vals, arm: str, label: bool = True) -> None:
    if not len(steps):
        return
    c = ARM_COLORS.get(arm)
    ax.plot(steps, np.nanmean(vals, 0), color=c, label=f"{ARM_NAMES.get(arm, arm)} (n={len(vals)})" if label else None)
    if len(vals) > 1:
        ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=c, alpha=0.2, lw=0)


def _band(ax, runs: list[list[dict]], key, arm: str) -> None:
    """Mean and min-max over seeds of `key(record)` on the steps every seed has."""
    _plot_band(ax, *_series(runs, key), arm)


def _difference(ax, runs: dict, key, arm: str) -> None:
    """arm - AdamW per seed (seeds paired by position, steps both have), mean and min-max band."""
    s_arm, v_arm = _series(runs.get(arm, []), key)
    s_base, v_base = _series(runs.get(BASELINE, []), key)
    common = sorted(set(s_arm) & set(s_base))
    n = min(len(v_arm), len(v_base))
    if not common or not n:
        return
    ia = [s_arm.index(s) for s in common]
    ib = [s_base.index(s) for s in common]
    _plot_band(ax, common, v_arm[:n][:, ia] - v_base[:n][:, ib], arm, label=False)


def training_figure(curves: dict, cosine: dict, ood: list[str], title: str = "", matched: dict | None = None) -> Figure:
    """curves: arm -> per-seed eval records; cosine: arm -> per-seed tracker rows; matched: arm -> [(step, loss)]."""
    panels = ["train", *ood, "cosine"]
    diff = BASELINE in curves and len(curves) > 1
    rows = 2 if diff else 1
    fig = Figure(figsize=(3.8 * len(panels) + 1.8, 3.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, len(panels), squeeze=False, sharex="col")

    def key_of(p):
        if p == "cosine":
            return lambda x: np.nan if x["mean_cosine"] is None else x["mean_cosine"]
        return (lambda x: x["train_loss"]) if p == "train" else (lambda x, p=p: x["losses"][p])

    for col, p in enumerate(panels):
        ax = axes[0][col]
        source = cosine if p == "cosine" else curves
        for arm in curves:
            _band(ax, source.get(arm, []), key_of(p), arm)
            if matched and p == "train":
                pts = matched.get(arm, [])
                ax.plot([s for s, _ in pts], [v for _, v in pts], "o", ms=4, color=ARM_COLORS.get(arm), mec="k")
        name = ("mean cross-domain gradient cosine" if p == "cosine" else
                "training loss" if p == "train" else f"{domain_label(p, [p])} loss")
        if p == "cosine":
            ax.set_title("gradient alignment over training")
            ax.set_ylabel(name)
            ax.axhline(0, color="grey", lw=0.6)
        else:
            ax.set_title(name)
            ax.set_ylabel("evaluation loss")
        if diff:
            ax = axes[1][col]
            for arm in curves:
                if arm != BASELINE:
                    _difference(ax, source, key_of(p), arm)
            ax.axhline(0, color=ARM_COLORS.get(BASELINE), lw=1.2)
            ax.set_title(f"{name}: arm − AdamW", fontsize=9)
            ax.set_ylabel("difference from AdamW\n(below 0: lower than AdamW)" if p != "cosine" else
                          "difference from AdamW\n(above 0: more aligned)")
        axes[-1][col].set_xlabel("optimizer step")
    handles, _ = axes[0][0].get_legend_handles_labels()
    if matched:
        handles.append(Line2D([], [], ls="", marker="o", ms=4, mfc="white", mec="k", label="matched checkpoint"))
    handles.append(Line2D([], [], lw=6, color="grey", alpha=0.3, label="min-max over seeds"))
    if diff:
        handles.append(Line2D([], [], lw=1.2, color=ARM_COLORS.get(BASELINE), label="AdamW (difference 0)"))
    fig.legend(handles=handles, fontsize=7, loc="outside right upper")  # outside the data
    if title:
        fig.suptitle(title)
    return fig
