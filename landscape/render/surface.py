"""Figures of loss surfaces: small multiples, the low-loss-region overlay, checkpoints side by side (PNG/SVG),
and a self-contained interactive plotly HTML (contour + 3-D surface, a button per domain).

The overlay draws each domain's low-loss region {L_d <= level_d} on the same plane in its own colour, so
their common part (an "intersection of minima") or its absence ("sum of minima") is visible. Levels
(`level=`): None or "rel:E" (default E = 0.1): level_d = min_d + E * L_train(origin) -- every domain gets
the same absolute tolerance above its own lowest grid value, a tenth of the training loss at the origin
point, so regions of different domains are comparable; a number X: level_d = min_d + X; "theta:E":
level_d = L_d(origin) * (1 + E) (each region then contains the origin by construction). The fraction
of the grid where every trained domain is inside its region is reported (`common_region`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from nexus_opt.errors import UserError

from ..objective import TRAIN
from .paths import draw_paths, path_handles
from .style import TRAIN_COLOR, domain_colors, domain_label


def origin_name(r) -> str:
    """The named point at plane coordinates (0, 0): 'theta' or the first checkpoint."""
    for k, v in r.points.items():
        if abs(v[0]) < 1e-12 and abs(v[1]) < 1e-12:
            return k
    return next(iter(r.points), "theta")


def _origin_loss(r, d: str) -> float:
    pl = r.point_losses.get(origin_name(r), {}) if r.point_losses else {}
    if d in pl and pl[d] is not None:
        return float(pl[d])
    x, y = np.asarray(r.x), np.asarray(r.y)
    return float(np.asarray(r.losses[d])[np.abs(y).argmin(), np.abs(x).argmin()])


def parse_level(level=None) -> tuple[str, float]:
    """(kind, E) of a level spec: None -> ('rel', 0.1); 'rel:E', 'theta:E', 'range:E' (min_d + E x the domain's
    range on the grid: outlines on a plane flatter than the default level), a number X -> ('abs', X).
    A UserError for anything else, and for a negative or non-finite E (no region could be drawn)."""
    spec = "rel:0.1" if level is None else level
    if isinstance(spec, str):
        kind, _, val = spec.partition(":")
        if not val:
            kind, val = "abs", spec
        try:
            e = float(val)
        except ValueError:
            kind = None
    else:
        kind, e = "abs", float(spec)
    if kind not in ("abs", "rel", "theta", "range"):
        raise UserError(f"level must be a number, 'rel:E', 'theta:E' or 'range:E', got '{spec}'")
    if not (np.isfinite(e) and e >= 0):
        raise UserError(f"level tolerance must be a finite number >= 0 (a negative one leaves every low-loss "
                        f"region empty), got '{spec}'")
    return kind, e


def nonfinite_cells(r) -> dict[str, int]:
    """Grid cells per domain whose loss is NaN or infinite (a diverging corner): drawn masked, counted."""
    return {d: int((~np.isfinite(np.asarray(z, dtype=float))).sum()) for d, z in r.losses.items()}


def mask_nonfinite(r):
    """A copy of a surface result whose non-finite cells are NaN (masked in every figure); a UserError when a
    domain has no finite cell at all (nothing could be drawn: the weights or the data are broken)."""
    import dataclasses

    losses = {}
    try:
        shape = (len(np.asarray(r.y, dtype=float).reshape(-1)), len(np.asarray(r.x, dtype=float).reshape(-1)))
        items = [(d, np.asarray(z, dtype=float)) for d, z in dict(r.losses).items()]
    except (TypeError, ValueError) as e:
        raise UserError(f"the surface is malformed ({type(e).__name__}); recompute it with `landscape plot-surface`") from None
    if not items:
        raise UserError("the surface has no loss values; recompute it with `landscape plot-surface`")
    for d, z in items:
        if z.shape != shape:
            raise UserError(f"the surface of '{d}' has shape {z.shape} but its grid is {shape[0]}x{shape[1]}; the "
                            "file is inconsistent: recompute it with `landscape plot-surface`")
        if z.size == 0 or not np.isfinite(z).any():
            raise UserError(f"the surface of '{d}' has no finite loss on its {z.size} grid cells; nothing can be "
                            "drawn: check the checkpoint's weights, or recompute with a smaller --span")
        losses[d] = np.where(np.isfinite(z), z, np.nan)
    return dataclasses.replace(r, losses=losses)


def resolve_levels(r, level=None) -> dict[str, float]:
    """Each domain's low-loss level for the overlay (see the module docstring for the forms of `level`)."""
    kind, e = parse_level(level)
    names = [d for d in r.losses if d != TRAIN]
    mins = {d: float(np.nanmin(np.where(np.isfinite(r.losses[d]), r.losses[d], np.nan))) for d in names}
    if kind == "abs":
        return {d: mins[d] + e for d in names}
    if kind == "range":
        return {d: mins[d] + e * (float(np.nanmax(np.asarray(r.losses[d], dtype=float))) - mins[d]) for d in names}
    if kind == "rel":
        base = abs(_origin_loss(r, TRAIN))
        if base == 0:
            t = np.asarray(r.losses[TRAIN])
            base = float(np.nanmax(t) - np.nanmin(t))
        return {d: mins[d] + e * base for d in names}
    return {d: _origin_loss(r, d) * (1 + e) for d in names}  # theta


def common_region(r, levels: Mapping[str, float]) -> float:
    """Fraction of grid nodes inside every trained domain's low-loss region (0: no common region on the grid)."""
    doms = [d for d in r.train_domains if d in levels] or [d for d in levels]
    inside = np.ones_like(np.asarray(r.losses[doms[0]]), dtype=bool)
    for d in doms:
        inside &= np.asarray(r.losses[d]) <= levels[d]
    return float(inside.mean())


def _mark_points(ax, r, colors: Mapping[str, str], legend: bool = True) -> None:
    """Theta / checkpoints as crosses and dots, minima as stars in their domain's colour; points off the plane
    (projected onto it) are drawn hollow."""
    pts = np.array(list(r.points.values()), dtype=float).reshape(-1, 2)
    center = pts.mean(axis=0) if len(pts) else np.zeros(2)
    extent = np.ptp(pts, axis=0) if len(pts) > 1 else np.ones(2)
    extent = np.where(extent > 0, extent, 1.0)
    placed: list[np.ndarray] = []
    quiet = draw_paths(ax, r, legend)  # trajectory plane: checkpoints between a path's ends are not labelled
    for name, (a, b) in ((n, ab) for n, ab in r.points.items() if n not in quiet):
        off = _offplane(r, name)
        if name.startswith("min:"):
            d = name[4:]
            c = colors.get(d, TRAIN_COLOR)
            ax.plot(a, b, marker="*", ms=13, color=c, mec=c if off else "k", mew=1.2 if off else 0.6, ls="none",
                    mfc="none" if off else c, label=(f"min {d}" + (" (projected)" if off else "")) if legend else None)
        else:
            ax.plot(a, b, marker="X" if name == "theta" else "o", ms=9, color="k", mec="k" if off else "w", ls="none",
                    mfc="none" if off else "k", label=name if legend else None)
            ax.annotate(name, (a, b), textcoords="offset points", xytext=_label_offset((a, b), center, extent, placed),
                        fontsize=7, ha="center", va="center",
                        arrowprops=dict(arrowstyle="-", color="0.35", lw=0.5, shrinkA=0, shrinkB=3))


def _offplane(r, name: str) -> bool:
    """The point lies off the plane (drawn hollow, at its projection)."""
    scale = max([abs(v) for ab in r.points.values() for v in ab] + [1.0]) * float(
        (r.normalization or {}).get("d1_norm") or 1.0)
    return float((r.offplane or {}).get(name) or 0.0) > 1e-6 * scale


def _label_offset(ab, center, extent, placed: list, radius: float = 22.0) -> tuple[float, float]:
    """A label offset (points) pointing away from the centre of the marked points, turned until it is clear of
    the labels already placed: a simple repulsion that keeps labels of nearby points apart (leader lines join)."""
    v = (np.asarray(ab, dtype=float) - center) / extent
    angle = float(np.arctan2(v[1], v[0])) if np.hypot(*v) > 1e-9 else np.pi / 4
    pos = np.asarray(ab, dtype=float) / extent * 200.0  # the point, roughly in points on a 200-point-wide axes
    for turn in (0, 1, -1, 2, -2, 3, -3, 4):
        th = angle + turn * np.pi / 4
        off = np.array([np.cos(th), np.sin(th)]) * radius
        spot = pos + off
        if all(np.hypot(*(spot - q)) > 14.0 for q in placed):
            break
    placed.append(spot)
    return float(off[0]), float(off[1])


def _clip_levels(z: np.ndarray, n: int = 30) -> tuple[np.ndarray, str]:
    """Filled-contour levels from the minimum to the 90th percentile (larger values share the top colour)."""
    lo, hi = float(np.nanmin(z)), float(np.nanpercentile(z, 90))
    if not hi > lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return np.linspace(lo, hi, n), "max"


def _axis_labels(ax, r) -> None:
    if named := (r.normalization or {}).get("axis_labels"):  # trajectory (explained variance), eigen planes
        [f(t, fontsize=8) for f, t in zip((ax.set_xlabel, ax.set_ylabel), named)]
    elif r.plane == "random":
        ax.set_xlabel("d1")
        ax.set_ylabel("d2")
    else:
        ax.set_xlabel(f"d1 ({_span_name(r, 0)} -> {_span_name(r, 1)})", fontsize=8)
        ax.set_ylabel(f"d2 (orthogonal, toward {_span_name(r, 2)})", fontsize=8)
    ax.set_aspect("equal", adjustable="box")


def _span_name(r, k: int) -> str:
    spanned = r.normalization.get("spanned_by") if isinstance(r.normalization, dict) else None
    return spanned[k] if spanned and len(spanned) > k else ("random" if k == 2 else f"point {k}")


def panels_figure(r, kind: str = "filled", path: str | Path | None = None) -> Figure:
    """Small multiples: every domain's loss and the training loss on the same grid (filled, contour or surface)."""
    if kind not in ("filled", "contour", "surface"):
        raise UserError(f"unknown panel kind '{kind}'; choose filled, contour or surface")
    names = [d for d in r.losses if d != TRAIN] + [TRAIN]
    colors = domain_colors(names)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.3 * cols, 3.9 * rows), layout="constrained")
    X, Y = np.meshgrid(np.asarray(r.x), np.asarray(r.y))
    for i, d in enumerate(names):
        z = np.asarray(r.losses[d], dtype=float)
        title = ("training loss" if d == TRAIN else domain_label(d, r.ood))
        if kind == "surface":
            ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
            hi = float(np.nanpercentile(z, 95))
            ax.plot_surface(X, Y, np.minimum(z, hi), cmap="viridis", linewidth=0, antialiased=True, alpha=0.9)
            a, b = (r.points.get("theta") or [0.0, 0.0])[:2]
            zt = r.point_losses.get("theta", {}).get(d) if r.point_losses else None
            if zt is not None and np.isfinite(zt):
                ax.plot([a, a], [b, b], [min(zt, hi), hi * 1.05], color="red", lw=1.2)  # a stem: visible above
                ax.scatter([a], [b], [hi * 1.05], color="red", marker="v", s=40, depthshade=False)
                ax.text(a, b, hi * 1.08, "θ", color="red", fontsize=9)
            ax.set_xlabel("d1")
            ax.set_ylabel("d2")
            ax.set_zlabel("loss")
        else:
            ax = fig.add_subplot(rows, cols, i + 1)
            lv, ext = _clip_levels(z)
            if kind == "filled":
                cs = ax.contourf(X, Y, z, levels=lv, cmap="viridis", extend=ext)
                ax.contour(X, Y, z, levels=lv[::5], colors="w", linewidths=0.4, alpha=0.6)
            else:
                cs = ax.contour(X, Y, z, levels=lv, cmap="viridis")
            fig.colorbar(cs, ax=ax, shrink=0.85, label="loss")
            _mark_points(ax, r, colors, legend=(i == 0))
            _axis_labels(ax, r)
        ax.set_title(title, fontsize=10)
    fig.suptitle(_title(r), fontsize=10)
    return _save(fig, path)


def _title(r, label: str | None = None) -> str:
    head = f"{label}: " if label else ""
    if r.plane == "random":
        n = r.normalization
        return (f"{head}random plane (seeds {n.get('seeds')}, {n.get('norm')}-normalised, bias {n.get('bias_used')}, "
                f"cos {n.get('cos', float('nan')):.1e})")
    return head + (r.normalization.get("title") or f"{r.plane} plane through {', '.join(r.normalization.get('spanned_by', []))}")


def overlay_axes(ax, r, level=None, label: str | None = None) -> dict:
    """Draw the low-loss regions of every domain on `ax`; returns the levels and the common-region fraction."""
    levels = resolve_levels(r, level)
    names = list(levels)
    colors = domain_colors(names)
    X, Y = np.meshgrid(np.asarray(r.x), np.asarray(r.y))
    t = np.asarray(r.losses[TRAIN], dtype=float)
    lv, ext = _clip_levels(t, 20)
    shade = ax.contourf(X, Y, t, levels=lv, cmap="Greys", alpha=0.35, extend=ext)
    ax.figure.colorbar(shade, ax=ax, shrink=0.8, ticks=lv[::4], format="%.5g", label="training loss (grey shading)")
    handles = []
    from matplotlib.lines import Line2D
    for d in names:
        z = np.asarray(r.losses[d], dtype=float)
        c = colors[d]
        ood = d in r.ood
        if np.nanmin(z) <= levels[d] <= np.nanmax(z):
            ax.contourf(X, Y, z, levels=[np.nanmin(z) - 1, levels[d]], colors=[c], alpha=0.0 if ood else 0.18)
            ax.contour(X, Y, z, levels=[levels[d]], colors=[c], linewidths=1.8, linestyles="--" if ood else "-")
        handles.append(Line2D([], [], color=c, ls="--" if ood else "-",
                              label=f"{domain_label(d, [d] if ood else [])} <= {levels[d]:.4g}"))
    _mark_points(ax, r, colors, legend=False)
    mins = [n for n in r.points if n.startswith("min:")]
    if any(not _offplane(r, n) for n in mins):
        handles.append(Line2D([], [], marker="*", ms=10, color="0.45", mec="k", mew=0.6, ls="none",
                              label="domain minimum (colour)"))
    if any(_offplane(r, n) for n in mins):
        handles.append(Line2D([], [], marker="*", ms=10, color="0.45", mfc="none", ls="none",
                              label="minimum off the plane (projected)"))
    handles += path_handles(r)
    frac = common_region(r, levels)
    # below the panel, outside the data (inside, it covered the regions it names)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    _axis_labels(ax, r)
    verdict = f"common low-loss region: {100 * frac:.1f}% of grid" if frac > 0 else "no common low-loss region"
    ax.set_title((f"{label}\n" if label else "") + verdict, fontsize=9)
    return {"levels": levels, "common_region": frac}


def overlay_figure(r, level=None, path: str | Path | None = None) -> Figure:
    """Each domain's low-loss region in its colour over the training loss, theta and minima marked."""
    fig = Figure(figsize=(6.4, 6.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    overlay_axes(ax, r, level)
    fig.suptitle(_title(r), fontsize=9)
    return _save(fig, path)


def compare_figure(results: Sequence, labels: Sequence[str] | None = None, level=None,
                   path: str | Path | None = None) -> Figure:
    """Overlays of several checkpoints side by side (e.g. sum of minima vs intersection of minima)."""
    if not results:
        raise UserError("nothing to compare: give at least one surface")
    results = [mask_nonfinite(r) for r in results]
    labels = list(labels) if labels else [f"checkpoint {i + 1}" for i in range(len(results))]
    if len(labels) != len(results):
        raise UserError(f"{len(labels)} labels for {len(results)} surfaces; give one label per surface")
    fig = Figure(figsize=(6.0 * len(results), 6.6), layout="constrained")
    for i, (r, lab) in enumerate(zip(results, labels)):
        overlay_axes(fig.add_subplot(1, len(results), i + 1), r, level, label=lab)
    return _save(fig, path)


def _save(fig: Figure, path) -> Figure:
    if path is not None:
        from nexus_opt.files import atomic_path

        with atomic_path(path, "--plot") as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return fig


def write_figures(r, stem: str | Path, formats: Sequence[str] = ("png", "svg"), level=None,
                  kind: str = "filled") -> list[Path]:
    """Panels (`stem.ext`) and overlay (`stem_overlay.ext`) in each format, plus `stem.html`; the paths."""
    stem = Path(stem)
    paths = []
    r = mask_nonfinite(r)
    for fig_fn, suffix in ((lambda p: panels_figure(r, kind, p), ""), (lambda p: overlay_figure(r, level, p), "_overlay")):
        fig = fig_fn(None)
        for ext in formats:
            p = stem.with_name(stem.name + suffix + "." + ext)
            _save(fig, p)
            paths.append(p)
    paths.append(html(r, stem.with_name(stem.name + ".html"), level=level))
    return paths


# -- interactive ----------------------------------------------------------------------------------------


def html_figure(r, level=None, label: str | None = None):
    """The interactive Plotly figure of a surface (see surface_html)."""
    from .surface_html import html_figure as make

    return make(r, level, label)


def html(r, path: str | Path, level=None, label: str | None = None) -> Path:
    """Write the interactive figure as one self-contained HTML file (see surface_html)."""
    from .surface_html import html as write

    return write(r, path, level, label)
