"""Training curves: per-domain evaluation loss against step, mean and spread over seeds, per optimizer."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .style import OPTIMIZER_COLORS as OPT_COLORS, domain_label


def curves_plot(records: dict[str, list[list[dict]]], ood: list[str], title: str = "", matched: dict | None = None):
    """records: optimizer -> [per-seed eval records]; one panel per domain plus the training loss."""
    first = next(iter(records.values()))[0][0]
    domains = ["train"] + list(first["losses"])
    n = len(domains)
    fig = Figure(figsize=(3.2 * n, 3.0))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, d in zip(axes[0], domains):
        for opt, runs in records.items():
            steps = [r["step"] for r in runs[0]]
            vals = np.array([[r["train_loss"] if d == "train" else r["losses"][d] for r in run[:len(steps)]]
                             for run in runs if len(run) >= len(steps)])
            mu = vals.mean(0)
            ax.plot(steps, mu, color=OPT_COLORS.get(opt), label=f"{opt} (n={len(vals)})")
            if len(vals) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=OPT_COLORS.get(opt), alpha=0.2)
        if matched and d == "train":
            for opt, (step, loss) in matched.items():
                ax.plot([step], [loss], "o", color=OPT_COLORS.get(opt), mec="k")
        ax.set_title(domain_label(d, ood))
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("eval loss")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
