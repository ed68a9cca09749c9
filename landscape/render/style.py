"""One visual vocabulary for every figure: the domain palette (matplotlib and plotly alike), the optimizer
colours, and the labels of the demo's metrics (report tables and the CLI summary use the same words)."""
from __future__ import annotations

import re
from typing import Sequence

# matplotlib's tab10 as hex, so that plotly figures colour a domain exactly as the static ones do
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#7f7f7f"]
TRAIN_COLOR = "k"  # the training loss
OPTIMIZER_COLORS = {"adamw": "#d62728", "nexus": "#2ca02c", "sgd": "#9467bd",
                    "control": "#1f77b4", "nexus-parallel": "#1f77b4"}  # the control arm = nexus-parallel
NOT_CONVERGED = "#7f7f7f"
# A domain whose split-half self-cosine (the cosine between the gradients of two halves of its own batches) is
# below this is flagged: its gradient is mostly noise on these batches, so its cross-domain cosines are too.
LOW_SELF_COSINE = 0.1

# metric key -> (label, the direction the paper predicts for Nexus vs AdamW: -1 lower, +1 higher, 0 none)
METRICS = {
    "train_loss": ("training loss", 0),
    "ood_loss": ("OOD loss", -1),
    "mean_cosine": ("mean cross-domain gradient cosine", +1),
    "conflict_rate": ("conflict rate", -1),
    "spread": ("closeness spread sigma^2", -1),
    "mean_sq_distance": ("mean sq. distance to the minima (Thm 3.1 lhs)", -1),
    "thm31_bound": ("Thm 3.1 bound (rhs; n/a unless stationary, curvatures > 0)", -1),
    "alignment_rate": ("alignment rate: d cos / d step along Nexus's minus the control's direction", +1),
    "top_eigenvalue": ("top Hessian eigenvalue", -1),
    "trace": ("Hessian trace", -1),
}


def domain_label(name: str, ood=()) -> str:
    """A domain's name, marked '(OOD)' when held out -- unless the name already says so (a domain called 'ood')."""
    return name + (" (OOD)" if name in ood and not re.search(r"(?<![a-z])ood(?![a-z])", name.lower()) else "")


def color(i: int) -> str:
    """The i-th palette colour (cycling)."""
    return PALETTE[i % len(PALETTE)]


def domain_colors(names: Sequence[str], skip: Sequence[str] = ("train",)) -> dict[str, str]:
    """A stable colour per domain, in order of `names` (the training loss, in `skip`, is drawn in black)."""
    return {d: color(i) for i, d in enumerate(n for n in names if n not in skip)}


# the mechanism toy's arms (landscape.app.mechanism)
ARM_LABELS = {"adamw": "AdamW", "control": "control (Nexus parallel)", "nexus": "Nexus"}
