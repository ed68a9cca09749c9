"""Figures of the researcher views (issue 21): sharpness bars per domain and checkpoint, loss along a
connecting path (linear and Bezier) per domain."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from .geometry import _labels, _save
from .style import color, domain_label


def sharpness_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Two panels: worst-case increase (hatched where the ascent did not converge) and average-case increase
    +- 2 standard errors, one bar per checkpoint in each domain's group."""
    labels = _labels(results, labels)
    names = list(dict.fromkeys(d for r in results for d in r.domains))
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) * max(1, len(results)) / 2 + 3), 6.4), layout="constrained")
    axes = [fig.add_subplot(2, 1, i + 1) for i in range(2)]
    width = 0.8 / max(1, len(results))
    x = np.arange(len(names))
    for k, (r, lab) in enumerate(zip(results, labels)):
        c = color(k)
        pos = x - 0.4 + width * (k + 0.5)
        worst = [np.nan if d not in r.results or r[d].worst is None else r[d].worst for d in names]
        conv = [d in r.results and bool(r[d].worst_converged) for d in names]
        bars = axes[0].bar(pos, worst, width, color=c, label=lab)
        for b, ok in zip(bars, conv):
            if not ok:
                b.set_hatch("//")
        avg = [np.nan if d not in r.results or r[d].average is None else r[d].average for d in names]
        se = [0.0 if d not in r.results or r[d].average_stderr is None else 2 * r[d].average_stderr for d in names]
        axes[1].bar(pos, avg, width, yerr=se, color=c, capsize=3, label=lab)
    ood = sorted({d for r in results for d in r.ood})
    r0 = results[0]
    what = {"none": "absolute", "elementwise": "adaptive, |theta| elementwise", "filter": "adaptive, per filter"}
    axes[0].set_title(f"worst case in the rho = {r0.rho:g} ball ({what.get(r0.adaptive, r0.adaptive)}); "
                      f"hatched: ascent stopped on its step budget", fontsize=9)
    axes[1].set_title("average case, Gaussian perturbations of covariance rho^2 T^2 / n (+-2 SE)", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, [domain_label(d, ood) if d != "train" else "training loss" for d in names], fontsize=8)
        ax.set_ylabel("loss increase")
        ax.axhline(0, color="0.5", lw=0.6)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def connect_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Loss along each path per domain: solid the linear path, dashed the trained Bezier curve; barriers in the
    legend. One panel per result."""
    labels = _labels(results, labels)
    fig = Figure(figsize=(5.6 * len(results), 4.2), layout="constrained")
    for k, (r, lab) in enumerate(zip(results, labels)):
        ax = fig.add_subplot(1, len(results), k + 1)
        for i, d in enumerate(r.domains):
            c = "k" if d == "train" else color(i)
            name = "training loss" if d == "train" else domain_label(d, r.ood)
            ax.plot(r.t, r.linear[d], color=c, lw=1.6,
                    label=f"{name}: barrier {r.barrier[d]:.3g}" if r.barrier.get(d) is not None else name)
            if r.bezier:
                bb = r.bezier_barrier.get(d)
                ax.plot(r.t, r.bezier[d], color=c, lw=1.2, ls="--",
                        label=f"  Bezier: barrier {bb:.3g}" if bb is not None else None)
        ax.set_xlabel(f"t ({r.endpoints[0]} -> {r.endpoints[1]})", fontsize=8)
        ax.set_ylabel("loss")
        bn = ", BatchNorm re-estimated" if r.settings.get("bn_reestimated") else ""
        ax.set_title(f"{lab}{bn}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)
