"""A forest plot of paired comparisons: one panel per metric, one row per arm pair, the mean with its 95%
interval, and the band +- the minimum detectable effect at 80% power around zero (what the seeds could see)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from .geometry import _save


def forest_figure(pairs: Sequence[dict], label: Callable[[str], str] = str, title: str = "",
                  path: str | Path | None = None, cols: int = 3) -> Figure:
    """`pairs`: PairedDiff dicts (metric, arm, baseline, mean, ci_low, ci_high, mde, n). Panels in first-seen
    metric order; a point whose interval excludes zero is filled, otherwise hollow; grey band: +- MDE."""
    metrics = list(dict.fromkeys(p["metric"] for p in pairs))
    if not metrics:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no paired comparisons", ha="center")
        return _save(fig, path)
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.6 * cols, 0.6 + 0.3 * max(len([p for p in pairs if p["metric"] == m]) for m in metrics) * rows
                          + 0.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        ps = [p for p in pairs if p["metric"] == m]
        names = [f"{p['arm']} - {p['baseline']}" for p in ps]
        y = np.arange(len(ps))[::-1]
        span = 0.0
        for yi, p in zip(y, ps):
            if p.get("mde") is not None:
                ax.fill_betweenx([yi - 0.35, yi + 0.35], -p["mde"], p["mde"], color="0.88", lw=0)
                span = max(span, p["mde"])
            if p.get("ci_low") is None:
                ax.text(0.5, yi, f"no interval (n/a at {p.get('n', 0)} seeds)", ha="center", va="center", fontsize=7,
                        transform=ax.get_yaxis_transform())  # centred in the panel, whatever its x range
                continue
            sig = p["ci_low"] > 0 or p["ci_high"] < 0
            ax.plot([p["ci_low"], p["ci_high"]], [yi, yi], color="k", lw=1.2)
            ax.plot([p["mean"]], [yi], "o", ms=5, color="k", mfc="k" if sig else "w")
            span = max(span, abs(p["ci_low"]), abs(p["ci_high"]))
        ax.axvline(0, color="0.5", lw=0.8, ls=":")
        ax.set_yticks(y, names, fontsize=7)
        ax.set_ylim(-0.6, len(ps) - 0.4)
        if span > 0:
            ax.set_xlim(-1.1 * span, 1.1 * span)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(label(m), fontsize=8)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle((title + ": " if title else "") + "paired differences, mean and 95% CI (filled: excludes zero); "
                 "grey: +- MDE at 80% power", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
