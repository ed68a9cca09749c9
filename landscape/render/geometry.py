"""Static figures of the domain geometry: gradient-cosine heatmaps and closeness panels, checkpoints side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from nexus_opt.errors import UserError

from .style import NOT_CONVERGED, PALETTE, domain_label


def _as_dict(r) -> dict:
    """A result as a plain dict (a Result, or the dict read back from its JSON)."""
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


def _arr(rows) -> np.ndarray:
    """A JSON matrix (nulls allowed) as a float array with NaN for null."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def _labels(results: Sequence, labels: Sequence[str] | None) -> list[str]:
    if not results:
        raise UserError("nothing to plot: give at least one result")
    labels = list(labels) if labels is not None else [f"checkpoint {i + 1}" for i in range(len(results))]
    if len(labels) != len(results):
        raise UserError(f"{len(labels)} labels for {len(results)} results; give one label per result")
    return labels


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    return fig


def _text_color(v: float, vmax: float) -> str:
    return "white" if np.isfinite(v) and abs(v) > 0.6 * vmax else "black"


def gradsim_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Heatmaps of the domain-gradient cosine matrix (value +- bootstrap stderr), the diagonal showing the
    split-half noise floor; one panel per checkpoint, side by side on a shared [-1, 1] color scale."""
    labels = _labels(results, labels)
    rs = [_as_dict(r) for r in results]
    n = len(rs)
    k = max(len(r["domains"]) for r in rs)
    cell = 0.85 if k > 3 else 1.1
    fig = Figure(figsize=(max(3.2, cell * k + 1.6) * n + 1.2, max(3.0, cell * k + 1.3)), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)
    im = None
    for ax, r, lab in zip(axes[0], rs, labels):
        doms = r["domains"]
        cos = _arr(r["cosine"])
        se = _arr(r["cosine_stderr"]) if r.get("cosine_stderr") else None
        shown = cos.copy()
        np.fill_diagonal(shown, np.nan)  # the diagonal (trivially 1) is drawn gray and carries the noise floor
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.88")
        im = ax.imshow(shown, cmap=cmap, vmin=-1, vmax=1)
        for i in range(len(doms)):
            for j in range(len(doms)):
                if i == j:
                    floor = r.get("split_half", {}).get(doms[i])
                    txt = "floor\n" + ("n/a" if floor is None else f"{floor:.2f}")
                else:
                    txt = "n/a" if np.isnan(cos[i, j]) else f"{cos[i, j]:.2f}"
                    if se is not None and np.isfinite(se[i, j]):
                        txt += f"\n±{se[i, j]:.2f}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7 if k > 4 else 8,
                        color="black" if i == j else _text_color(cos[i, j], 1.0))
        ax.set_xticks(range(len(doms)), doms, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(doms)), doms)
        ax.set_xlabel("domain j", fontsize=8)
        ax.set_ylabel("domain i", fontsize=8)
        sub = []
        if r.get("mean_offdiag_cosine") is not None:
            sub.append(f"mean cos {r['mean_offdiag_cosine']:.3f}")
        if r.get("conflict_rate") is not None:
            sub.append(f"conflicts {100 * r['conflict_rate']:.0f}%")
        if r.get("loss", {}).get("train") is not None:
            sub.append(f"train loss {r['loss']['train']:.4f}")
        ax.set_title(lab + ("\n" + ", ".join(sub) if sub else ""), fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="cos(g_i, g_j) of domain gradients")
    fig.suptitle("gradient similarity (diagonal: split-half noise floor)", fontsize=10)
    return _save(fig, path)


def closeness_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Per checkpoint (a column each): bars of ||theta - theta_k*|| per domain, the pairwise
    ||theta_i* - theta_j*|| matrix, and the cross-loss heatmap L_j(theta_i*) (OOD columns included)."""
    labels = _labels(results, labels)
    rs = [_as_dict(r) for r in results]
    n = len(rs)
    k = max(len(r["domains"]) for r in rs)
    c = max(len(r["columns"]) for r in rs)
    w = max(3.6, 0.9 * max(k, c) + 1.8)
    fig = Figure(figsize=(w * n, 3.2 + 2 * max(3.0, 0.8 * k + 1.4)), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False, gridspec_kw={"height_ratios": [0.8, 1, 1]})
    dmax = max(max((r["distance"][d]["raw"] or 0.0) for d in r["domains"]) for r in rs) or 1.0
    pws = [_arr(r.get("pairwise") or [[None] * len(r["domains"])] * len(r["domains"])) for r in rs]
    pmax = max((float(np.nanmax(p)) if np.isfinite(p).any() else 0.0) for p in pws) or 1.0
    for col, (r, lab) in enumerate(zip(rs, labels)):
        doms, cols = r["domains"], r["columns"]
        ax = axes[0][col]
        vals = [r["distance"][d]["raw"] or 0.0 for d in doms]  # unconverged: no distance (gray, empty)
        bars = ax.bar(range(len(doms)), vals, color=[PALETTE[0] if r["converged_by_domain"].get(d) else NOT_CONVERGED for d in doms])
        for b, d in zip(bars, doms):
            rel = r["distance"][d].get("relative")
            ax.annotate((f"{b.get_height():.3g}" if r["distance"][d]["raw"] is not None else "n/a")
                        + (f"\n({100 * rel:.1f}%)" if rel is not None else ""),
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right")
        ax.set_ylim(0, dmax * 1.35)
        ax.set_ylabel("distance ||θ − θ_k*||")
        ax.set_xlabel("domain k", fontsize=8)
        bound = r.get("bound", {})
        sub = [f"σ² {r['spread']:.3g}" if r.get("spread") is not None else "σ² n/a (not converged)",
               f"mean sq dist {r['mean_sq_distance']:.3g}" if r.get("mean_sq_distance") is not None else "n/a"]
        if bound.get("value") is not None:
            sub.append(f"Thm 3.1 bound {bound['value']:.3g}")
        elif bound.get("applicable") is False:
            sub.append("Thm 3.1: not applicable (not stationary)")
        if r.get("train_loss") is not None:
            sub.append(f"train loss {r['train_loss']:.4f}")
        ax.set_title(lab + "\n" + ", ".join(sub[:2]) + "\n" + ", ".join(sub[2:]), fontsize=8)

        ax = axes[1][col]
        pw = pws[col]
        im1 = ax.imshow(pw, cmap="viridis", vmin=0, vmax=pmax)
        for i in range(len(doms)):
            for j in range(len(doms)):
                ax.text(j, i, "n/a" if np.isnan(pw[i, j]) else f"{pw[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if pw[i, j] < 0.6 * pmax else "black")
        ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right")
        ax.set_yticks(range(len(doms)), doms)
        ax.set_title("||θ_i* − θ_j*|| (n/a: a descent did not converge)", fontsize=8)
        ax.set_xlabel("minimum of domain j", fontsize=8)
        ax.set_ylabel("minimum of domain i", fontsize=8)
        fig.colorbar(im1, ax=ax, shrink=0.8, label="parameter distance ||θ_i* − θ_j*||")

        ax = axes[2][col]
        cl = _arr([row if row is not None else [None] * len(cols) for row in (r.get("cross_loss") or [None] * len(doms))])
        im2 = ax.imshow(cl, cmap="magma_r")
        hi = np.nanmax(cl) if np.isfinite(cl).any() else 1.0
        lo = np.nanmin(cl) if np.isfinite(cl).any() else 0.0
        for i in range(len(doms)):
            for j in range(len(cols)):
                ax.text(j, i, "n/a" if np.isnan(cl[i, j]) else f"{cl[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if cl[i, j] > lo + 0.6 * (hi - lo) else "black")
        ood = set(r.get("ood", []))
        ax.set_xticks(range(len(cols)), [domain_label(cname, ood) for cname in cols],
                      rotation=30, ha="right")
        ax.set_yticks(range(len(doms)), [f"θ*_{d}" for d in doms])
        ax.set_title("cross-loss L_j(θ_i*)", fontsize=8)
        ax.set_xlabel("loss of domain j", fontsize=8)
        ax.set_ylabel("at the minimum of domain i", fontsize=8)
        fig.colorbar(im2, ax=ax, shrink=0.8, label="loss L_j(θ_i*)")
    fig.suptitle("closeness of per-domain minima (gray bars: descent not converged)", fontsize=10)
    return _save(fig, path)
