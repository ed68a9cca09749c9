"""Static figures of the domain geometry: gradient-cosine heatmaps and closeness panels, checkpoints side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from nexus_opt.errors import UserError

from .style import LOW_SELF_COSINE, NOT_CONVERGED, PALETTE, domain_label


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
        from nexus_opt.files import atomic_path

        with atomic_path(path, "--plot") as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return fig


def _text_color(v: float, vmax: float) -> str:
    return "white" if np.isfinite(v) and abs(v) > 0.6 * vmax else "black"


def gradsim_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Heatmaps of the domain-gradient cosine matrix (value +- bootstrap stderr), the diagonal showing each domain's
    split-half self-cosine: the ceiling a cosine with that domain can reach at its gradient noise (flagged, hatched,
    where it is below LOW_SELF_COSINE: the domain's gradient is noise there); one panel per checkpoint, side by
    side on a shared [-1, 1] color scale."""
    labels = _labels(results, labels)
    rs = [_as_dict(r) for r in results]
    n = len(rs)
    k = max(len(r["domains"]) for r in rs)
    cell = 0.85 if k > 3 else 1.1
    fig = Figure(figsize=(max(3.2, cell * k + 1.6) * n + 1.2, max(3.0, cell * k + 1.3)), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)
    im = None
    flagged = False
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
                    ceil = r.get("split_half", {}).get(doms[i])
                    txt = "ceiling\n" + ("n/a" if ceil is None else f"{ceil:.2f}")
                    if ceil is not None and ceil < LOW_SELF_COSINE:
                        txt += "\nnoise"
                        flagged = True
                        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx",
                                                                  edgecolor="#b8860b", lw=0))
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
    fig.suptitle("gradient similarity; diagonal: each domain's split-half self-cosine, the ceiling its cosines can "
                 "reach at this gradient noise" + (f"\n(hatched, 'noise': below {LOW_SELF_COSINE:g}, the domain's "
                                                   "gradient is mostly noise on these batches)" if flagged else ""),
                 fontsize=9)
    return _save(fig, path)


def _no_data(ax, text: str) -> None:
    """An empty panel that says why it is empty (no heatmap of NaNs, no placeholder colorbar)."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.35", wrap=True, transform=ax.transAxes)


def closeness_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Per checkpoint (a column each): bars of ||theta - theta_k*|| per domain (gray, hatched: the descent did not
    converge, drawn at how far it walked), the pairwise ||theta_i* - theta_j*|| matrix, and the cross-loss as the
    increase L_j(theta_i*) - L_j(theta) over the checkpoint's own loss (OOD columns, whose loss at theta closeness
    does not measure, as L_j(theta_i*)). A panel with nothing measured says so instead of drawing an empty map."""
    labels = _labels(results, labels)
    rs = [_as_dict(r) for r in results]
    n = len(rs)
    k = max(len(r["domains"]) for r in rs)
    c = max(len(r["columns"]) for r in rs)
    w = max(3.6, 0.9 * max(k, c) + 1.8)
    fig = Figure(figsize=(w * n, 3.2 + 2 * max(3.0, 0.8 * k + 1.4)), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False, gridspec_kw={"height_ratios": [0.8, 1, 1]})

    def walked(r, d):
        return (r.get("reached") or {}).get(d) or 0.0

    dmax = max(max(max(r["distance"][d]["raw"] or 0.0, walked(r, d)) for d in r["domains"]) for r in rs) or 1.0
    pws = [_arr(r.get("pairwise") or [[None] * len(r["domains"])] * len(r["domains"])) for r in rs]
    pmax = max((float(np.nanmax(p)) if np.isfinite(p).any() else 0.0) for p in pws) or 1.0
    any_unconverged = False
    for col, (r, lab) in enumerate(zip(rs, labels)):
        doms, cols = r["domains"], r["columns"]
        conv = r.get("converged_by_domain", {})
        ax = axes[0][col]
        for i, d in enumerate(doms):
            raw = r["distance"][d]["raw"]
            if conv.get(d) and raw is not None:
                b = ax.bar(i, raw, color=PALETTE[0])[0]
                rel = r["distance"][d].get("relative")
                txt = f"{raw:.3g}" + (f"\n({100 * rel:.1f}%)" if rel is not None else "")
            else:  # no minimum: a gray, hatched bar at how far the descent walked (the full height if it never moved)
                any_unconverged = True
                h = walked(r, d)
                b = ax.bar(i, h if h > 0 else dmax * 1.3, color=NOT_CONVERGED, alpha=0.55 if h > 0 else 0.25,
                           hatch="//", edgecolor="0.3", linewidth=0.5)[0]
                txt = "not converged\n" + (f"walked {h:.3g}" if h > 0 else "no step taken")
            y = b.get_height() if conv.get(d) or walked(r, d) > 0 else dmax * 0.55
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom" if y == b.get_height()
                        else "center", fontsize=7)
        ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(doms) - 0.4)
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
        if not np.isfinite(pw[~np.eye(len(doms), dtype=bool)]).any() if len(doms) > 1 else True:
            _no_data(ax, "||θ_i* − θ_j*||: not measured\n(a descent did not converge, so\nthere are no minima to compare)")
        else:
            im1 = ax.imshow(pw, cmap=matplotlib.colormaps["viridis"].with_extremes(bad="0.88"), vmin=0, vmax=pmax)
            for i in range(len(doms)):
                for j in range(len(doms)):
                    ax.text(j, i, "n/a" if np.isnan(pw[i, j]) else f"{pw[i, j]:.3g}", ha="center", va="center",
                            fontsize=7, color="white" if pw[i, j] < 0.6 * pmax else "black")
            ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right")
            ax.set_yticks(range(len(doms)), doms)
            ax.set_title("||θ_i* − θ_j*||" + (" (n/a: a descent did not converge)" if np.isnan(pw).any() else ""),
                         fontsize=8)
            ax.set_xlabel("minimum of domain j", fontsize=8)
            ax.set_ylabel("minimum of domain i", fontsize=8)
            fig.colorbar(im1, ax=ax, shrink=0.8, label="parameter distance ||θ_i* − θ_j*||")

        ax = axes[2][col]
        cl = _arr([row if row is not None else [None] * len(cols) for row in (r.get("cross_loss") or [None] * len(doms))])
        start = r.get("loss_start") or {}
        base = np.array([start.get(cname, np.nan) if start.get(cname) is not None else np.nan for cname in cols])
        inc = cl - base[None, :]  # the increase over the checkpoint's own loss; NaN where that loss is unknown
        ood = set(r.get("ood", []))
        if not np.isfinite(cl).any():
            _no_data(ax, "cross-losses: not measured\n(no descent converged)")
            continue
        lim = float(np.nanmax(np.abs(inc))) if np.isfinite(inc).any() else 1.0
        im2 = ax.imshow(inc, cmap=matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.9"), vmin=-lim, vmax=lim)
        for i in range(len(doms)):
            for j in range(len(cols)):
                if np.isnan(cl[i, j]):
                    txt = "n/a"
                elif np.isnan(inc[i, j]):
                    txt = f"{cl[i, j]:.3g}\n(loss)"
                else:
                    txt = f"{inc[i, j]:+.3g}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if np.isfinite(inc[i, j]) and abs(inc[i, j]) > 0.6 * lim else "black")
        ax.set_xticks(range(len(cols)), [domain_label(cname, ood) for cname in cols], rotation=30, ha="right")
        ax.set_yticks(range(len(doms)), [f"θ*_{d}" for d in doms])
        unknown = [cname for cname, b in zip(cols, base) if not np.isfinite(b)]
        ax.set_title("cross-loss increase L_j(θ_i*) − L_j(θ)" + (f"\n(gray {', '.join(unknown)}: L_j(θ_i*) itself, "
                                                                  "L_j(θ) not measured)" if unknown else ""),
                     fontsize=8)
        ax.set_xlabel("loss of domain j", fontsize=8)
        ax.set_ylabel("at the minimum of domain i", fontsize=8)
        fig.colorbar(im2, ax=ax, shrink=0.8, label="L_j(θ_i*) − L_j(θ)")
    fig.suptitle("closeness of per-domain minima" + (" (gray hatched bars: descent not converged, no minimum)"
                                                     if any_unconverged else ""), fontsize=10)
    return _save(fig, path)
