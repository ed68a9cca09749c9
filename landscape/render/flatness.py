"""Figures of flatness results: the Hessian spectral density (log scale) with the extreme eigenvalues marked."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nexus_opt.errors import UserError

from .style import color


def _domains(result) -> dict[str, dict]:
    """Per-domain result dicts from a FlatnessResult, a FlatnessReport, or their JSON dicts."""
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    if "results" in d:
        d = d["results"]
        if not d:
            raise UserError("nothing to plot: the flatness report has no domains")
        return dict(d)
    if "domain" not in d:
        raise UserError("not a flatness result: expected the keys 'domain' or 'results'")
    return {d["domain"]: d}


def _matrix(title) -> str:
    """'GGN' when the title says the figure is of the Gauss-Newton matrix, else 'Hessian'."""
    return "GGN" if title and "GGN" in title else "Hessian"


def _floor(values: np.ndarray) -> float:
    """The lowest density shown on the log axis: 1e-6 of the peak (Gaussian tails below it are cut)."""
    top = float(np.max(values)) if values.size else 1.0
    return max(top * 1e-6, np.finfo(float).tiny)


def flatness_figure(result, path: str | Path | None = None, title: str | None = None):
    """Spectral density per domain (log y; overlaid when several) with the top eigenvalues as dashed lines and
    the bottom ones dotted; without a density, the eigenvalues on one axis per domain."""
    doms = _domains(result)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    has_density = any(r.get("density") for r in doms.values())
    floor = _floor(np.concatenate([np.asarray(r["density"]["values"]) for r in doms.values() if r.get("density")])
                   if has_density else np.ones(1))
    for i, (name, r) in enumerate(doms.items()):
        c = color(i)
        label = f"{name} (λmax {r['eigenvalues'][0]:.4g})" if r.get("eigenvalues") else name
        if has_density and r.get("density"):
            grid, vals = np.asarray(r["density"]["grid"]), np.asarray(r["density"]["values"])
            ax.semilogy(grid, np.where(vals >= floor, vals, np.nan), color=c, lw=1.4, label=label)
        elif not has_density:
            ys = np.full(len(r.get("eigenvalues") or []), i)
            ax.scatter(r.get("eigenvalues") or [], ys, color=c, marker="|", s=200, label=label)
            ax.scatter(r.get("bottom_eigenvalues") or [], np.full(len(r.get("bottom_eigenvalues") or []), i),
                       color=c, marker="|", s=200)
        for v in r.get("eigenvalues") or []:
            ax.axvline(v, color=c, ls="--", lw=0.8, alpha=0.8)
        for v in r.get("bottom_eigenvalues") or []:
            ax.axvline(v, color=c, ls=":", lw=0.8, alpha=0.8)
    if has_density:
        ax.set_ylabel("spectral density (log)")
        ax.set_ylim(bottom=floor)
    else:
        ax.set_yticks(range(len(doms)), list(doms))
        ax.set_ylim(-0.8, len(doms) - 0.2)
    from matplotlib.lines import Line2D

    ax.set_xlabel(f"{_matrix(title)} eigenvalue λ")
    ax.set_title(title or "Hessian spectrum")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", ls="--", lw=0.8, label="top eigenvalues"),
                Line2D([], [], color="0.3", ls=":", lw=0.8, label="bottom eigenvalues")]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.grid(alpha=0.25)
    if path is not None:
        if str(path).lower().endswith(".html"):
            flatness_html(result, path, title)
        else:
            from nexus_opt.files import atomic_path

            with atomic_path(path, "--plot") as tmp:
                fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return fig


def flatness_html_figure(result, title: str | None = None):
    """The same picture as an interactive plotly figure."""
    import plotly.graph_objects as go

    doms = _domains(result)
    fig = go.Figure()
    has_density = any(r.get("density") for r in doms.values())
    for i, (name, r) in enumerate(doms.items()):
        c = color(i)
        if has_density and r.get("density"):
            grid, vals = np.asarray(r["density"]["grid"]), np.asarray(r["density"]["values"])
            fig.add_trace(go.Scatter(x=grid, y=np.where(vals >= _floor(vals), vals, np.nan), name=name,
                                     line={"color": c}))
        for end, dash in (("eigenvalues", "dash"), ("bottom_eigenvalues", "dot")):
            for v in r.get(end) or []:
                fig.add_vline(x=v, line={"color": c, "dash": dash, "width": 1})
        if not has_density:
            xs = (r.get("eigenvalues") or []) + (r.get("bottom_eigenvalues") or [])
            fig.add_trace(go.Scatter(x=xs, y=[name] * len(xs), mode="markers", name=name,
                                     marker={"color": c, "symbol": "line-ns-open", "size": 18}))
    for dash, what in (("dash", "top eigenvalues"), ("dot", "bottom eigenvalues")):  # legend of the line styles
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=what,
                                 line={"color": "#555", "dash": dash, "width": 1}))
    fig.update_layout(title=title or "Hessian spectrum", xaxis_title=f"{_matrix(title)} eigenvalue λ",
                      template="plotly_white")
    if has_density:
        fig.update_yaxes(type="log", title="spectral density (log)")
    return fig


def flatness_html(result, path: str | Path, title: str | None = None) -> Path:
    """Write the interactive figure as a self-contained HTML file."""
    from nexus_opt.files import atomic_path

    path = Path(path)
    with atomic_path(path, "--plot") as tmp:
        flatness_html_figure(result, title).write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path
