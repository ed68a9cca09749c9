"""Nexus's alignment term measured where it acts: the expected displacement of one outer step at a checkpoint
(exact over all domain orders, or a seeded sample with standard errors), split into the first-order term (what
the control, Nexus parallel mode, steps along), the second-order alignment term and the remainder (nexus.md), and
the rate at which the mean cross-domain gradient cosine and each domain's loss change along Nexus's direction and
along the control's. No training, no seeds of runs, no matching: the mechanism at one point, over a gamma grid."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from .descent import Progress
from .hvp import HessianOperator, numerics
from .objective import Objective
from .params import get_flat, unflatten
from .result import Result, num

DEFAULT_GAMMAS = (0.001, 0.01, 0.03, 0.1)
MAX_ORDERS = 1024    # exact expectation when N^K orders are at most this many, else a sample
DEFAULT_SAMPLES = 256  # sampled orders (each costs K gradients)
MAX_GAMMAS = 64


@dataclasses.dataclass
class AlignmentResult(Result):
    """Nexus's expected displacement E[theta_0 - theta_K] at a checkpoint per gamma, its expansion terms and the
    directional rates of the mean cross-domain cosine and of each domain's loss along Nexus's and the control's
    unit step directions (the outer optimizer steps along minus the displacement).

    Per gamma (`per_gamma`): norms of the exact displacement, first-order term gamma K sum_i p_i u_i (the
    control's expected displacement), second-order term -gamma^2 K(K-1)/2 sum_ij p_i p_j J_i u_j and remainder
    (exact - first - second); `rate_cosine` {nexus, control, difference, predicted_difference}: d(mean cosine)/dt
    along the unit step direction (predicted_difference uses first + second in place of the exact displacement);
    `rate_loss[domain]` {nexus, control, difference}: d L_domain / dt likewise (negative: the loss falls).
    Sampled orders (`exact` false): each number has a jackknife standard error in `stderr`."""

    domains: list = dataclasses.field(default_factory=list)   # the walk's domains (sampled with `probabilities`)
    columns: list = dataclasses.field(default_factory=list)   # every domain (loss-rate columns)
    ood: list = dataclasses.field(default_factory=list)
    probabilities: dict = dataclasses.field(default_factory=dict)
    K: int = 0
    gammas: list = dataclasses.field(default_factory=list)
    exact: bool = True
    orders: int = 0                                            # N^K (exact) or the sampled count
    cosine: Optional[list] = None                              # [i][j] cosine between domain gradients at theta
    mean_cosine: Optional[float] = None                        # mean over pairs i < j of the walk's domains
    grad_norms: dict = dataclasses.field(default_factory=dict)
    losses: dict = dataclasses.field(default_factory=dict)     # every domain's loss at theta, and 'train'
    cosine_gradient_norm: Optional[float] = None               # ||grad_theta mean cosine||
    per_gamma: list = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0

    def at(self, gamma: float) -> dict:
        for r in self.per_gamma:
            if math.isclose(r["gamma"], gamma, rel_tol=1e-12):
                return r
        raise KeyError(gamma)

    def reading(self) -> str:
        """One line per gamma: the rate difference and the expansion's residual, in the same words either way."""
        lines = []
        for r in self.per_gamma:
            rc = r["rate_cosine"]
            se = (r.get("stderr") or {}).get("rate_cosine.difference")
            d = rc["difference"]
            sign = "higher" if d is not None and d > 0 else "lower" if d is not None and d < 0 else "the same"
            lines.append(f"gamma={r['gamma']:g}: along Nexus's direction the mean cosine changes at "
                         f"{_f(rc['nexus'])} per unit step, along the control's at {_f(rc['control'])} "
                         f"(difference {_f(d)}{'' if se is None else f' +- {se:.2g}'}: the rate is {sign} along "
                         f"Nexus's direction); |remainder| / |second-order term| = {_f(r['remainder_over_second'], '.3g')}.")
        return "\n".join(lines)


def _f(v, fmt: str = "+.4g") -> str:
    return "n/a" if v is None else format(v, fmt)


class _Fields:
    """Full-batch domain gradients at arbitrary flat weights, on a float64 copy of the objective (eval mode)."""

    def __init__(self, obj: Objective):
        self.obj = obj
        self.params = obj.params()
        self.terms = {d: obj.keyed_terms(d) for d in obj.domains}
        self.evals = 0

    def grad(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        self.evals += 1
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in unflatten(x, self.params).items()}
        total = torch.zeros_like(x)
        with self.obj.evaluating(False), numerics():
            for _, c, b in self.terms[domain]:
                loss = self.obj.functional_loss(leaves, b)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                total += c * torch.cat([(g if g is not None else torch.zeros_like(v)).reshape(-1)
                                        for g, v in zip(gs, leaves.values())])
        return total


def _unit(g: torch.Tensor) -> torch.Tensor:
    n = float(g.norm())
    return g / n if n > 0 and math.isfinite(n) else torch.zeros_like(g)  # Nexus moves nothing on a zero gradient


def _exact_end(f: _Fields, x0: torch.Tensor, names, probs, gamma: float, K: int, tick) -> torch.Tensor:
    """E[theta_K] over all N^K orders (order s with probability prod p_s), by a depth-first walk of the order tree
    that shares prefixes: N (N^K - 1)/(N - 1) gradients."""
    def mean_end(x, m):
        if m == K:
            return x
        out = torch.zeros_like(x)
        for d, p in zip(names, probs):
            out += p * mean_end(x - gamma * _unit(f.grad(x, d)), m + 1)
        tick()
        return out

    return mean_end(x0, 0)


def _sampled_ends(f: _Fields, x0, names, probs, gamma, K, samples: int, seed: int, tick) -> torch.Tensor:
    """theta_K for `samples` orders drawn i.i.d. by the probabilities (seeded; the same orders for every gamma)."""
    rng = np.random.default_rng([seed, 20])
    orders = rng.choice(len(names), size=(samples, K), p=np.asarray(probs) / sum(probs))
    ends = []
    for seq in orders:
        x = x0
        for i in seq:
            x = x - gamma * _unit(f.grad(x, names[i]))
        ends.append(x)
        tick()
    return torch.stack(ends)


def _cosine_gradient(hess: dict, grads: dict, names) -> tuple[torch.Tensor, list, float]:
    """(grad_theta of the mean cosine over pairs i<j, the cosine matrix, the mean cosine). With w_ij =
    g_j/(|g_i||g_j|) - cos_ij g_i/|g_i|^2, grad cos(g_i, g_j) = H_i w_ij + H_j w_ji (H symmetric)."""
    N = len(names)
    nrm = {d: float(grads[d].norm()) for d in names}
    cos = [[float(grads[a] @ grads[b]) / (nrm[a] * nrm[b]) if nrm[a] > 0 and nrm[b] > 0 else None
            for b in names] for a in names]
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    if not pairs or any(cos[i][j] is None for i, j in pairs):
        return None, cos, None
    W = {d: torch.zeros_like(grads[d]) for d in names}
    for i, j in pairs:
        a, b = names[i], names[j]
        W[a] += grads[b] / (nrm[a] * nrm[b]) - cos[i][j] * grads[a] / nrm[a] ** 2
        W[b] += grads[a] / (nrm[a] * nrm[b]) - cos[i][j] * grads[b] / nrm[b] ** 2
    grad = sum(hess[d].matvec(W[d]).to(torch.float64).cpu() for d in names) / len(pairs)
    return grad, cos, float(np.mean([cos[i][j] for i, j in pairs]))


def _rates(direction: torch.Tensor, cgrad, lgrads: dict) -> dict:
    """Directional derivatives along the unit vector of `direction` (None where it is zero)."""
    n = float(direction.norm(dim=-1).min()) if direction.dim() > 1 else float(direction.norm())
    if not n > 0:
        return {"cosine": None, **{f"loss:{d}": None for d in lgrads}}
    u = direction / direction.norm(dim=-1, keepdim=True)
    out = {"cosine": None if cgrad is None else u @ cgrad}
    out.update({f"loss:{d}": u @ g for d, g in lgrads.items()})
    return out


def alignment(obj: Objective, *, gammas: Sequence[float] = DEFAULT_GAMMAS, K: int | None = None, domains=None,
              params: str | None = None, seed: int = 0, max_orders: int = MAX_ORDERS,
              samples: int = DEFAULT_SAMPLES, exact: bool | None = None, keep_vectors: bool = False,
              progress: Progress | None = None) -> AlignmentResult:
    """Nexus's expected outer displacement at the checkpoint for every gamma, and the alignment it causes.

    The walk: theta_m = theta_{m-1} - gamma g_s(theta_{m-1}) / ||g_s||, s drawn from `domains` (default: the
    trained domains, with the objective's mixture weights as probabilities) for each of K inner steps (default
    K = N), each g_s the domain's full-batch gradient over its fixed batches (eval mode, float64; the global norm
    over the selected parameters, as nexus_opt.Nexus). The expectation is exact over all N^K orders when
    N^K <= max_orders (or exact=True), else the mean over `samples` seeded orders with jackknife standard errors.
    The first-order term is the control's expected displacement exactly (its K normalised gradients are all at
    the anchor); the second-order term is the expansion's (nexus.md, with p_i for 1/N); the rates are exact
    directional derivatives (Hessian-vector products), along -displacement / ||displacement||.
    `params`: a regex restricting the walked parameters (Objective.select); `keep_vectors`: store the
    displacement and its terms as vectors in each row (`vectors`; small models and tests)."""
    t0 = time.perf_counter()
    seed = check_seed(seed, "seed")
    try:
        gammas = [float(g) for g in gammas]
    except (TypeError, ValueError):
        raise UserError(f"gammas must be numbers, got {gammas!r}") from None
    if not gammas or any(not (0 < g < math.inf) for g in gammas):
        raise UserError(f"gammas must be positive finite numbers, got {gammas}")
    if len(set(gammas)) != len(gammas) or len(gammas) > MAX_GAMMAS:
        raise UserError(f"gammas must be distinct and at most {MAX_GAMMAS}, got {gammas}")
    gammas = sorted(gammas)
    obj = obj.select(params)
    names = obj.resolve_domains(domains, default="train", train="expand")
    N = len(names)
    K = N if K is None else K
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= int(K) <= 64:
        raise UserError(f"K (inner steps) must be an integer in [1, 64], got {K!r}")
    K = int(K)
    for v, what in ((max_orders, "max_orders"), (samples, "samples")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 2 <= int(v) <= 1_000_000:
            raise UserError(f"{what} must be an integer in [2, 1000000], got {v!r}")
    w = {d: obj.weights.get(d, 0.0) for d in names}
    if sum(w.values()) <= 0:
        w = {d: 1.0 for d in names}
    probs = [w[d] / sum(w.values()) for d in names]
    n_orders = N ** K
    exact = (n_orders <= max_orders) if exact is None else bool(exact)
    if exact and n_orders > 1000 * MAX_ORDERS:
        raise UserError(f"an exact expectation over {N}^{K} = {n_orders} orders is too large; sample instead "
                        f"(exact=False, or a smaller K)")
    obj.validate(list(dict.fromkeys(names + list(obj.domains))))
    work = obj.to(dtype=torch.float64)
    f = _Fields(work)
    x0 = get_flat(f.params, torch.float64)
    per_gamma_work = ((n_orders - 1) // (N - 1) if N > 1 else K) if exact else samples  # tree nodes / orders
    total, done = len(gammas) * per_gamma_work + 2 * N, 0

    def tick(what="walk"):
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    grads = {d: f.grad(x0, d) for d in work.domains}
    hess = {d: HessianOperator(work, d, copy=False) for d in names}
    us = [_unit(grads[d]) for d in names]
    for _ in names:
        tick("curvature")
    cgrad, cos, mean_cos = _cosine_gradient(hess, grads, names)
    # J_i u = (I - u_i u_i^T) H_i u / ||g_i||; the second-order sum over ordered pairs (i, j) of J_i u_j
    ubar = sum(p * u for p, u in zip(probs, us))
    Ju = torch.zeros_like(x0)
    for p, d, u in zip(probs, names, us):
        n = float(grads[d].norm())
        if n > 0:
            h = hess[d].matvec(ubar).to(torch.float64).cpu()
            Ju += p * (h - u * (u @ h)) / n
    for _ in names:
        tick("curvature")
    lgrads = {d: grads[d] for d in work.domains}
    rows = []
    for gamma in gammas:
        first = gamma * K * ubar
        second = -gamma ** 2 * K * (K - 1) / 2 * Ju
        if exact:
            D = (x0 - _exact_end(f, x0, names, probs, gamma, K, tick))[None]
        else:
            ends = _sampled_ends(f, x0, names, probs, gamma, K, samples, seed, tick)
            Dn = x0 - ends
            S = Dn.shape[0]
            D = torch.cat([Dn.mean(0, keepdim=True), (Dn.sum(0, keepdim=True) - Dn) / (S - 1)])  # mean, leave-one-outs
        rem = D - first - second
        rn, rc, rp = _rates(-D, cgrad, lgrads), _rates(-first, cgrad, lgrads), _rates(-(first + second), cgrad, lgrads)
        snorm = float(second.norm())
        vals = {"norm_exact": D.norm(dim=-1), "norm_remainder": rem.norm(dim=-1),
                "remainder_over_second": rem.norm(dim=-1) / snorm if snorm > 0 else None,
                "rate_cosine.nexus": rn["cosine"],
                "rate_cosine.difference": None if rn["cosine"] is None else rn["cosine"] - rc["cosine"]}
        for d in lgrads:
            vals[f"rate_loss.{d}.nexus"] = rn[f"loss:{d}"]
            vals[f"rate_loss.{d}.difference"] = None if rn[f"loss:{d}"] is None else rn[f"loss:{d}"] - rc[f"loss:{d}"]
        point, stderr = {}, {}
        for k, v in vals.items():
            if v is None:
                point[k], stderr[k] = None, None
                continue
            v = v.to(torch.float64).reshape(-1)
            point[k] = float(v[0])
            if not exact:
                loo = v[1:]
                S = loo.numel()
                stderr[k] = float(math.sqrt((S - 1) / S * float(((loo - loo.mean()) ** 2).sum())))
        sc = None if cgrad is None or snorm == 0 or float(cgrad.norm()) == 0 else \
            float((-second) @ cgrad / (snorm * float(cgrad.norm())))
        rcc = None if rc["cosine"] is None else float(rc["cosine"])
        rows.append({
            "gamma": gamma, "norm_exact": point["norm_exact"], "norm_first": float(first.norm()),
            "norm_second": snorm, "norm_remainder": point["norm_remainder"],
            "remainder_over_second": num(point["remainder_over_second"]),
            "second_cosine_with_cosine_gradient": sc,
            "rate_cosine": {"nexus": num(point["rate_cosine.nexus"]),
                            "control": rcc,
                            "difference": point["rate_cosine.difference"],
                            "predicted_difference": None if rp["cosine"] is None else float(rp["cosine"]) - rcc},
            "rate_loss": {d: {"nexus": point[f"rate_loss.{d}.nexus"],
                              "control": None if rc[f"loss:{d}"] is None else float(rc[f"loss:{d}"]),
                              "difference": point[f"rate_loss.{d}.difference"]} for d in lgrads},
            "stderr": stderr if not exact else {},
            **({"vectors": {"exact": D[0].tolist(), "first": first.tolist(), "second": second.tolist()}}
               if keep_vectors else {})})
    with torch.no_grad():
        losses = work.losses()
    return AlignmentResult(
        domains=names, columns=list(work.domains), ood=list(work.ood), probabilities=dict(zip(names, probs)), K=K,
        gammas=gammas, exact=exact, orders=n_orders if exact else int(samples), cosine=cos, mean_cosine=mean_cos,
        grad_norms={d: float(grads[d].norm()) for d in work.domains}, losses=losses,
        cosine_gradient_norm=None if cgrad is None else float(cgrad.norm()), per_gamma=rows,
        settings={"num_params": int(x0.numel()), "params": params, "max_orders": int(max_orders),
                  "samples": int(samples), "gradient_evals": f.evals, "mode": "eval", "dtype": "float64",
                  "walk": "theta_m = theta_{m-1} - gamma g_s / ||g_s|| (global norm), full-batch domain gradients",
                  "direction": "the outer optimizer steps along minus the displacement; rates per unit step"},
        seed=seed, seconds=time.perf_counter() - t0)

