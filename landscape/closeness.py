"""Closeness of per-domain minima: descend on each domain from a checkpoint, then measure where the minima lie."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from .gradsim import Progress, check_domains, domain_gradient, preserved
from .objective import Objective
from .params import get_flat, layer_slices, unflatten
from .result import Result

OPTIMIZERS = {"adam": 1e-3, "sgd": 1e-2, "lbfgs": 1.0}  # name -> default learning rate


@dataclasses.dataclass
class DescentResult(Result):
    """One domain's minimum found by full-batch descent from the checkpoint: `theta` in obj.params() order."""

    domain: str = ""
    theta: object = None  # flat float64 CPU tensor (a list after JSON)
    losses: list = dataclasses.field(default_factory=list)  # loss before step 1, after each step
    steps: int = 0  # steps taken
    converged: bool = False  # stopped by the plateau rule, not the step budget
    best_step: int = 0  # the iterate returned as theta: the lowest loss of the trace
    loss_min: float = 0.0  # L(theta) = losses[best_step]
    grad_norm: Optional[float] = None  # ||grad L|| at theta
    optimizer: str = "adam"
    lr: float = 0.0
    tol: float = 0.0
    window: int = 0
    seed: int = 0

    @property
    def loss_start(self) -> float:
        return self.losses[0]


@dataclasses.dataclass
class ClosenessResult(Result):
    """Where the per-domain minima near a checkpoint lie: distances, spread, cross-losses, barriers, Thm 3.1."""

    domains: list = dataclasses.field(default_factory=list)  # descended domains (rows of the matrices)
    columns: list = dataclasses.field(default_factory=list)  # every domain of the objective (cross_loss columns)
    ood: list = dataclasses.field(default_factory=list)  # which columns are OOD
    theta_norm: float = 0.0  # ||theta|| of the checkpoint
    train_loss: Optional[float] = None  # training loss at theta
    distance: dict = dataclasses.field(default_factory=dict)  # k -> {raw, relative, per_layer: {name: norm}}
    pairwise: list = dataclasses.field(default_factory=list)  # ||theta_i* - theta_j*||
    spread: float = 0.0  # sigma^2 = mean_k ||theta_k* - mean_j theta_j*||^2
    mean_sq_distance: float = 0.0  # (1/N) sum_k ||theta - theta_k*||^2
    center_distance: float = 0.0  # ||theta - mean_k theta_k*||
    loss_start: dict = dataclasses.field(default_factory=dict)  # L_k(theta)
    loss_min: dict = dataclasses.field(default_factory=dict)  # L_k(theta_k*)
    loss_drop: dict = dataclasses.field(default_factory=dict)  # L_k(theta) - L_k(theta_k*)
    cross_loss: list = dataclasses.field(default_factory=list)  # [i][j] = L_{columns[j]}(theta_{domains[i]}*)
    cross_train: dict = dataclasses.field(default_factory=dict)  # k -> training loss at theta_k*
    barrier: dict = dataclasses.field(default_factory=dict)  # k -> max_t L_k(line) - chord
    barrier_profile: dict = dataclasses.field(default_factory=dict)  # k -> L_k at barrier_points equispaced t
    curvature_along: dict = dataclasses.field(default_factory=dict)  # k -> u^T H_k u / u^T u, u = theta_k* - theta
    bound: dict = dataclasses.field(default_factory=dict)  # Theorem 3.1 at theta (see closeness())
    converged: dict = dataclasses.field(default_factory=dict)
    steps: dict = dataclasses.field(default_factory=dict)
    grad_norm_min: dict = dataclasses.field(default_factory=dict)  # ||grad L_k(theta_k*)||
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    minima: Optional[dict] = None  # k -> theta_k* as a list (keep_minima=True only)


# -- losses at flat weights --------------------------------------------------------------------------
def loss_at(obj: Objective, theta: torch.Tensor, domain: str | None) -> float:
    """A domain's full loss (or the training loss) at flat weights `theta`, without touching the model."""
    p = obj.params()
    named = unflatten(theta.to(device=obj.device, dtype=obj.dtype), p)
    with torch.no_grad():
        return float(sum(c * float(obj.functional_loss(named, b)) for c, b in obj.terms(domain)))


def _loss_grad(obj: Objective, leaves: dict, terms) -> float:
    """Full-batch loss at `leaves`; writes its gradient into each leaf's .grad (one graph per batch)."""
    total, grads = 0.0, [torch.zeros_like(v) for v in leaves.values()]
    for c, b in terms:
        loss = obj.functional_loss(leaves, b)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc.add_(g, alpha=c)
        total += c * float(loss.detach())
    for v, g in zip(leaves.values(), grads):
        v.grad = g
    return total


def descend(obj: Objective, domain: str | None, *, steps: int = 300, lr: float | None = None,
            optimizer: str = "adam", tol: float = 1e-6, window: int = 10, seed: int = 0,
            progress: Progress | None = None) -> DescentResult:
    """Full-batch single-domain descent from the current weights (on a copy) to the domain's nearby minimum.

    The loss is the domain's fixed batches weighted as obj.terms says (domain None/'train': the training loss),
    in eval mode, in the model's dtype on its device. `optimizer`: 'adam' (default lr 1e-3), 'sgd' (plain
    gradient descent, lr 1e-2) or 'lbfgs' (strong-Wolfe line search, lr 1.0; one iteration per step).
    Plateau rule: stop (converged=True) once the best loss so far improved by at most
    tol * max(|best|, total drop so far) over the last `window` steps. `theta` is the lowest-loss iterate
    (`best_step`; with Adam's oscillations not always the last). A non-finite loss, or a whole window of
    losses above the starting one, raises UserError (divergence).
    The caller's model is never moved.
    """
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}'; choose one of {sorted(OPTIMIZERS)}")
    if int(steps) < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"lr must be a positive number, got {lr}")
    if not tol >= 0 or int(window) < 1:
        raise UserError(f"tol must be >= 0 and window >= 1, got tol={tol}, window={window}")
    steps, window = int(steps), int(window)
    lr = float(OPTIMIZERS[optimizer] if lr is None else lr)
    terms = obj.terms(domain)  # validates the domain
    name = "train" if domain is None else str(domain)
    params = obj.params()
    if not params:
        raise UserError("the model has no trainable parameters")
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    vals = list(leaves.values())
    if optimizer == "adam":
        opt = torch.optim.Adam(vals, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(vals, lr=lr)
    else:
        # max_eval bounds the line search too (its default, 5/4 max_iter, would allow a single trial point)
        opt = torch.optim.LBFGS(vals, lr=lr, max_iter=1, max_eval=25, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        return _loss_grad(obj, leaves, terms)

    def check(value: float, t: int) -> None:
        if not math.isfinite(value):
            raise UserError(f"descent on domain '{name}' diverged (loss {losses[-1] if losses else value:.4g}, "
                            f"started at {losses[0] if losses else value:.4g}) by step {t}; lower --lr "
                            f"(was {lr:g}) or use --optimizer lbfgs")

    def flat() -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1) for v in vals]).clone()

    losses, best, converged = [], [], False  # best[t] = min(losses[:t + 1])
    best_theta, best_step = None, 0
    with preserved(obj, False, seed):
        for t in range(steps + 1):
            here = flat()
            if t == steps:  # the final iterate: evaluate only
                loss = closure()
            elif optimizer == "lbfgs":
                loss = float(opt.step(closure))
            else:
                opt.zero_grad(set_to_none=True)
                loss = closure()
                opt.step()
            check(loss, t)
            losses.append(loss)
            if not best or loss < best[-1]:
                best_theta, best_step = here, t
            best.append(min(loss, best[-1]) if best else loss)
            if progress and t < steps:
                progress(t + 1, steps, f"descend {name}")
            if t < steps and len(best) > window and (
                    best[-1 - window] - best[-1] <= tol * max(abs(best[-1]), losses[0] - best[-1])):
                if min(losses[-window:]) > losses[0]:  # a whole window above the start: blowing up
                    check(float("inf"), t)
                converged = True
                losses.append(closure())  # the iterate after this last step, for the trace
                check(losses[-1], t + 1)
                if losses[-1] < best[-1]:
                    best_theta, best_step = flat(), t + 1
                break
        if best_step != len(losses) - 1:  # .grad holds the last iterate's gradient; we need theta's
            with torch.no_grad():
                for v, w in zip(vals, unflatten(best_theta, leaves).values()):
                    v.copy_(w)
            _loss_grad(obj, leaves, terms)
        grad_norm = math.sqrt(sum(float(v.grad.double().pow(2).sum()) for v in vals))
    theta = best_theta.to(device="cpu", dtype=torch.float64)
    return DescentResult(domain=name, theta=theta, losses=losses, steps=len(losses) - 1, converged=converged,
                         best_step=best_step, loss_min=losses[best_step], grad_norm=grad_norm, optimizer=optimizer,
                         lr=lr, tol=float(tol), window=window, seed=int(seed))


def _num(x) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def closeness(obj: Objective, steps: int = 300, lr: float | None = None, optimizer: str = "adam", domains=None,
              seed: int = 0, keep_minima: bool = False, barrier_points: int = 11, curvature: bool = True,
              progress: Progress | None = None) -> ClosenessResult:
    """Closeness of the per-domain minima theta_k* found by `descend` from the checkpoint theta.

    Reports per domain k (default: the trained domains): ||theta - theta_k*|| (raw, relative to ||theta||,
    per layer); the pairwise matrix ||theta_i* - theta_j*||; the spread sigma^2 = (1/N) sum_k
    ||theta_k* - theta_bar||^2 with theta_bar = (1/N) sum_j theta_j* (unweighted, over the N descended
    domains) and the mean squared distance to the checkpoint (1/N) sum_k ||theta - theta_k*||^2; loss
    start/min/drop; cross_loss[i][j] = L_j(theta_i*) for every domain j (OOD included); the barrier
    max_t [L_k(theta + t(theta_k* - theta)) - ((1-t) L_k(theta) + t L_k(theta_k*))] over `barrier_points`
    equispaced t in [0, 1]; and the curvature u^T H_k(theta) u / u^T u along u = theta_k* - theta
    (landscape.hvp.curvature_along on domain k's loss, at the checkpoint).

    Theorem 3.1, evaluated at the checkpoint theta: g_k = grad L_k(theta) (full-batch), G = max_k ||g_k||,
    lambda_min = min_k of that curvature along theta - theta_k*, bound = G^2 / (N lambda_min^2) *
    sum_{i != j} (1 - cos(g_i, g_j)) over ordered pairs; measured = (1/N) sum_k ||theta - theta_k*||^2.
    The theorem assumes theta is a stationary point of the average loss, so `bound` also reports
    ||(1/N) sum_k g_k|| (stationarity) and the force balance sum_k ||g_k||^2 vs -sum_{i != j} g_i.g_j.
    The bound is null when lambda_min <= 0 or curvature=False. `minima` holds theta_k* only with keep_minima.
    """
    names = check_domains(obj, domains, obj.train_domains)
    if int(steps) < 1:
        raise UserError(f"steps must be at least 1: closeness descends from the checkpoint to each domain's "
                        f"minimum, got {steps}")
    seed = check_seed(seed, "seed")
    if int(barrier_points) < 2:
        raise UserError(f"barrier_points must be >= 2, got {barrier_points}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}'; choose one of {sorted(OPTIMIZERS)}")
    n_pts, N = int(barrier_points), len(names)
    params = obj.params()
    theta = get_flat(params, torch.float64).cpu()
    theta_norm = float(theta.norm())
    total = N * (int(steps) + 3)  # per domain: descent steps + 1, evaluation, curvature
    done = N * (int(steps) + 1)

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    runs: dict[str, DescentResult] = {}
    for k, d in enumerate(names):
        def sub(done, _tot, what, k=k):
            if progress:
                progress(k * (int(steps) + 1) + done, total, what)
        runs[d] = descend(obj, d, steps=steps, lr=lr, optimizer=optimizer, seed=seed, progress=sub)
        if progress:
            progress((k + 1) * (int(steps) + 1), total, f"descend {d}")
    minima = {d: runs[d].theta for d in names}

    slices = layer_slices(params)
    distance = {}
    for d in names:
        diff = minima[d] - theta
        raw = float(diff.norm())
        distance[d] = {"raw": raw, "relative": raw / theta_norm if theta_norm > 0 else None,
                       "per_layer": {n: float(diff[s].norm()) for n, s in slices.items()}}
    stack = torch.stack([minima[d] for d in names])
    pairwise = [[float((a - b).norm()) for b in stack] for a in stack]
    center = stack.mean(0)
    spread = float(((stack - center) ** 2).sum(1).mean())
    mean_sq = float(((stack - theta) ** 2).sum(1).mean())

    columns = list(obj.domains)
    with preserved(obj, False, seed):
        loss_start = {d: loss_at(obj, theta, d) for d in names}
        train_loss = loss_at(obj, theta, None)
        cross = [[loss_at(obj, minima[i], j) for j in columns] for i in names]
        cross_train = {i: loss_at(obj, minima[i], None) for i in names}
        loss_min = {d: cross[k][columns.index(d)] for k, d in enumerate(names)}
        ts = np.linspace(0.0, 1.0, n_pts)
        profile, barrier = {}, {}
        for d in names:
            vals = [loss_start[d] if t == 0 else loss_min[d] if t == 1 else
                    loss_at(obj, theta + float(t) * (minima[d] - theta), d) for t in ts]
            chord = (1 - ts) * loss_start[d] + ts * loss_min[d]
            profile[d] = vals
            barrier[d] = float(np.max(np.array(vals) - chord))
            tick(f"evaluate {d}")
        grads = {d: domain_gradient(obj, d)[0].cpu() for d in names}

    curv: dict[str, Optional[float]] = {d: None for d in names}
    if curvature:
        from .hvp import curvature_along  # the flatness module's Rayleigh quotients along flat directions
        dirs = [minima[d] - theta for d in names]
        for k, d in enumerate(names):
            if float(dirs[k].norm()) > 0:
                curv[d] = _num(float(curvature_along(obj, [dirs[k]], domain=d)[0]))
            tick(f"curvature {d}")
    else:
        for d in names:
            tick("curvature skipped")

    bound = _theorem31(names, grads, curv, mean_sq, curvature)
    return ClosenessResult(
        domains=names, columns=columns, ood=list(obj.ood), theta_norm=theta_norm, train_loss=train_loss,
        distance=distance, pairwise=pairwise, spread=spread, mean_sq_distance=mean_sq,
        center_distance=float((theta - center).norm()),
        loss_start=loss_start, loss_min=loss_min, loss_drop={d: loss_start[d] - loss_min[d] for d in names},
        cross_loss=cross, cross_train=cross_train, barrier=barrier, barrier_profile=profile, curvature_along=curv,
        bound=bound, converged={d: runs[d].converged for d in names}, steps={d: runs[d].steps for d in names},
        grad_norm_min={d: runs[d].grad_norm for d in names},
        settings={"steps": int(steps), "lr": runs[names[0]].lr, "optimizer": optimizer, "tol": runs[names[0]].tol,
                  "window": runs[names[0]].window, "barrier_points": n_pts, "curvature": bool(curvature),
                  "num_params": int(theta.numel()), "device": str(obj.device),
                  "dtype": str(obj.dtype).replace("torch.", "")},
        seed=int(seed), minima={d: minima[d].tolist() for d in names} if keep_minima else None)


def _theorem31(names: list[str], grads: dict, curv: dict, measured: float, curvature: bool) -> dict:
    """Theorem 3.1's bound at theta beside the measured mean squared distance, with its assumptions checked."""
    N = len(names)
    g = torch.stack([grads[d] for d in names])
    norms = g.norm(dim=1)
    G = float(norms.max())
    dots = g @ g.T
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots)).clamp(-1, 1)
    off = ~torch.eye(N, dtype=torch.bool)
    dissim = float((1 - cos)[off].sum())
    lam = [curv[d] for d in names]
    lam_min = min(lam) if curvature and all(v is not None for v in lam) else None
    out = {"measured": measured, "G": G, "grad_norms": {d: float(norms[k]) for k, d in enumerate(names)},
           "cos_dissimilarity": dissim, "lambda_min": lam_min, "N": N,
           "stationarity": float(g.mean(0).norm()),
           "force_balance": {"sum_sq_norms": float((norms ** 2).sum()), "minus_sum_cross": float(-dots[off].sum())},
           "value": None, "holds": None, "note": ""}
    if not curvature:
        out["note"] = "curvature=False: lambda_min not measured"
    elif lam_min is None:
        out["note"] = "a domain's minimum coincides with theta or its curvature is undefined"
    elif lam_min <= 0:
        out["note"] = "non-positive curvature along some theta - theta_k*: the bound does not apply"
    else:
        value = G ** 2 / (N * lam_min ** 2) * dissim
        out.update(value=value, holds=bool(measured <= value * (1 + 1e-9) + 1e-12),
                   note="evaluated at theta; the theorem assumes theta is a stationary point of the average loss")
    return out
