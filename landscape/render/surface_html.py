"""The interactive Plotly view of a loss surface: contour and 3-D surface per domain (buttons), the low-loss
overlay; z range and camera chosen from the data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..objective import TRAIN
from .style import domain_colors


def _z_range(z: np.ndarray) -> list[float]:
    """The 3-D z-axis range of a surface: its finite values, padded by 4% (never clipped into a plateau)."""
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    pad = 0.04 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.01
    return [lo - pad, hi + pad]


def _camera(z: np.ndarray) -> dict:
    """A camera chosen from the data: looking from the side opposite the surface's highest corner region (so a
    high near corner cannot pose as a central spike), from above at about 27 degrees."""
    n1, n0 = z.shape  # rows follow y, columns x
    Y, X = np.meshgrid(np.linspace(-1, 1, n1), np.linspace(-1, 1, n0), indexing="ij")
    w = np.where(np.isfinite(z), z - np.nanmin(z), 0.0)
    w = w ** 2
    c = np.array([float((w * X).sum()), float((w * Y).sum())]) / max(float(w.sum()), 1e-300)
    d = -c / np.linalg.norm(c) if np.linalg.norm(c) > 1e-9 else np.array([-1.0, -1.0]) / np.sqrt(2.0)
    return dict(eye=dict(x=2.3 * float(d[0]), y=2.3 * float(d[1]), z=1.15), center=dict(x=0, y=0, z=-0.1),
                up=dict(x=0, y=0, z=1))


_TEXT_POSITIONS = ("top right", "bottom left", "top left", "bottom right", "top center", "bottom center")


def html_figure(r, level=None, label: str | None = None):
    """A plotly figure: contour (left) and 3-D surface (right) of one domain at a time, chosen by buttons;
    an 'overlay' button shows every domain's low-loss region boundary together. The 3-D view's z range and
    camera follow the domain shown (its full range, the camera opposite its high side); point labels are
    light on dark and placed around their points so that neighbours do not overlap."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .surface import _title, common_region, resolve_levels

    names = [d for d in r.losses if d != TRAIN] + [TRAIN]
    colors = domain_colors(names)
    levels = resolve_levels(r, level)
    x, y = np.asarray(r.x).tolist(), np.asarray(r.y).tolist()
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "xy"}, {"type": "scene"}]],
                        subplot_titles=("contour", "3-D surface"))
    owner = []  # which button each trace belongs to: a domain name, "overlay" or None (always shown)
    views = {}  # domain -> the 3-D view (z range, camera) its button sets
    pnames = list(r.points)
    pab = np.array([r.points[k] for k in pnames], dtype=float).reshape(-1, 2)
    for d in names:
        z = np.asarray(r.losses[d], dtype=float)
        zc = np.where(np.isfinite(z), z, None).tolist()
        hi = float(np.nanpercentile(z, 95))
        if d == TRAIN:
            background = {len(owner), len(owner) + 1}  # the training loss also backs the overlay view
        fig.add_trace(go.Contour(x=x, y=y, z=zc, colorscale="Viridis", ncontours=30, zmax=hi, zmin=float(np.nanmin(z)),
                                 zauto=False, colorbar=dict(x=0.45, len=0.9, title=dict(text="loss")), name=d, visible=(d == TRAIN)), 1, 1)
        owner.append(d)
        fig.add_trace(go.Surface(x=x, y=y, z=zc, colorscale="Viridis", showscale=False, cmin=float(np.nanmin(z)),
                                 cmax=hi, name=d, visible=(d == TRAIN)), 1, 2)  # full surface; colours to p95
        owner.append(d)
        views[d] = {"scene.zaxis.range": _z_range(z), "scene.camera": _camera(z)}
        pl = [r.point_losses.get(k, {}).get(d) for k in pnames] if r.point_losses else [None] * len(pnames)
        fig.add_trace(go.Scatter3d(x=pab[:, 0].tolist(), y=pab[:, 1].tolist(), z=pl, mode="markers+text",
                                   text=pnames, textposition=[_TEXT_POSITIONS[i % len(_TEXT_POSITIONS)]
                                                              for i in range(len(pnames))],
                                   textfont=dict(color="white", size=11),
                                   marker=dict(size=4, color="red", line=dict(color="white", width=1)),
                                   name=f"points ({d})", showlegend=False, visible=(d == TRAIN)), 1, 2)
        owner.append(d)
    for d in names:
        if d == TRAIN:
            continue
        c = colors[d]
        fig.add_trace(go.Contour(x=x, y=y, z=np.asarray(r.losses[d], dtype=float).tolist(), showscale=False,
                                 contours=dict(start=levels[d], end=levels[d], size=1, coloring="lines"),
                                 colorscale=[[0, c], [1, c]], line=dict(width=3, dash="dash" if d in r.ood else "solid"),
                                 name=f"{d} <= {levels[d]:.4g}", showlegend=True, visible=False), 1, 1)
        owner.append("overlay")
    fig.add_trace(go.Scatter(x=pab[:, 0].tolist(), y=pab[:, 1].tolist(), mode="markers", text=pnames,
                             marker=dict(symbol="x", size=9, color="red", line=dict(color="white", width=1)),
                             name="θ, minima and checkpoints", showlegend=False), 1, 1)
    owner.append(None)
    buttons = []
    for choice in names + ["overlay"]:
        vis = [o is None or o == choice or (choice == "overlay" and i in background) for i, o in enumerate(owner)]
        lab = "training loss" if choice == TRAIN else ("low-loss regions (all)" if choice == "overlay" else choice)
        buttons.append(dict(label=lab, method="update", args=[{"visible": vis}, views.get(choice, views[TRAIN])]))
    # the 2-D points' names: light on a dark box, pointed at from alternating sides (readable on any colour, apart)
    offsets = [(28, -22), (-28, 22), (-28, -22), (28, 22), (0, -30), (0, 30)]
    labels2d = [dict(x=float(a), y=float(b), xref="x", yref="y", text=n, showarrow=True, arrowcolor="white",
                     arrowwidth=1, ax=offsets[i % len(offsets)][0], ay=offsets[i % len(offsets)][1],
                     font=dict(color="white", size=11), bgcolor="rgba(0,0,0,0.65)", borderpad=2)
                for i, (n, (a, b)) in enumerate(zip(pnames, pab.tolist()))]
    frac = common_region(r, levels)
    fig.update_layout(
        title=(f"{label}: " if label else "") + _title(r) + f" | common low-loss region {100 * frac:.1f}% of grid",
        updatemenus=[dict(buttons=buttons, direction="down", x=0.0, xanchor="left", y=-0.12, yanchor="top",
                          active=names.index(TRAIN))],
        annotations=list(fig.layout.annotations) + labels2d + [dict(text="show:", x=0.0, xref="paper", xanchor="right",
                                                         y=-0.12, yref="paper", yanchor="top", showarrow=False)],
        scene=dict(xaxis_title="d1", yaxis_title="d2", zaxis=dict(title=dict(text="loss"), range=views[TRAIN][
            "scene.zaxis.range"]), camera=views[TRAIN]["scene.camera"], aspectmode="manual",
                   aspectratio=dict(x=1, y=1, z=0.75), domain=dict(x=[0.56, 0.98], y=[0.02, 0.98])),
        height=680, width=1250, margin=dict(t=90, b=120, l=60, r=60), legend=dict(x=0.25, y=-0.12, orientation="h"))
    fig.update_xaxes(title_text="d1", row=1, col=1)
    fig.update_yaxes(title_text="d2", scaleanchor="x", scaleratio=1, row=1, col=1)
    return fig


def html(r, path: str | Path, level=None, label: str | None = None) -> Path:
    """Write the interactive figure as one self-contained HTML file (plotly.js inline: works offline)."""
    from nexus_opt.files import atomic_path

    path = Path(path)
    with atomic_path(path, "--plot") as tmp:
        html_figure(r, level, label).write_html(str(tmp), include_plotlyjs=True, full_html=True, include_mathjax=False)
    return path
