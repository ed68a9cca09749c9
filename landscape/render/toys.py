"""Figures of the exact toys: Figure 2 parabolas and the 2-D trajectory toy."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from .style import OPTIMIZER_COLORS, domain_colors

if TYPE_CHECKING:  # the figures read the results' fields only; the toys live in the application layer
    from ..app.toys import Figure2Result, TrajectoryToyResult


def figure2_plot(r: Figure2Result):
    """Two panels (sum vs intersection): each domain's parabola, the training mean, x = 0 marked."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    x = np.linspace(-0.6, 0.8, 400)
    titles = {"fig2-sum": "(a) sum of minima", "fig2-intersection": "(b) intersection of minima"}
    for ax, (preset, cfg) in zip(axes, r.configs.items()):
        m, c = cfg["minima"], cfg["c"]
        colors = domain_colors(list(m))
        for d, mu in m.items():
            ax.plot(x, 8 * (x - mu) ** 2 + c, color=colors[d], ls="--" if d == "target" else "-", label=d)
        ax.plot(x, 8 * ((x - m["train1"]) ** 2 + (x - m["train2"]) ** 2) / 2 + c, color="k", lw=2, label="training loss")
        ax.axvline(0, color="gray", lw=0.8)
        ax.annotate(f"train {cfg['train_loss_at_0']:.2f}\ntarget {cfg['target_loss_at_0']:.2f}", (0.02, 0.97),
                    xycoords="axes fraction", va="top")
        ax.set_title(titles[preset])
        ax.set_xlabel("x")
        ax.set_ylim(0, 4)
    axes[0].set_ylabel("loss")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right center", fontsize=8)  # outside the data
    return fig


def trajectory_plot(r: TrajectoryToyResult):
    """Each domain's exact loss contours, the training loss as shading (with its colorbar), and the AdamW / Nexus
    paths with their ends; every marker is in the legend, which sits outside the data."""
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.6, 6.6), layout="constrained")
    ax = fig.subplots()
    X, Y = np.meshgrid(r.x, r.y)
    train = np.asarray(r.losses["train"])
    shade = ax.contourf(X, Y, np.log10(train - train.min() + 1e-3), levels=30, cmap="Greys", alpha=0.6)
    cb = fig.colorbar(shade, ax=ax, shrink=0.85)
    cb.set_label("training loss above its minimum, log10(L − L_min + 0.001)")
    domains = [d for d in r.losses if d not in ("train",) and d in r.minima and d != "ood"]
    handles = []
    for d, col in domain_colors(domains).items():
        ax.contour(X, Y, np.asarray(r.losses[d]), levels=8, colors=col, linewidths=0.8)
        handles.append(Line2D([], [], color=col, lw=0.8, label=f"{d} loss contours"))
        ax.plot(*r.minima[d], marker="*", ms=14, color=col, mec="k", ls="none", zorder=6)
        handles.append(Line2D([], [], marker="*", ms=11, color=col, mec="k", ls="none", label=f"min {d}"))
    ax.plot(*r.minima["train"], marker="X", ms=10, color="k", ls="none", zorder=6)
    handles.append(Line2D([], [], marker="X", ms=9, color="k", ls="none", label="min training loss"))
    for name in ("adamw", "nexus"):
        col = OPTIMIZER_COLORS[name]
        p = np.asarray(r.paths[name])
        ax.plot(p[:, 0], p[:, 1], color=col, lw=1.8)
        ax.plot(p[-1, 0], p[-1, 1], "o", color=col, mec="k", zorder=5)
        handles.append(Line2D([], [], color=col, lw=1.8, label=f"{name} path"))
        handles.append(Line2D([], [], marker="o", color=col, mec="k", ls="none", label=f"{name} end"))
    ax.plot(*r.paths["adamw"][0], "s", color="k", zorder=5)
    handles.append(Line2D([], [], marker="s", color="k", ls="none", label="start (both)"))
    ax.set_xlabel("theta[0]")
    ax.set_ylabel("theta[1]")
    ax.set_title("2-D two-domain toy: exact per-domain contours")
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=4)
    return fig
