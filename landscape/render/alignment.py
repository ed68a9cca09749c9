"""The alignment analyzer's figure: the cosine's rate along Nexus's and the control's directions over gamma, and
the sizes of the expansion's terms (the remainder against gamma^3), one row per checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from .geometry import _as_dict, _labels, _save
from .style import OPTIMIZER_COLORS


def alignment_figure(results: Sequence, labels: Sequence[str] | None = None, path: str | Path | None = None):
    """Left: d(mean cosine)/dt per unit step along Nexus's and the control's directions vs gamma (error bars:
    the sampled orders' stderr). Right: |first|, |second|, |remainder| vs gamma on log axes."""
    labels = _labels(results, labels)
    rs = [_as_dict(r) for r in results]
    fig = Figure(figsize=(10, 3.4 * len(rs)))
    axes = fig.subplots(len(rs), 2, squeeze=False)
    for (a1, a2), r, lab in zip(axes, rs, labels):
        rows = r["per_gamma"]
        g = np.array([x["gamma"] for x in rows])

        def col(f):
            return np.array([np.nan if f(x) is None else f(x) for x in rows], dtype=float)

        se = col(lambda x: (x.get("stderr") or {}).get("rate_cosine.nexus"))
        a1.errorbar(g, col(lambda x: x["rate_cosine"]["nexus"]), yerr=None if np.all(np.isnan(se)) else se,
                    marker="o", color=OPTIMIZER_COLORS["nexus"], label="along Nexus's direction")
        a1.plot(g, col(lambda x: x["rate_cosine"]["control"]), marker="s", color=OPTIMIZER_COLORS["control"],
                label="along the control's")
        a1.plot(g, col(lambda x: None if x["rate_cosine"]["control"] is None
                       or x["rate_cosine"]["predicted_difference"] is None
                       else x["rate_cosine"]["control"] + x["rate_cosine"]["predicted_difference"]),
                ls=":", color="k", label="control + expansion's prediction")
        a1.set_xscale("log")
        a1.axhline(0, color="0.6", lw=0.8)
        a1.set_xlabel("gamma")
        a1.set_ylabel("d mean cosine / d step")
        mode = "exact over all orders" if r.get("exact") else f"{r.get('orders')} sampled orders"
        a1.set_title(f"{lab}: K={r.get('K')}, {mode}", fontsize=9)
        a1.legend(fontsize=7)
        for key, name, mk in (("norm_first", "|first| (control)", "s"), ("norm_second", "|second| (alignment)", "o"),
                              ("norm_remainder", "|remainder|", "^")):
            v = col(lambda x, key=key: x[key])
            ok = v > 0
            if ok.any():
                a2.plot(g[ok], v[ok], marker=mk, label=name)
        rem = col(lambda x: x["norm_remainder"])
        if (rem > 0).any():
            i = int(np.nanargmin(g))
            a2.plot(g, rem[i] * (g / g[i]) ** 3, ls=":", color="0.5", label="~ gamma^3")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.set_xlabel("gamma")
        a2.set_title("expansion terms of E[displacement]", fontsize=9)
        a2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
