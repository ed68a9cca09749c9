"""Sharpness at a checkpoint: the worst-case loss increase in a rho-ball and the average-case increase under
random Gaussian perturbations, per domain and for the training loss, with an absolute or adaptive radius.

Perturbations are delta = T u with ||u||_2 <= rho, where T is a fixed diagonal scaling (Andriushchenko and
Flammarion's adaptive sharpness): 'none' (T = I: Keskar et al.'s / SAM's absolute ball), 'elementwise'
(T = |theta|) or 'filter' (T = the norm of each output filter of theta: a row of a weight matrix, an output
channel of a conv; a 1-D parameter is one filter). An adaptive ball is invariant to rescalings of the weights
that leave the network's function unchanged (e.g. a ReLU layer scaled by a and the next by 1/a).

Worst case: max_{||u|| <= rho} L(theta + T u) - L(theta), by projected gradient ascent on u (`steps` steps of
`step * rho` along the normalised gradient, each followed by projection onto the ball), started from the
gradient's direction (a seeded random direction where the gradient vanishes). Every iterate is feasible, so
the best value found is a lower bound of the maximum; `worst_converged` is false when the last step still
improved it by more than `tol` (relative) or the last iterate fell below it (still oscillating): a result that
stopped on its step budget says so.
Average case: E_z[L(theta + T z)] - L(theta) with z ~ N(0, rho^2 I / n) (n = number of parameters, so
E||z||^2 = rho^2), estimated from `samples` antithetic pairs (z, -z) (the gradient term cancels exactly in each
pair), with the standard error over pairs; evaluated through the surface engine (vmap over chunks where faster).
At a minimum of a quadratic these are rho^2 lambda_max / 2 and rho^2 trace(H) / (2n) (tests).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from .objective import TRAIN, Objective, batch_rng
from .params import get_flat, unflatten
from .result import Result, num

Progress = Callable[[int, int, str], None]
ADAPTIVE = ("none", "elementwise", "filter")


@dataclasses.dataclass
class DomainSharpness(Result):
    """Sharpness of one domain's loss ('train' = the training loss) at the checkpoint."""

    domain: str = ""
    loss: Optional[float] = None  # L(theta)
    worst: Optional[float] = None  # best L(theta + delta) - L(theta) found in the ball (a lower bound of the max)
    worst_loss: Optional[float] = None  # L(theta + delta) there
    keskar: Optional[float] = None  # Keskar et al.'s epsilon-sharpness: 100 * worst / (1 + L(theta))
    worst_radius: Optional[float] = None  # ||T^-1 delta|| of the best delta (<= rho)
    worst_steps: int = 0
    worst_converged: Optional[bool] = None  # False: the ascent stopped on its step budget, still improving
    worst_history: list = dataclasses.field(default_factory=list)  # increase at each ascent iterate
    average: Optional[float] = None  # E[L(theta + T z)] - L(theta), z ~ N(0, rho^2 I / n)
    average_stderr: Optional[float] = None  # standard error over the antithetic pairs
    average_pairs: int = 0


@dataclasses.dataclass
class SharpnessResult(Result):
    """Sharpness per domain (and 'train'): `result['train'].worst`, `.average +- .average_stderr`."""

    domains: list = dataclasses.field(default_factory=list)
    ood: list = dataclasses.field(default_factory=list)
    results: dict = dataclasses.field(default_factory=dict)  # domain -> DomainSharpness
    rho: float = 0.05
    adaptive: str = "none"
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0

    def __getitem__(self, name: str) -> DomainSharpness:
        return self.results[name]

    @classmethod
    def from_dict(cls, d: dict) -> "SharpnessResult":
        r = super().from_dict(d)
        r.results = {k: v if isinstance(v, DomainSharpness) else DomainSharpness.from_dict(v)
                     for k, v in r.results.items()}
        return r


def scaling(params, adaptive: str = "none") -> torch.Tensor:
    """The diagonal T of the perturbation ball as a flat float64 vector (obj.params() order): ones ('none'),
    |theta| ('elementwise') or each output filter's norm ('filter'; a 1-D or scalar parameter is one filter)."""
    if adaptive not in ADAPTIVE:
        raise UserError(f"unknown adaptive scaling '{adaptive}'; choose one of {list(ADAPTIVE)}")
    w = get_flat(params, torch.float64)
    if adaptive == "none":
        return torch.ones_like(w)
    if adaptive == "elementwise":
        return w.abs()
    parts = []
    for p in params.values():
        q = p.detach().double()
        if q.dim() >= 2:
            rows = q.reshape(q.shape[0], -1)
            parts.append(rows.norm(dim=1, keepdim=True).expand_as(rows).reshape(-1))
        else:
            parts.append(q.reshape(-1).norm().expand(q.numel()))
    return torch.cat(parts).to(w.device)


def _project(u: torch.Tensor, rho: float) -> torch.Tensor:
    n = float(u.norm())
    return u if n <= rho else u * (rho / n)


def _ascent(work: Objective, name: str, theta: torch.Tensor, T: torch.Tensor, rho: float, steps: int, step: float,
            tol: float, seed: int, rng_seed: Optional[int], tick) -> dict:
    """Projected gradient ascent on u in ||u|| <= rho for L(theta + T u) of one domain (or 'train')."""
    like = work.params()
    terms = work.keyed_terms(name)
    dev = theta.device

    def value_grad(u: torch.Tensor) -> tuple[float, torch.Tensor]:
        u = u.detach().requires_grad_(True)
        p = unflatten(theta + T * u, like)
        total = 0.0
        for key, c, b in terms:
            with batch_rng(rng_seed, key, dev):
                total = total + c * work.functional_loss(p, b).double()
        (g,) = torch.autograd.grad(total, u)
        return float(total.detach()), g.detach()

    base, g = value_grad(torch.zeros_like(theta))
    tick()
    if not math.isfinite(base):
        raise UserError(f"the loss of '{name}' at the checkpoint is {base}; sharpness needs a finite loss")
    gn = float(g.norm())
    if gn > 1e-12 * max(1.0, abs(base)):
        u = g * (rho / gn)
    else:  # at a stationary point the gradient has no direction: a seeded random one
        gen = torch.Generator().manual_seed(int(seed))
        r = torch.randn(theta.numel(), generator=gen, dtype=torch.float64).to(dev) * (T != 0)
        if float(r.norm()) == 0:
            raise UserError("the perturbation ball is empty: the adaptive scaling is zero for every parameter")
        u = r * (rho / float(r.norm()))
    best, best_u, history, improved = -math.inf, u, [], math.inf
    for _ in range(int(steps)):
        val, g = value_grad(u)
        tick()
        inc = val - base
        history.append(inc if math.isfinite(inc) else float("nan"))
        if math.isfinite(inc) and inc > best:
            improved = inc - best if math.isfinite(best) else math.inf
            best, best_u = inc, u
        else:
            improved = 0.0
        gn = float(g.norm())
        if not math.isfinite(gn) or gn == 0:
            break
        u = _project(u + g * (step * rho / gn), rho)
    # converged: the last step improved the best by at most tol (relative) and the last iterate sits at the best
    # (an ascent still oscillating between sides of the maximum has not settled)
    last = history[-1] if history else float("nan")
    scale = max(abs(best), 1e-300) if math.isfinite(best) else 1.0
    converged = math.isfinite(best) and improved <= tol * scale and math.isfinite(last) and best - last <= tol * scale
    return {"loss": base, "worst": best if math.isfinite(best) else None,
            "worst_loss": base + best if math.isfinite(best) else None,
            "radius": float(best_u.norm()), "steps": len(history), "converged": bool(converged),
            "history": history}


def _average(work: Objective, names: list[str], want: list[str], theta: torch.Tensor, T: torch.Tensor, rho: float,
             pairs: int, seed: int, batch: str, chunk: Optional[int], train_mode: bool, tick) -> dict:
    """Antithetic Monte Carlo of E[L(theta + T z)] - L(theta), z ~ N(0, rho^2 I / n), every domain at once."""
    from .surface.engine import Evaluator, choose_batch, train_loss

    mode = choose_batch(batch, work.device, work, names, chunk, train_mode)
    ev = Evaluator(work, names, mode, chunk, train_mode=train_mode, seed=seed)
    n = theta.numel()
    sigma = rho / math.sqrt(n)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    base = ev.at(theta[None])
    base[TRAIN] = train_loss(base, work)
    sums = {d: [] for d in want}
    block = max(1, ev.chunk // 2)
    t0, done = time.perf_counter(), 0
    while done < pairs:
        k = min(block, pairs - done)
        Z = torch.randn(k, n, generator=gen, dtype=torch.float64).to(theta.device) * sigma
        delta = Z * T[None]
        vals = ev.at(torch.cat([theta[None] + delta, theta[None] - delta]))
        vals[TRAIN] = train_loss(vals, work)
        for d in want:
            v = np.asarray(vals[d], dtype=float)
            sums[d].extend(((v[:k] + v[k:]) / 2 - float(base[d][0])).tolist())
        done += k
        tick(k)
    el = time.perf_counter() - t0
    out = {}
    for d in want:
        s = np.asarray(sums[d])
        out[d] = (float(s.mean()), float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else None)
    return {"values": out, "base": {d: float(base[d][0]) for d in want}, "mode": ev.mode, "note": ev.note, "chunk": ev.chunk if ev.mode == "vmap" else None,
            "points_per_s": 2 * pairs / el if el > 0 else None}


def sharpness(obj: Objective, *, domains=None, params: str | None = None, seed: int = 0,
              progress: Progress | None = None, rho: float = 0.05, adaptive: str = "none", steps: int = 20,
              step: float = 2.0, tol: float = 1e-3, samples: int = 50, worst: bool = True, average: bool = True,
              train_mode: bool = False, batch: str = "auto", chunk: int | None = None,
              dtype: torch.dtype = torch.float64) -> SharpnessResult:
    """Worst-case and average-case sharpness of each domain's loss and the training loss (see the module).

    domains: Objective.resolve_domains spec (default every domain, OOD included, and 'train'). rho: the ball's
    radius in u (delta = T u); adaptive: 'none' | 'elementwise' | 'filter'. steps, step, tol: the ascent (steps
    of step*rho; converged when the last step improved the best by at most tol relative). samples: antithetic
    pairs of the average case (0: skip it; else at least 2). Works on a copy in `dtype` (float64: the loss
    increases are differences of nearly equal numbers); eval mode unless train_mode (batch k's dropout masks from
    objective.batch_seed(seed, k) at every point, BatchNorm batch statistics). The caller's model is unchanged.
    """
    t0 = time.perf_counter()
    seed = check_seed(seed, "seed")
    if adaptive not in ADAPTIVE:
        raise UserError(f"unknown adaptive scaling '{adaptive}'; choose one of {list(ADAPTIVE)}")
    try:
        rho = float(rho)
    except (TypeError, ValueError):
        raise UserError(f"rho must be a positive number, got {rho!r}") from None
    if not (rho > 0 and math.isfinite(rho)):
        raise UserError(f"rho must be a positive finite number, got {rho}")
    if int(steps) < 1 and worst:
        raise UserError(f"steps must be at least 1 for the worst case, got {steps}")
    if not (float(step) > 0 and math.isfinite(float(step))):
        raise UserError(f"step must be a positive multiple of rho, got {step}")
    if not (0 < float(tol) < 1):
        raise UserError(f"tol must be in (0, 1), got {tol}")
    if average and int(samples) < 2:
        raise UserError(f"samples (antithetic pairs) must be at least 2 for a standard error, got {samples}")
    if not (worst or average):
        raise UserError("nothing to measure: ask for the worst case, the average case or both")
    obj = obj.select(params)
    want = obj.resolve_domains(domains, default=["each", TRAIN], train="loss")
    evaluated = [d for d in want if d != TRAIN]
    evaluated += [d for d in obj.train_domains if TRAIN in want and d not in evaluated]
    obj.validate(evaluated, train_mode=train_mode)
    work = obj.to(dtype=dtype)
    theta = get_flat(work.params(), torch.float64).to(work.device)
    T = scaling(work.params(), adaptive).to(theta.device)
    total = (len(want) * (int(steps) + 1) if worst else 0) + (int(samples) if average else 0)
    count = [0]

    def tick(k: int = 1, what: str = "sharpness"):
        count[0] += k
        if progress:
            progress(count[0], total, what)

    rng_seed = seed if train_mode else None
    asc, avg = {}, None
    with work.preserved(train_mode, seed):
        if worst:
            for i, d in enumerate(want):
                asc[d] = _ascent(work, d, theta, T, rho, steps, step, tol, seed + i, rng_seed,
                                 lambda d=d: tick(1, f"worst case {d}"))
        if average:
            avg = _average(work, evaluated, want, theta, T, rho, int(samples), seed, batch, chunk, train_mode,
                           lambda k: tick(k, "average case"))
    results = {}
    for d in want:
        a = asc.get(d)
        loss = a["loss"] if a else None
        m, se = avg["values"][d] if avg else (None, None)
        if loss is None:
            loss = avg["base"][d]
        results[d] = DomainSharpness(
            domain=d, loss=num(loss) if loss is not None else None,
            worst=num(a["worst"]) if a and a["worst"] is not None else None,
            worst_loss=num(a["worst_loss"]) if a and a["worst_loss"] is not None else None,
            keskar=num(100 * a["worst"] / (1 + loss)) if a and a["worst"] is not None else None,
            worst_radius=a["radius"] if a else None, worst_steps=a["steps"] if a else 0,
            worst_converged=a["converged"] if a else None, worst_history=[num(v) for v in a["history"]] if a else [],
            average=num(m) if m is not None else None, average_stderr=num(se) if se is not None else None,
            average_pairs=int(samples) if avg else 0)
    settings = {"steps": int(steps), "step": float(step), "tol": float(tol), "samples": int(samples) if average else 0,
                "worst": bool(worst), "average": bool(average), "train_mode": bool(train_mode), "params": params,
                "num_params": int(theta.numel()), "dtype": str(dtype).replace("torch.", ""),
                "device": str(work.device), "batch": batch,
                "batch_used": avg["mode"] if avg else None, "batch_note": avg["note"] if avg else None,
                "chunk": avg["chunk"] if avg else None, "average_points_per_s": avg["points_per_s"] if avg else None,
                "ball": "||T^-1 delta||_2 <= rho", "average_covariance": "rho^2 T^2 / n (antithetic pairs)"}
    return SharpnessResult(domains=want, ood=[d for d in want if d in obj.ood], results=results, rho=rho,
                           adaptive=adaptive, settings=settings, seed=int(seed), seconds=time.perf_counter() - t0)


__all__ = ["sharpness", "SharpnessResult", "DomainSharpness", "scaling", "ADAPTIVE"]
