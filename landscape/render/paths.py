"""Training paths on a trajectory plane (issue 21): each run's checkpoints joined in order, its start a square."""
from __future__ import annotations

import numpy as np

PATH_COLORS = ("k", "#e7298a", "#17becf", "#7f7f7f", "#bcbd22")  # apart from the domain colours


def draw_paths(ax, r, legend: bool = True) -> set:
    """Draw every run's path of a surface result whose normalisation lists `paths`; returns the names of the
    checkpoints between each path's ends (drawn on the path, left unlabelled)."""
    quiet = set()
    for k, (run, names) in enumerate(((r.normalization or {}).get("paths") or {}).items()):
        P = np.array([r.points[n] for n in names if n in r.points], dtype=float).reshape(-1, 2)
        c = PATH_COLORS[k % len(PATH_COLORS)]
        ax.plot(P[:, 0], P[:, 1], "-", color=c, lw=1.5, marker="o", ms=3.5, mec="w", mew=0.4,
                label=f"path {run}" if legend else None, zorder=4)
        if len(P) > 1:
            ax.plot(P[0, 0], P[0, 1], marker="s", ms=6, color=c, mec="w", ls="none", zorder=5)
        quiet.update(names[1:-1])
    return quiet


def path_handles(r) -> list:
    """Legend entries of the paths (for overlays that build their own legend)."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=PATH_COLORS[k % len(PATH_COLORS)], marker="o", ms=3, label=f"path {run} (square: start)")
            for k, run in enumerate((r.normalization or {}).get("paths") or {})]
