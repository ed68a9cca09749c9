"""Mode connectivity between two points of weight space: every domain's loss along the linear path and,
optionally, along a trained quadratic Bezier curve (Garipov et al. 2018), with the barrier of each.

Barrier (as `closeness`): max over the path's points t of L(gamma(t)) - ((1 - t) L(A) + t L(B)), the largest
excess of the loss over the chord between the endpoints' losses (>= 0; 0 for a path that never rises above
the chord). Endpoints: the objective's weights, another checkpoint (an Objective), a flat vector, or a domain
name (that domain's nearest minimum, by `closeness.descend` from the objective's weights, as closeness finds it).

Bezier: gamma(t) = (1-t)^2 A + 2t(1-t) C + t^2 B with the control point C (initialised at the midpoint)
trained by Adam on E_{t ~ U(0,1)} L_train(gamma(t)), one seeded t per step, the learning rate
`bezier_lr * ||B - A|| / sqrt(n)` per coordinate with a cosine decay.

BatchNorm: the running statistics of the first point's model are wrong for weights along the path; with
`bn=True` (default for a model with BatchNorm, in eval mode) every point's statistics are re-estimated by a
train-mode pass (cumulative averages, momentum None) over the training domains' batches before its losses
are evaluated, as Garipov et al. do; the curve is then trained in train mode (batch statistics). Without it
the path is evaluated through the surface engine (vmap over chunks where faster) with the first point's buffers.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed, domain_loss

from .objective import TRAIN, Objective, batch_rng
from .params import get_flat, set_flat, unflatten
from .result import Result, num

Progress = Callable[[int, int, str], None]


@dataclasses.dataclass
class ConnectResult(Result):
    """Losses along the path(s) between `endpoints`: `linear[d][k]` at t[k]; barriers per domain ('train' too)."""

    endpoints: list = dataclasses.field(default_factory=list)  # [name of A, name of B]
    t: list = dataclasses.field(default_factory=list)
    domains: list = dataclasses.field(default_factory=list)  # reported domains, 'train' last
    ood: list = dataclasses.field(default_factory=list)
    distance: float = 0.0  # ||B - A||
    linear: dict = dataclasses.field(default_factory=dict)  # domain -> losses along the segment
    barrier: dict = dataclasses.field(default_factory=dict)  # domain -> max_t L - chord on the segment
    barrier_t: dict = dataclasses.field(default_factory=dict)  # domain -> t of that maximum
    bezier: Optional[dict] = None  # domain -> losses along the trained curve (None: not asked)
    bezier_barrier: Optional[dict] = None
    bezier_t: Optional[dict] = None
    bezier_training: Optional[dict] = None  # steps, lr, final loss, loss history (every 10th step)
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0


def batchnorm_layers(model: torch.nn.Module) -> list:
    """The model's BatchNorm modules (any dimension)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def barrier(values, t) -> tuple[float | None, float | None]:
    """(max_k v[k] - chord(t[k]), t at the max) with the chord between the first and last values; None if non-finite."""
    v, t = np.asarray(values, dtype=float), np.asarray(t, dtype=float)
    if not np.isfinite(v).all():
        return None, None
    ex = v - ((1 - t) * v[0] + t * v[-1])
    k = int(np.argmax(ex))
    return float(max(ex[k], 0.0)), float(t[k])


def _point(p, obj: Objective, what: str, descend_steps: int, seed: int, train_mode: bool):
    from .surface.planes import flat_of

    if p is None:
        return get_flat(obj.params(), torch.float64), "theta"
    if isinstance(p, str):
        d = p[4:] if p.startswith("min:") else p
        if d not in obj.domains and d != TRAIN:
            raise UserError(f"connect {what} '{p}' is neither a point nor a domain; domains are {list(obj.domains)}")
        from .closeness import descend
        res = descend(obj, None if d == TRAIN else d, steps=descend_steps, seed=seed, train_mode=train_mode)
        if not res.converged:
            import warnings
            warnings.warn(f"the descent to the minimum of '{d}' stopped on its budget; the endpoint is not a minimum")
        return res.theta.to(obj.device).double(), f"min:{d}"
    return flat_of(p, obj), what


class _Losses:
    """Every domain's loss at flat weights W (rows): the surface engine, or per point with BatchNorm re-estimated."""

    def __init__(self, work: Objective, names: list[str], *, bn: bool, train_mode: bool, seed: int, batch: str,
                 chunk: Optional[int]):
        from .surface.engine import Evaluator, choose_batch

        self.work, self.names, self.bn, self.train_mode, self.seed = work, names, bn, train_mode, seed
        if not bn:
            mode = choose_batch(batch, work.device, work, names, chunk, train_mode)
            self.ev = Evaluator(work, names, mode, chunk, train_mode=train_mode, seed=seed)
            self.mode = self.ev.mode
        else:
            self.ev, self.mode = None, "loop (BatchNorm re-estimated per point)"
        self.bns = batchnorm_layers(work.model)

    def reestimate(self, w: torch.Tensor) -> None:
        """Load w into the private copy and recompute its BatchNorm statistics over the training batches."""
        set_flat(self.work.params(), w)
        moms = [m.momentum for m in self.bns]
        for m in self.bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        with self.work.evaluating(True), torch.no_grad():
            for key, _, b in self.work.keyed_terms(TRAIN):
                with batch_rng(self.seed, key, self.work.device):
                    self.work.loss_fn(self.work.model, b)
        for m, mo in zip(self.bns, moms):
            m.momentum = mo

    def __call__(self, W: torch.Tensor, tick) -> dict[str, np.ndarray]:
        if not self.bn:
            out = self.ev.at(W)
            tick(W.shape[0])
            return out
        out = {d: np.empty(W.shape[0]) for d in self.names}
        for i in range(W.shape[0]):
            self.reestimate(W[i])
            with self.work.evaluating(False), torch.no_grad():
                for d in self.names:
                    out[d][i] = domain_loss(self.work.model, self.work.domains[d], self.work.loss_fn)
            tick(1)
        return out


def _train_bezier(work: Objective, A, B, *, steps: int, lr: float, seed: int, train_mode: bool, tick) -> tuple:
    """The control point C minimising E_t L_train(gamma(t)) by Adam (seeded t per step, cosine-decayed lr)."""
    like = work.params()
    terms = work.keyed_terms(TRAIN)
    n = A.numel()
    step_lr = float(lr) * float((B - A).norm()) / math.sqrt(n)
    C = ((A + B) / 2).clone().requires_grad_(True)
    opt = torch.optim.Adam([C], lr=step_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(int(seed))
    history = []
    rng = seed if train_mode else None
    with work.evaluating(train_mode):
        for s in range(steps):
            t = float(torch.rand((), generator=gen, dtype=torch.float64))
            w = (1 - t) ** 2 * A + 2 * t * (1 - t) * C + t ** 2 * B
            p = unflatten(w, like)
            loss = 0.0
            for key, c, b in terms:
                with batch_rng(rng, key, work.device):
                    loss = loss + c * work.functional_loss(p, b).double()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if s % 10 == 0 or s == steps - 1:
                history.append(float(loss.detach()))
            tick(1)
    return C.detach(), {"steps": int(steps), "lr": step_lr, "lr_relative": float(lr), "history": history,
                        "final_sampled_loss": history[-1] if history else None}


def connect(obj: Objective, end=None, *, start=None, domains=None, params: str | None = None, seed: int = 0,
            progress: Progress | None = None, points: int = 21, bezier: bool = False, bezier_steps: int = 200,
            bezier_lr: float = 0.1, bn: bool | None = None, train_mode: bool = False, batch: str = "auto",
            chunk: int | None = None, descend_steps: int = 300,
            dtype: torch.dtype = torch.float64) -> ConnectResult:
    """Every domain's loss (and the training loss) along the segment from `start` to `end`, the barrier of each,
    and optionally a trained quadratic Bezier curve with its barriers (see the module docstring).

    start/end: None (the objective's weights), an Objective (another checkpoint of the same architecture), a flat
    vector or a domain name / 'min:<domain>' (its nearest minimum from the objective's weights). points: t values
    in [0, 1] (endpoints included). bn: None (auto: on for a model with BatchNorm in eval mode), True, False.
    domains, params, seed, train_mode, batch: as in `surface`. The caller's model is unchanged (a float64 copy).
    """
    t0 = time.perf_counter()
    seed = check_seed(seed, "seed")
    if end is None:
        raise UserError("connect needs an end point: a checkpoint, a flat vector or a domain name")
    if int(points) < 3:
        raise UserError(f"a path needs at least 3 points to show a barrier, got {points}")
    if bezier and int(bezier_steps) < 1:
        raise UserError(f"bezier_steps must be at least 1, got {bezier_steps}")
    if bezier and not (float(bezier_lr) > 0 and math.isfinite(float(bezier_lr))):
        raise UserError(f"bezier_lr must be a positive number, got {bezier_lr}")
    obj = obj.select(params)
    want = [d for d in obj.resolve_domains(domains, default="each", train="expand") if d != TRAIN]
    names = want + [d for d in obj.train_domains if d not in want]
    obj.validate(names, train_mode=train_mode)
    A, a_name = _point(start, obj, "start", descend_steps, seed, train_mode)
    B, b_name = _point(end, obj, "end", descend_steps, seed, train_mode)
    if a_name == b_name:
        a_name, b_name = "start", "end"
    if float((B - A).norm()) == 0:
        raise UserError("the path's two ends are the same point; pick distinct points")
    work = obj.to(dtype=dtype)
    A, B = A.to(device=work.device, dtype=dtype), B.to(device=work.device, dtype=dtype)
    has_bn = bool(batchnorm_layers(work.model))
    if bn is None:
        bn = has_bn and not train_mode
    elif bn and not has_bn:
        raise UserError("BatchNorm re-estimation asked for, but the model has no BatchNorm layer")
    elif bn and train_mode:
        raise UserError("BatchNorm re-estimation is for eval mode; in train mode every point uses batch statistics")
    t = np.linspace(0.0, 1.0, int(points))
    tt = torch.as_tensor(t, dtype=dtype, device=work.device)[:, None]
    total = len(t) * (2 if bezier else 1) + (int(bezier_steps) if bezier else 0)
    count = [0]

    def tick(k, what="path"):
        count[0] += k
        if progress:
            progress(count[0], total, what)

    from .surface.engine import train_loss

    with work.preserved(train_mode, seed):
        ev = _Losses(work, names, bn=bn, train_mode=train_mode, seed=seed, batch=batch, chunk=chunk)
        lin = ev(A[None] + tt * (B - A)[None], lambda k: tick(k, "linear path"))
        C, training, bez = None, None, None
        if bezier:
            C, training = _train_bezier(work, A, B, steps=int(bezier_steps), lr=bezier_lr, seed=seed,
                                        train_mode=train_mode or bn, tick=lambda k: tick(k, "Bezier curve"))
            W = (1 - tt) ** 2 * A[None] + 2 * tt * (1 - tt) * C[None] + tt ** 2 * B[None]
            bez = ev(W, lambda k: tick(k, "Bezier path"))
    lin[TRAIN] = train_loss(lin, work)
    report = want + [TRAIN]

    def barriers(vals):
        out = {d: barrier(vals[d], t) for d in report}
        return {d: v[0] for d, v in out.items()}, {d: v[1] for d, v in out.items()}

    lb, lt = barriers(lin)
    res = ConnectResult(endpoints=[a_name, b_name], t=t.tolist(), domains=report,
                        ood=[d for d in report if d in obj.ood], distance=float((B - A).norm()),
                        linear={d: [num(v) for v in lin[d]] for d in report}, barrier=lb, barrier_t=lt, seed=int(seed))
    if bezier:
        bez[TRAIN] = train_loss(bez, work)
        bb, bt = barriers(bez)
        res.bezier = {d: [num(v) for v in bez[d]] for d in report}
        res.bezier_barrier, res.bezier_t = bb, bt
        res.bezier_training = {**training, "control_distance_from_midpoint": float((C - (A + B) / 2).norm())}
    res.settings = {"points": int(points), "bezier": bool(bezier), "bezier_steps": int(bezier_steps) if bezier else None,
                    "bn_reestimated": bool(bn), "has_batchnorm": has_bn, "train_mode": bool(train_mode),
                    "evaluation": ev.mode, "device": str(work.device), "dtype": str(dtype).replace("torch.", ""),
                    "params": params, "barrier": "max_t L(t) - ((1-t) L(A) + t L(B)) over the path's points",
                    "bn_note": ("every point: BatchNorm statistics re-estimated over the training batches" if bn else
                                "the first point's BatchNorm statistics at every point" if has_bn else None)}
    res.seconds = time.perf_counter() - t0
    return res


__all__ = ["connect", "ConnectResult", "barrier", "batchnorm_layers"]
