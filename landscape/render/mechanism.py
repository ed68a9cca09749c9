"""Figure of the mechanism toy: training-loss contours with both basins and sample paths, and each arm vs gamma.

Built on matplotlib.figure.Figure (no pyplot, no global backend state).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..mechanism import ARM_LABELS, MechanismResult, landscape_from_dict

ARM_STYLE = {"adamw": dict(color="tab:red", ls="-"), "control": dict(color="tab:blue", ls="--"),
             "nexus": dict(color="tab:green", ls="-")}


def _grid(r: MechanismResult, n: int = 161):
    land = landscape_from_dict(r.landscape)
    pts = np.concatenate([np.asarray(p).reshape(-1, 2) for ps in r.sample_paths.values() for p in ps]
                         + [np.asarray(r.starts)])
    lo = np.minimum(pts.min(0), [land.shared_min[0] - 1.0, -land.spread - 1.0])
    hi = np.maximum(pts.max(0), [land.separated_centre[0] + 1.0, land.spread + 1.0])
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    X, Y = np.meshgrid(xs, ys)
    return land, X, Y, land.loss("train", np.stack([X, Y], -1))


def mechanism_figure(r: MechanismResult) -> Figure:
    """Three panels: (a) contours + basins + sample paths, (b) shared-basin fraction vs gamma, (c) downstream loss
    and drift shift vs gamma."""
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.35, 1, 1]})
    land, X, Y, Z = _grid(r)

    # (a) the landscape
    levels = np.quantile(Z, np.linspace(0, 0.92, 24))
    cf = ax0.contourf(X, Y, Z, levels=np.unique(levels), cmap="Greys_r", alpha=0.85)
    cb = fig.colorbar(cf, ax=ax0, shrink=0.9)
    cb.set_label("training loss (mean over training domains)")
    s, p = land.shared_min, land.separated_centre
    handles = []
    ax0.plot(*s, marker="*", ms=18, color="gold", mec="k", ls="none")
    handles.append(Line2D([], [], marker="*", ms=12, color="gold", mec="k", ls="none",
                          label="shared basin: every domain's minimum"))
    for d, m in land.separated_minima.items():
        ax0.plot(*m, marker="P", ms=10, color="tab:purple", mec="k", ls="none")
    handles.append(Line2D([], [], marker="P", ms=9, color="tab:purple", mec="k", ls="none",
                          label="separated basin: each domain's minimum"))
    ax0.plot(*p, marker="X", ms=10, color="white", mec="k", ls="none")
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
    ax0.set_title("(a) two basins of equal training loss")
    ax0.legend(handles=handles, fontsize=6.5, loc="lower left", framealpha=0.85)

    # (b) where the runs end
    g = np.asarray(r.gammas)
    a = r.row("adamw")
    ax1.axhline(a["frac_shared"], **ARM_STYLE["adamw"], label=f"{ARM_LABELS['adamw']} (no gamma)")
    for arm, mk in (("control", "o"), ("nexus", "s")):
        ax1.plot(g, [r.row(arm, x)["frac_shared"] for x in g], marker=mk, **ARM_STYLE[arm], label=ARM_LABELS[arm])
    ax1.set_xscale("log")
    ax1.set_xticks(g, [f"{x:g}" for x in g])
    ax1.minorticks_off()
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("gamma (inner_lr)")
    ax1.set_ylabel(f"fraction of runs ending in the shared basin (n={a['n']})")
    ax1.set_title("(b) shared-basin fraction")
    ax1.legend(fontsize=7, loc="best")

    # (c) downstream loss reached and the paired drift shift
    ax2.axhline(a["downstream_mean"], **ARM_STYLE["adamw"], label=f"{ARM_LABELS['adamw']} downstream loss")
    for arm, mk in (("control", "o"), ("nexus", "s")):
        rows = [r.row(arm, x) for x in g]
        ax2.errorbar(g, [x["downstream_mean"] for x in rows], yerr=[x["downstream_stderr"] or 0 for x in rows],
                     marker=mk, capsize=3, **ARM_STYLE[arm], label=f"{ARM_LABELS[arm]} downstream loss")
    ax2.set_xscale("log")
    ax2.set_xticks(g, [f"{x:g}" for x in g])
    ax2.minorticks_off()
    ax2.set_xlabel("gamma (inner_lr)")
    ax2.set_ylabel("mean downstream loss at the end (+- stderr)")
    ax3 = ax2.twinx()
    T0 = r.settings.get("drift_steps")
    ax3.errorbar(g, [sh["d_drift"] for sh in r.shifts], yerr=[sh["d_drift_stderr"] or 0 for sh in r.shifts],
                 color="k", ls=":", marker="^", capsize=3)
    ax3.axhline(0, color="grey", lw=0.6)
    ax3.set_ylabel(f"Nexus minus control: drift towards shared basin after {T0} steps")
    h2, l2 = ax2.get_legend_handles_labels()
    h2.append(Line2D([], [], color="k", ls=":", marker="^", label="drift shift, Nexus minus control (right axis)"))
    ax2.legend(handles=h2, fontsize=7, loc="best")
    ax2.set_title("(c) downstream loss and drift shift")
    fig.suptitle(f"The mechanism on a 2-D toy: AdamW vs control (Nexus without the walk) vs Nexus; "
                 f"K={r.settings.get('K')}, {a['n']} runs per arm and gamma", fontsize=10)
    return fig


def write_mechanism_figure(r: MechanismResult, path: str | Path, dpi: int = 130) -> Path:
    """Render and save the figure (format from the file extension)."""
    path = Path(path)
    mechanism_figure(r).savefig(path, dpi=dpi)
    return path
