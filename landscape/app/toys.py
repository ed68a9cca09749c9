"""Exact toys: the paper's Figure 2 (1-D parabolas) and a 2-D two-domain bowl with AdamW/Nexus trajectories."""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import torch

from nexus_opt.suites import Bowls, make_suite
from nexus_opt.train import TrainConfig, train

from ..result import Result


@dataclasses.dataclass
class Figure2Result(Result):
    """Training and target losses at x = 0 for the two Figure 2 configurations (computed, not read off)."""

    configs: dict  # preset -> {"minima": {...}, "c": ..., "train_loss_at_0": ..., "target_loss_at_0": ...}
    curvature: float
    note: str


def figure2() -> Figure2Result:
    """Reproduce Figure 2: same training loss (1.0) at x = 0, target loss 2.68 (sum) vs 1.10 (intersection)."""
    out = {}
    for preset in ("fig2-sum", "fig2-intersection"):
        s: Bowls = make_suite("bowls", options={"preset": preset})
        x0 = torch.zeros(1, dtype=torch.float64)
        out[preset] = {
            "minima": {d: float(s.m[d]) for d in s.domains},
            "c": s.c["target"],
            "train_loss_at_0": float(np.mean([s.loss(d, x0) for d in s.train_domains])),
            "target_loss_at_0": s.loss("target", x0),
        }
    return Figure2Result(out, curvature=8.0, note="L(x) = 8 (x - m)^2 + c; the paper's figure prints 2.67 for "
                                                  "the sum-of-minima target loss, 8*0.25 + 0.68 = 2.68 exactly")


@dataclasses.dataclass
class TrajectoryToyResult(Result):
    """A 2-D two-domain bowl: exact per-domain losses on a grid and the AdamW / Nexus paths over them."""

    x: list
    y: list
    losses: dict        # domain -> 2-D grid (rows = y), plus "train"
    minima: dict        # domain -> [x, y], plus "train" (the training-loss minimum)
    paths: dict         # optimizer -> [[x, y], ...] outer weights after every step (start included)
    final: dict         # optimizer -> {"train_loss", per-domain losses, distance to each minimum}
    settings: dict


def trajectory_toy(steps: int = 200, seed: int = 3, lr: float = 0.1, inner_lr: float = 0.05, accum: int = 4,
                   grid: int = 81) -> TrajectoryToyResult:
    """Train AdamW and Nexus on a 2-D two-bowl suite with the trainer and record every outer step."""
    opts = {"dim": 2, "n_domains": 2, "spread": 1.0}
    suite: Bowls = make_suite("bowls", seed=seed, options=opts)
    paths, final = {}, {}
    for name in ("adamw", "nexus"):
        path = [[1.0, 1.0]]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(suite="bowls", suite_options=opts, optimizer=name, lr=lr, inner_lr=inner_lr,
                              steps=steps, accum=accum, batch_size=1, warmup=0, weight_decay=0.0, seed=seed,
                              device="cpu", eval_every=steps, ckpt_every=steps, out=tmp)
            res = train(cfg, on_step=lambda _s, m: path.append(m.theta.detach().double().tolist()))
        theta = torch.tensor(path[-1], dtype=torch.float64)
        final[name] = {"train_loss": res["train_loss"], "losses": res["losses"],
                       "distance": {d: float((theta - suite.m[d]).norm()) for d in suite.domains}}
        paths[name] = path
    pts = np.array([p for ps in paths.values() for p in ps] + [suite.m[d].tolist() for d in suite.train_domains])
    lo, hi = pts.min(0) - 0.5, pts.max(0) + 0.5
    xs, ys = np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid)
    X, Y = np.meshgrid(xs, ys)
    P = np.stack([X, Y], -1)
    losses = {}
    for d in suite.domains:
        D = P - suite.m[d].numpy()
        losses[d] = 0.5 * np.einsum("...i,ij,...j->...", D, suite.A[d].numpy(), D) + suite.c[d]
    losses["train"] = sum(suite.weights[d] * losses[d] for d in suite.train_domains)
    minima = {d: suite.m[d].tolist() for d in suite.domains}
    minima["train"] = suite.minimum(None).tolist()
    return TrajectoryToyResult(xs.tolist(), ys.tolist(), losses, minima, paths, final,
                               {"suite": suite.spec(), "steps": steps, "lr": lr, "inner_lr": inner_lr,
                                "accum": accum, "seed": seed})
