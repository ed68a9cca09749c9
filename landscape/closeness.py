"""Closeness of per-domain minima: descend on each domain from a checkpoint (landscape.descent), then measure
where the minima lie: distances, spread, cross-losses, barriers, curvature and Theorem 3.1's bound."""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from .descent import (DEFAULT_MAX_EVALS, NEAREST_MINIMUM, OPTIMIZERS, DescentResult, Progress,  # noqa: F401
                      _check_settings, descend, loss_at, optimizer_name)
from .gradients import domain_gradient
from .hvp import cpu_threads_for
from .objective import Objective
from .params import get_flat, layer_slices
from .result import Result, num


def proximal(obj: Objective, mu: float) -> Objective:
    """The objective with mu/2 ||theta - theta_ckpt||^2 added to every domain's loss (theta_ckpt: the weights
    now): its per-domain minimum is the proximal point of the domain loss, finite even where the loss itself
    decreases without bound (cross-entropy on a few memorisable batches), so a descent can converge. mu = 0:
    the objective itself."""
    if mu <= 0:
        return obj
    ref = {n: p.detach().to(torch.float64).clone() for n, p in obj.model.named_parameters()}
    base = obj.loss_fn

    def loss_fn(model, batch):
        pen = sum(((p - ref[n].to(p)) ** 2).sum() for n, p in model.named_parameters())
        return base(model, batch) + 0.5 * mu * pen

    out = Objective(obj.model, obj.domains, loss_fn, train_domains=obj.train_domains, weights=obj.weights,
                    ood=obj.ood, meta=dict(obj.meta, closeness_prox=mu))
    out.param_regex = getattr(obj, "param_regex", None)
    return out


def last_mlp_projection(obj: Objective) -> str | None:
    """A regex naming the last transformer block's MLP output projection (blocks.<last>.mlp.2.), or None."""
    import re

    blocks = sorted({int(m.group(1)) for n in obj.params() for m in [re.match(r"blocks\.(\d+)\.mlp\.2\.", n)] if m})
    return rf"blocks\.{blocks[-1]}\.mlp\.2\." if blocks else None


def suggest_objective(obj: Objective) -> dict | None:
    """The closeness settings that converge where the plain loss cannot, or None where the plain loss is fine:
    on the built-in byte-level text suite (cross-entropy with no finite minimum near the checkpoint; the
    Newton-CG descent of the whole loss runs for hours and does not converge) the demo's choice, the proximal
    objective (mu = 1) over the last MLP projection, to rtol 1e-6 within 600 evaluations per domain. Only when
    no parameter subset was chosen (a --params choice is the user's)."""
    spec = obj.meta.get("suite")
    name = spec.get("name") if isinstance(spec, dict) else None
    if name != "text" or getattr(obj, "param_regex", None) is not None:
        return None
    regex = last_mlp_projection(obj)
    if regex is None:
        return None
    return {"prox_mu": 1.0, "params": regex, "rtol": 1e-6, "max_evals": 600,
            "reason": "byte-level cross-entropy has no finite minimum near the checkpoint"}


@dataclasses.dataclass
class ClosenessResult(Result):
    """Where the per-domain minima near a checkpoint lie: distances, spread, cross-losses, barriers, Thm 3.1.

    Only converged descents are minima. For a domain whose descent did not converge, its distance, cross-loss
    row, barrier and curvature are null (`reached` keeps how far it walked, a number that is *not* the distance
    to a minimum), and every summary over domains (pairwise, spread, mean_sq_distance, center_distance, bound)
    is null unless every descent converged (`all_converged`)."""

    domains: list = dataclasses.field(default_factory=list)  # descended domains (rows of the matrices)
    columns: list = dataclasses.field(default_factory=list)  # every domain of the objective (cross_loss columns)
    ood: list = dataclasses.field(default_factory=list)  # which columns are OOD
    theta_norm: float = 0.0  # ||theta|| of the checkpoint
    train_loss: Optional[float] = None  # training loss at theta
    distance: dict = dataclasses.field(default_factory=dict)  # k -> {raw, relative, per_layer} (null: unconverged)
    reached: dict = dataclasses.field(default_factory=dict)  # k -> ||theta - end of descent|| (converged or not)
    pairwise: Optional[list] = None  # ||theta_i* - theta_j*|| (null entries: an unconverged domain)
    spread: Optional[float] = None  # sigma^2 = mean_k ||theta_k* - mean_j theta_j*||^2
    mean_sq_distance: Optional[float] = None  # (1/N) sum_k ||theta - theta_k*||^2
    center_distance: Optional[float] = None  # ||theta - mean_k theta_k*||
    loss_start: dict = dataclasses.field(default_factory=dict)  # L_k(theta)
    loss_min: dict = dataclasses.field(default_factory=dict)  # L_k at the end of the descent (the minimum if converged)
    loss_drop: dict = dataclasses.field(default_factory=dict)  # L_k(theta) - loss_min[k]
    cross_loss: Optional[list] = None  # [i][j] = L_{columns[j]}(theta_{domains[i]}*) (null rows: unconverged)
    cross_train: dict = dataclasses.field(default_factory=dict)  # k -> training loss at theta_k* (null: unconverged)
    barrier: dict = dataclasses.field(default_factory=dict)  # k -> max_t L_k(line) - chord
    barrier_profile: dict = dataclasses.field(default_factory=dict)  # k -> L_k at barrier_points equispaced t
    curvature_along: dict = dataclasses.field(default_factory=dict)  # k -> u^T H_k u / u^T u, u = theta_k* - theta
    bound: dict = dataclasses.field(default_factory=dict)  # Theorem 3.1 at theta (see closeness())
    converged: bool = False  # every descent reached its minimum (the summaries are then all measured)
    converged_by_domain: dict = dataclasses.field(default_factory=dict)  # k -> that domain's descent converged
    steps: dict = dataclasses.field(default_factory=dict)
    evals: dict = dataclasses.field(default_factory=dict)  # k -> gradient/HVP/loss evaluations spent
    stop: dict = dataclasses.field(default_factory=dict)  # k -> why the descent stopped
    grad_norm_min: dict = dataclasses.field(default_factory=dict)  # ||grad L_k(theta_k*)||
    grad_norm_start: dict = dataclasses.field(default_factory=dict)  # ||grad L_k(theta)||
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    minima: Optional[dict] = None  # k -> theta_k* as a list (keep_minima=True only)
    seconds: float = 0.0  # wall-clock time of the whole measurement

    @property
    def all_converged(self) -> bool:
        """Every descent reached its minimum: `converged` (kept for older callers)."""
        return bool(self.converged)

    @classmethod
    def from_dict(cls, d: dict) -> "ClosenessResult":
        d = dict(d)
        if isinstance(d.get("converged"), dict):  # written before `converged_by_domain` existed
            d["converged_by_domain"] = d["converged"]
            d["converged"] = bool(d["converged"]) and all(d["converged"].values())
        return super().from_dict(d)


def closeness(obj: Objective, *, domains=None, params: str | None = None, seed: int = 0,
              progress: Progress | None = None, steps: int | None = None, lr: float | None = None,
              optimizer: str = "newton-cg", keep_minima: bool = False, barrier_points: int = 11,
              curvature: bool = True, max_evals: int | None = None, rtol: float = 1e-8,
              atol: float = 1e-12, train_mode: bool = False, prox_mu: float = 0.0) -> ClosenessResult:
    """Closeness of the per-domain minima theta_k* found by `descend` from the checkpoint theta (see
    NEAREST_MINIMUM for what the minimum is and how convergence is decided).

    Reports per domain k (default: the trained domains): ||theta - theta_k*|| (raw, relative to ||theta||,
    per layer); the pairwise matrix ||theta_i* - theta_j*||; the spread sigma^2 = (1/N) sum_k
    ||theta_k* - theta_bar||^2 with theta_bar = (1/N) sum_j theta_j* (unweighted, over the N descended
    domains) and the mean squared distance to the checkpoint (1/N) sum_k ||theta - theta_k*||^2; loss
    start/min/drop; cross_loss[i][j] = L_j(theta_i*) for every domain j (OOD included); the barrier
    max_t [L_k(theta + t(theta_k* - theta)) - ((1-t) L_k(theta) + t L_k(theta_k*))] over `barrier_points`
    equispaced t in [0, 1]; and the curvature u^T H_k(theta) u / u^T u along u = theta_k* - theta
    (landscape.hvp.curvature_along on domain k's loss, at the checkpoint).

    Theorem 3.1, at the checkpoint theta: g_k = grad L_k(theta) (full-batch), G = max_k ||g_k||,
    lambda_min = min_k of that curvature along theta - theta_k*, bound = G^2 / (N lambda_min^2) *
    sum_{i != j} (1 - cos(g_i, g_j)) over ordered pairs; measured = (1/N) sum_k ||theta - theta_k*||^2.
    The theorem assumes theta is a stationary point of the average loss: `bound` reports ||(1/N) sum_k g_k||
    (stationarity), its ratio to the mean ||g_k|| and the force balance sum_k ||g_k||^2 vs -sum_{i != j} g_i.g_j;
    `value` and `holds` are set only where that ratio is at most STATIONARY_RTOL (`applicable`), otherwise the
    bound is 'not applicable' and the formula's number is kept as `evaluated`.
    The bound is null when lambda_min <= 0 or curvature=False. `minima` holds theta_k* only with keep_minima.
    Unconverged descents: see ClosenessResult (their numbers are null, never printed as minima).
    `domains`: see Objective.resolve_domains ('train' = the trained domains, the default); `params`: a regex
    restricting the descended parameters (Objective.select); the others stay at the checkpoint.
    `train_mode`: every number (descents, losses, cross-losses, barriers, gradients, curvature) is of the one
    train-mode objective whose batch k draws its dropout masks from objective.batch_seed(seed, k) (see
    `descend`); `optimizer`: newton-cg, lbfgs, adamw ('adam' accepted) or sgd. The caller's model, buffers,
    flags and RNG are unchanged. `prox_mu` > 0: every domain's loss gets mu/2 ||theta - theta_ckpt||^2 added
    (`proximal`), whose minimum is finite where the loss has none near the checkpoint (byte-level cross-entropy);
    every number is then of that objective. `suggest_objective` says when and what the CLI uses by default.
    """
    t0 = time.perf_counter()
    if prox_mu is None or not (float(prox_mu) >= 0.0) or float(prox_mu) == float("inf"):
        raise UserError(f"prox_mu must be a finite number >= 0, got {prox_mu}")
    obj = proximal(obj, float(prox_mu))
    obj = obj.select(params)
    regex = params
    names = obj.resolve_domains(domains, default="train", train="expand")
    _check_settings(optimizer, steps, max_evals, lr, rtol, atol)
    optimizer = optimizer_name(optimizer)
    train_mode = bool(train_mode)
    if steps is not None and int(steps) < 1:
        raise UserError(f"steps must be at least 1: closeness descends from the checkpoint to each domain's "
                        f"minimum, got {steps}")
    seed = check_seed(seed, "seed")
    if int(barrier_points) < 2:
        raise UserError(f"barrier_points must be >= 2, got {barrier_points}")
    obj.validate(list(dict.fromkeys(names + list(obj.domains))), train_mode=train_mode)  # every column, later
    n_pts, N = int(barrier_points), len(names)
    params = obj.params()
    theta = get_flat(params, torch.float64).cpu()
    theta_norm = float(theta.norm())
    budget = int(max_evals) if max_evals is not None else DEFAULT_MAX_EVALS[optimizer]
    if steps is not None and optimizer in ("adamw", "sgd") and max_evals is None:
        budget = int(steps) + 1
    total = N * (budget + 2)  # per domain: the descent's budget, evaluation, curvature
    done = N * budget

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    runs: dict[str, DescentResult] = {}
    with cpu_threads_for(obj.num_params(), obj.device):
        for k, d in enumerate(names):
            def sub(used, _tot, what, k=k):
                if progress:
                    progress(k * budget + used, total, what)
            runs[d] = descend(obj, d, steps=steps, lr=lr, optimizer=optimizer, max_evals=budget, rtol=rtol,
                              atol=atol, seed=seed, validate=False, progress=sub, train_mode=train_mode)
            if progress:
                progress((k + 1) * budget, total, f"descend {d}")
    ends = {d: runs[d].theta for d in names}
    conv = {d: bool(runs[d].converged) for d in names}
    ok = [d for d in names if conv[d]]
    everyone = len(ok) == N

    slices = layer_slices(params)
    distance, reached = {}, {}
    for d in names:
        diff = ends[d] - theta
        raw = float(diff.norm())
        reached[d] = raw
        distance[d] = ({"raw": raw, "relative": raw / theta_norm if theta_norm > 0 else None,
                        "per_layer": {n: float(diff[s].norm()) for n, s in slices.items()}} if conv[d]
                       else {"raw": None, "relative": None, "per_layer": None})
    pairwise = [[float((ends[a] - ends[b]).norm()) if conv[a] and conv[b] else None for b in names] for a in names]
    spread = mean_sq = center_dist = None
    if everyone:
        stack = torch.stack([ends[d] for d in names])
        center = stack.mean(0)
        spread = float(((stack - center) ** 2).sum(1).mean())
        mean_sq = float(((stack - theta) ** 2).sum(1).mean())
        center_dist = float((theta - center).norm())

    columns = list(obj.domains)
    rng = seed if train_mode else None  # train mode: each batch's masks from batch_seed(seed, key), as the descent
    # train mode: losses and gradients on a float64 copy as the descent saw them (on an accelerator a dropout
    # mask drawn from one seed may depend on the dtype); eval mode: the model as it is
    ev = obj.to(dtype=torch.float64) if train_mode and obj.dtype != torch.float64 else obj

    def at(x, d):
        return loss_at(ev, x, d, seed=rng)
    with ev.preserved(train_mode, seed):
        loss_start = {d: at(theta, d) for d in names}
        train_loss = at(theta, None)
        cross = [[at(ends[i], j) for j in columns] if conv[i] else None for i in names]
        cross_train = {i: at(ends[i], None) if conv[i] else None for i in names}
        loss_min = {d: at(ends[d], d) for d in names}
        ts = np.linspace(0.0, 1.0, n_pts)
        profile, barrier = {}, {}
        for d in names:
            if conv[d]:
                vals = [loss_start[d] if t == 0 else loss_min[d] if t == 1 else
                        at(theta + float(t) * (ends[d] - theta), d) for t in ts]
                chord = (1 - ts) * loss_start[d] + ts * loss_min[d]
                profile[d] = vals
                barrier[d] = float(np.max(np.array(vals) - chord))
            else:
                profile[d], barrier[d] = None, None
            tick(f"evaluate {d}")
        grads = {d: domain_gradient(ev, d, seed=rng)[0].cpu().to(torch.float64) for d in names}

    curv: dict[str, Optional[float]] = {d: None for d in names}
    if curvature:
        from .hvp import curvature_along  # the flatness module's Rayleigh quotients along flat directions
        for d in names:
            u = ends[d] - theta
            if conv[d] and float(u.norm()) > 0:
                curv[d] = num(float(curvature_along(obj, [u], domain=d, train_mode=train_mode, seed=seed)[0]))
            tick(f"curvature {d}")
    else:
        for d in names:
            tick("curvature skipped")

    bound = _theorem31(names, grads, curv, mean_sq, curvature)
    if not everyone:
        bound.update(value=None, holds=None, lambda_min=None, measured=None,
                     note=f"descent did not converge on {[d for d in names if not conv[d]]}: no minima to compare")
    first = runs[names[0]]
    return ClosenessResult(
        domains=names, columns=columns, ood=list(obj.ood), theta_norm=theta_norm, train_loss=train_loss,
        distance=distance, reached=reached, pairwise=pairwise,
        spread=spread, mean_sq_distance=mean_sq, center_distance=center_dist,
        loss_start=loss_start, loss_min=loss_min, loss_drop={d: loss_start[d] - loss_min[d] for d in names},
        cross_loss=cross, cross_train=cross_train, barrier=barrier, barrier_profile=profile, curvature_along=curv,
        bound=bound, converged=everyone, converged_by_domain=conv, steps={d: runs[d].steps for d in names},
        evals={d: runs[d].evals for d in names}, stop={d: runs[d].stop for d in names},
        grad_norm_min={d: runs[d].grad_norm for d in names},
        grad_norm_start={d: runs[d].grad_norm_start for d in names},
        settings={"steps": steps, "max_evals": budget, "lr": first.lr, "optimizer": optimizer, "rtol": float(rtol),
                  "atol": float(atol), "tol": first.tol, "window": first.window, "barrier_points": n_pts,
                  "curvature": bool(curvature), "num_params": int(theta.numel()), "device": str(obj.device),
                  "dtype": str(obj.dtype).replace("torch.", ""), "descent_dtype": "float64", "params": regex,
                  "keep_minima": bool(keep_minima), "train_mode": train_mode, "prox_mu": float(prox_mu)},
        seed=int(seed), seconds=time.perf_counter() - t0, minima={d: ends[d].tolist() for d in names if conv[d]} if keep_minima else None)


STATIONARY_RTOL = 0.05  # Theorem 3.1 applies where ||(1/N) sum_k g_k|| <= this fraction of (1/N) sum_k ||g_k||


def stationarity_check(grads, rtol: float = STATIONARY_RTOL) -> dict:
    """Is theta a stationary point of the average loss, as Theorem 3.1 assumes? The criterion, stated: the mean
    domain gradient's norm is at most `rtol` of the mean of the domain gradients' norms (the per-domain gradients
    nearly cancel), or every domain gradient is zero. Returns the two norms, their ratio and the verdict."""
    g = torch.stack(list(grads))
    mean_norm = float(g.mean(0).norm())
    scale = float(g.norm(dim=1).mean())
    rel = mean_norm / scale if scale > 0 else 0.0
    return {"stationarity": mean_norm, "mean_grad_norm": scale, "relative_stationarity": rel,
            "applicable": bool(rel <= rtol),
            "criterion": f"||(1/N) sum_k g_k|| <= {rtol:g} * (1/N) sum_k ||g_k|| (a stationary point of the "
                         f"average loss)"}


def _theorem31(names: list[str], grads: dict, curv: dict, measured: float, curvature: bool) -> dict:
    """Theorem 3.1's bound at theta beside the measured mean squared distance, with its assumptions checked: the
    bound is reported (value, holds) only where theta is a stationary point by `stationarity_check`; elsewhere it
    is 'not applicable' and the number the formula gives is kept apart as `evaluated`."""
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
    lam_min = min(lam) if curvature and all(v is not None for v in lam) and measured is not None else None
    st = stationarity_check([grads[d] for d in names])
    out = {"measured": measured, "G": G, "grad_norms": {d: float(norms[k]) for k, d in enumerate(names)},
           "cos_dissimilarity": dissim, "lambda_min": lam_min, "N": N, **st,
           "force_balance": {"sum_sq_norms": float((norms ** 2).sum()), "minus_sum_cross": float(-dots[off].sum())},
           "value": None, "holds": None, "evaluated": None, "note": ""}
    if measured is None:
        out["note"] = "not every descent converged"
    elif not curvature:
        out["note"] = "curvature=False: lambda_min not measured"
    elif lam_min is None:
        out["note"] = "a domain's minimum coincides with theta or its curvature is undefined"
    elif lam_min <= 0:
        out["note"] = "non-positive curvature along some theta - theta_k*: the bound does not apply"
    else:
        value = G ** 2 / (N * lam_min ** 2) * dissim
        out["evaluated"] = value
        if st["applicable"]:
            out.update(value=value, holds=bool(measured <= value * (1 + 1e-9) + 1e-12),
                       note="theta is a stationary point of the average loss by the criterion: the theorem applies")
        else:
            out["note"] = (f"not applicable: theta is not a stationary point of the average loss "
                           f"(||mean_k g_k|| = {st['stationarity']:.3g}, {st['relative_stationarity']:.2g} of the "
                           f"mean ||g_k||; the theorem needs <= {STATIONARY_RTOL:g})")
    return out
