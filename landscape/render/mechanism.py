"""Figure of the mechanism toy: training-loss contours with both basins and sample paths, and each arm vs gamma.

Built on matplotlib.figure.Figure (no pyplot, no global backend state).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from typing import TYPE_CHECKING

from .style import ARM_LABELS

if TYPE_CHECKING:  # render does not import the application layer at run time
    from ..app.mechanism import MechanismResult

ARM_STYLE = {"adamw": dict(color="tab:red", ls="-"), "control": dict(color="tab:blue", ls="--"),
             "nexus": dict(color="tab:green", ls="-")}


def _grid(r: MechanismResult, n: int = 161):
    from ..app.mechanism_landscape import landscape_from_dict

    land = landscape_from_dict(r.landscape)
    pts = np.concatenate([np.asarray(p).reshape(-1, 2) for ps in r.sample_paths.values() for p in ps]
                         + [np.asarray(r.starts)])
    lo = np.minimum(pts.min(0), [land.shared_min[0] - 1.0, -land.spread - 1.0])
    hi = np.maximum(pts.max(0), [land.separated_centre[0] + 1.0, land.spread + 1.0])
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    X, Y = np.meshgrid(xs, ys)
    return land, X, Y, land.loss("train", np.stack([X, Y], -1))


def _gamma_axis(ax, g) -> None:
    ax.set_xscale("log")
    ax.set_xticks(g, [f"{x:g}" for x in g])
    ax.minorticks_off()
    ax.set_xlabel("gamma (inner_lr)")


def mechanism_figure(r: MechanismResult) -> Figure:
    """(a) training-loss contours, both basins (markers on top of the paths), starts and sample paths; (b)
    shared-basin fraction and (c) downstream loss reached against gamma; (d) the paired Nexus-minus-control
    shifts against gamma, one quantity per axis (drift, gradient cosine, shared-basin fraction). Legends sit
    below the panels, outside the data."""
    fig = Figure(figsize=(19, 7.0), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)  # room between the colorbar label and panel (b)
    gs = fig.add_gridspec(3, 4, width_ratios=[1.5, 1, 1, 1])
    ax0, ax1, ax2 = fig.add_subplot(gs[:, 0]), fig.add_subplot(gs[:, 1]), fig.add_subplot(gs[:, 2])
    ax3 = [fig.add_subplot(gs[0, 3])]
    ax3 += [fig.add_subplot(gs[i, 3], sharex=ax3[0]) for i in (1, 2)]
    land, X, Y, Z = _grid(r)

    # (a) the landscape
    levels = np.unique(np.quantile(Z, np.linspace(0, 0.92, 24)))
    cf = ax0.contourf(X, Y, Z, levels=levels, cmap="Greys_r", alpha=0.85)
    cb = fig.colorbar(cf, ax=ax0, shrink=0.9, format="%.2f")
    cb.set_label("training loss (mean over training domains)")
    s, p = land.shared_min, land.separated_centre
    handles = []
    top = dict(ls="none", zorder=6)  # the basins' markers are drawn over the paths
    ax0.plot(*s, marker="*", ms=18, color="gold", mec="k", **top)
    handles.append(Line2D([], [], marker="*", ms=12, color="gold", mec="k", ls="none",
                          label="shared basin: every domain's minimum"))
    for m in land.separated_minima.values():
        ax0.plot(*m, marker="P", ms=10, color="tab:purple", mec="k", **top)
    handles.append(Line2D([], [], marker="P", ms=9, color="tab:purple", mec="k", ls="none",
                          label="separated basin: each domain's minimum"))
    ax0.plot(*p, marker="X", ms=10, color="white", mec="k", **top)
    handles.append(Line2D([], [], marker="X", ms=9, color="white", mec="k", ls="none",
                          label="separated basin: training-loss minimum"))
    st = np.asarray(r.starts)
    ax0.plot(st[:, 0], st[:, 1], "o", ms=3, color="orange", mec="k", mew=0.4, ls="none")
    handles.append(Line2D([], [], marker="o", ms=4, color="orange", mec="k", ls="none", label="starts (ridge grid)"))
    for arm in r.arms:
        for path in r.sample_paths.get(arm, []):
            q = np.asarray(path)
            ax0.plot(q[:, 0], q[:, 1], lw=1.3, alpha=0.9, **ARM_STYLE[arm])
            ax0.plot(q[-1, 0], q[-1, 1], marker="s", ms=4, color=ARM_STYLE[arm]["color"], mec="k", ls="none")
        g = "" if arm == "adamw" else f", gamma={r.sample_gamma:g}"
        handles.append(Line2D([], [], lw=1.5, label=f"{ARM_LABELS[arm]} path{g}", **ARM_STYLE[arm]))
    handles.append(Line2D([], [], marker="s", ms=5, color="grey", mec="k", ls="none", label="path end"))
    ax0.set_xlabel("theta[0]")
    ax0.set_ylabel("theta[1]")
    ax0.set_aspect("equal", adjustable="box")
    ax0.set_title("(a) two basins of equal training loss, sample paths")
    ax0.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)

    g = np.asarray(r.gammas)
    a = r.row("adamw")
    n = a["n"]
    # (b) where the runs end
    ax1.axhline(a["frac_shared"], **ARM_STYLE["adamw"], label=f"{ARM_LABELS['adamw']} (no gamma)")
    for arm, mk in (("control", "o"), ("nexus", "s")):
        ax1.plot(g, [r.row(arm, x)["frac_shared"] for x in g], marker=mk, **ARM_STYLE[arm], label=ARM_LABELS[arm])
    _gamma_axis(ax1, g)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel(f"fraction of the {n} runs ending in the shared basin")
    ax1.set_title("(b) shared-basin fraction")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)

    # (c) downstream loss reached
    ax2.axhline(a["downstream_mean"], **ARM_STYLE["adamw"], label=f"{ARM_LABELS['adamw']} (no gamma)")
    for arm, mk, dx in (("control", "o", 0.97), ("nexus", "s", 1.03)):
        rows = [r.row(arm, x) for x in g]
        ax2.errorbar(g * dx, [x["downstream_mean"] for x in rows], yerr=[x["downstream_stderr"] or 0 for x in rows],
                     marker=mk, capsize=3, **ARM_STYLE[arm], label=ARM_LABELS[arm])
    bl = r.basin_losses
    for key, ls in (("shared", "-."), ("separated", ":")):
        ax2.axhline(bl[key]["downstream"], color="grey", ls=ls, lw=1, label=f"at the {key} minimum")
    _gamma_axis(ax2, g)
    ax2.set_ylabel("downstream loss at the end (mean +- stderr, clustered by start)")
    ax2.set_title("(c) downstream loss reached")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)

    # (d) paired shifts, Nexus minus control: one quantity per axis
    T0 = r.settings.get("drift_steps")
    sh = r.shifts
    rows = [(ax3[0], "d_drift", "d_drift_stderr", f"drift after {T0} steps\n(theta units)", "k", "^",
             "drift towards the shared basin"),
            (ax3[1], "d_end_cosine", None, "gradient cosine\nat the end", "tab:olive", "D",
             "cross-domain gradient cosine"),
            (ax3[2], "d_frac_shared", None, "shared-basin\nfraction", "tab:green", "s", "shared-basin fraction")]
    for ax, key, se, ylabel, c, mk, what in rows:
        ax.axhline(0, color="grey", lw=0.8)
        ax.errorbar(g, [x[key] for x in sh], yerr=[(x[se] or 0) for x in sh] if se else None, color=c, marker=mk,
                    capsize=3)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(what, fontsize=8)
        _gamma_axis(ax, g)
        if ax is not ax3[-1]:
            ax.tick_params(labelbottom=False)
            ax.set_xlabel("")
    ax3[0].set_title(f"(d) what the walk adds: Nexus minus control, paired, +- stderr over "
                     f"{r.settings.get('n_starts', '?')} starts\n"
                     + rows[0][6], fontsize=9)
    fig.suptitle(f"The mechanism on a 2-D toy: AdamW vs the control (Nexus without the walk) vs Nexus; "
                 f"K={r.settings.get('K')} micro-batches per step, {n} runs per arm and gamma", fontsize=11)
    return fig


def write_mechanism_figure(r: MechanismResult, path: str | Path, dpi: int = 130) -> Path:
    """Render and save the figure (format from the file extension)."""
    from nexus_opt.files import atomic_path

    path = Path(path)
    with atomic_path(path, "--out") as tmp:
        mechanism_figure(r).savefig(tmp, dpi=dpi)
    return path
