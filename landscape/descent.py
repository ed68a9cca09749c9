"""Full-batch single-domain descent from a checkpoint to the domain's nearest minimum: trust-region Newton-CG
(default), L-BFGS, AdamW (full-batch Adam, no decay) or SGD on a float64 copy, with a gradient-norm stopping test
and an evaluation budget; in eval mode or in train mode with each batch's dropout masks fixed by the seed."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import torch

from nexus_opt.errors import UserError
from nexus_opt.util import choose

from .objective import Objective, batch_rng
from .params import get_flat, set_flat, unflatten
from .result import Result

Progress = Callable[[int, int, str], None]  # progress(done, total, what)

OPTIMIZERS = {"newton-cg": None, "lbfgs": 1.0, "adamw": 1e-3, "sgd": 1e-2}  # name -> default learning rate
DEFAULT_MAX_EVALS = {"newton-cg": 5000, "lbfgs": 2000, "adamw": 300, "sgd": 300}
ALIASES = {"adam": "adamw"}  # accepted old names -> documented name (a full-batch descent has no weight decay)
NEAREST_MINIMUM = """\
The "nearest minimum" theta_k* of domain k is the point the default descent reaches from the checkpoint
theta: trust-region Newton-CG (Steihaug) on domain k's full-batch loss in float64, stopped when
||grad L_k|| <= max(rtol * ||grad L_k(theta)||, atol). Every step is a conjugate-gradient combination of
Krylov vectors g, Hg, H^2 g, ..., so the walk never leaves theta + range(H) for a quadratic loss: on a convex
quadratic theta_k* is the unique minimiser, and where the minimisers form an affine set (over-parameterised
least squares, min ||Xw - y||^2 with more weights than examples) theta_k* is the minimiser closest to theta in
Euclidean norm, the projection theta + X^+(y - X theta). On a non-convex loss it is the stationary point the
trust-region path reaches (negative curvature met by CG is followed to the trust boundary, so it does not stop
at the saddles it sees). A descent that stops on its budget of gradient and Hessian-vector evaluations has not
reached a minimum: it is marked converged=False and nothing that compares minima is computed from it."""


@dataclasses.dataclass
class DescentResult(Result):
    """One domain's minimum found by full-batch descent from the checkpoint: `theta` in obj.params() order."""

    domain: str = ""
    theta: object = None  # flat float64 CPU tensor (a list after JSON)
    losses: list = dataclasses.field(default_factory=list)  # loss at the start, then after each accepted step
    steps: int = 0  # outer iterations (newton-cg, lbfgs) or steps (adam, sgd) taken
    converged: bool = False  # ||grad|| <= max(rtol * ||grad at start||, atol) at theta
    best_step: int = 0  # the iterate returned as theta: the lowest loss of the trace
    loss_min: float = 0.0  # L(theta) = losses[best_step]
    grad_norm: Optional[float] = None  # ||grad L|| at theta
    grad_norm_start: Optional[float] = None  # ||grad L|| at the checkpoint
    evals: int = 0  # gradient + Hessian-vector + loss evaluations spent
    max_evals: int = 0
    stop: str = ""  # why it stopped: 'gradient', 'budget', 'stalled' (plateau / trust region collapsed), 'steps'
    optimizer: str = "newton-cg"
    lr: Optional[float] = None
    rtol: float = 0.0
    atol: float = 0.0
    tol: float = 0.0
    window: int = 0
    seed: int = 0
    train_mode: bool = False  # the train-mode loss (dropout masks fixed per batch by seed, batch statistics)
    seconds: float = 0.0  # wall-clock time of the descent

    @property
    def loss_start(self) -> float:
        return self.losses[0]



# -- losses at flat weights --------------------------------------------------------------------------
def loss_at(obj: Objective, theta: torch.Tensor, domain: str | None, *, seed: int | None = None) -> float:
    """A domain's full loss (or the training loss) at flat weights `theta`, without touching the model, in the
    mode the model's flags are in; `seed`: each batch on an RNG seeded for it (train mode), None: RNG untouched."""
    p = obj.params()
    return _loss(obj, unflatten(theta.to(device=obj.device, dtype=obj.dtype), p), obj.keyed_terms(domain), seed)


def _loss(obj: Objective, named: dict, terms, seed: int | None) -> float:
    """The weighted loss over keyed `terms` at named parameters (batch_rng(seed, key) around each batch)."""
    from . import distributed as dist

    sharded = dist.active()  # under torchrun: this rank's share of the batches, summed over ranks
    total = 0.0
    with torch.no_grad():
        for k, c, b in (dist.shard(list(terms)) if sharded else terms):
            with batch_rng(seed, k, obj.device):
                total += c * float(obj.functional_loss(named, b))
    if sharded:
        total = float(dist.allreduce(torch.tensor([total], dtype=torch.float64))[0])
    return total


def _loss_grad(obj: Objective, leaves: dict, terms, seed: int | None) -> float:
    """Full-batch loss at `leaves` over keyed terms; writes its gradient into each leaf's .grad (one graph per
    batch, each on batch_rng(seed, key))."""
    from . import distributed as dist

    sharded = dist.active()  # under torchrun: this rank's share of the batches, summed over ranks
    total, grads = 0.0, [torch.zeros_like(v) for v in leaves.values()]
    for k, c, b in (dist.shard(list(terms)) if sharded else terms):
        with batch_rng(seed, k, obj.device):
            loss = obj.functional_loss(leaves, b)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc.add_(g, alpha=c)
        total += c * float(loss.detach())
    if sharded:
        grads = [dist.allreduce(g) for g in grads]
        total = float(dist.allreduce(torch.tensor([total], dtype=torch.float64))[0])
    for v, g in zip(leaves.values(), grads):
        v.grad = g
    return total


def optimizer_name(optimizer: str) -> str:
    """The documented name of a descent optimizer ('adam' -> 'adamw'), or a UserError listing the names."""
    return choose(optimizer, OPTIMIZERS, "optimizer", ALIASES)


def _check_settings(optimizer, steps, max_evals, lr, rtol, atol) -> None:
    optimizer = optimizer_name(optimizer)
    if steps is not None and int(steps) < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if max_evals is not None and int(max_evals) < 1:
        raise UserError(f"max_evals must be at least 1 (or None: the default budget), got {max_evals}")
    if lr is not None:
        if optimizer == "newton-cg":
            raise UserError("newton-cg takes no learning rate (its steps come from the Hessian); drop lr or "
                            "choose --optimizer adamw, sgd or lbfgs")
        if not (lr > 0 and math.isfinite(lr)):
            raise UserError(f"lr must be a positive number, got {lr}")
    if not (0 <= float(rtol) < 1) or not (float(atol) >= 0) or not math.isfinite(float(atol)):
        raise UserError(f"rtol must be in [0, 1) and atol >= 0, got rtol={rtol}, atol={atol}")


def _steihaug(hv, g: torch.Tensor, delta: float, eta: float, max_iter: int):
    """Steihaug-Toint truncated CG for min_p g.p + p.Hp/2 with ||p|| <= delta: (p, Hp, products, hit boundary).
    Every iterate is in span{g, Hg, ...}: from p = 0, CG never adds a component outside range(H)."""
    p, Hp = torch.zeros_like(g), torch.zeros_like(g)
    r = g.clone()
    d = -r
    rr = float(r @ r)
    gn = math.sqrt(rr)
    used = 0

    def to_boundary(p, d):
        pd, dd, pp = float(p @ d), float(d @ d), float(p @ p)
        return (-pd + math.sqrt(max(pd * pd + dd * (delta * delta - pp), 0.0))) / dd

    while used < max_iter:
        Hd = hv(d)
        used += 1
        dHd = float(d @ Hd)
        if dHd <= 0:  # non-positive curvature: follow it to the trust boundary
            tau = to_boundary(p, d)
            return p + tau * d, Hp + tau * Hd, used, True
        alpha = rr / dHd
        p_next = p + alpha * d
        if float(p_next.norm()) >= delta:
            tau = to_boundary(p, d)
            return p + tau * d, Hp + tau * Hd, used, True
        p, Hp = p_next, Hp + alpha * Hd
        r = r + alpha * Hd
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= eta * gn:
            break
        d = -r + (rr_next / rr) * d
        rr = rr_next
    return p, Hp, used, False


class _Counter:
    """Evaluations spent (gradients, Hessian-vector products, losses) against a budget, with progress."""

    def __init__(self, budget: int, progress, name: str):
        self.used, self.budget, self.progress, self.name = 0, budget, progress, name

    def add(self, k: int = 1) -> None:
        self.used += k
        if self.progress:
            self.progress(min(self.used, self.budget), self.budget, f"descend {self.name}")

    @property
    def left(self) -> int:
        return self.budget - self.used


def _newton_cg(work: Objective, name: str, domain, x: torch.Tensor, *, rtol, atol, max_evals, steps, seed,
               train_mode, progress):
    """Trust-region Newton-CG on the float64 copy `work`, from flat x: (x, losses, grads, steps, stop, evals)."""
    from . import distributed
    from .hvp import HessianOperator
    params = work.params()
    cnt = _Counter(max_evals, progress, name)
    terms, rng = work.keyed_terms(domain), (seed if train_mode else None)

    def at(xv):
        set_flat(params, xv)
        op = HessianOperator(work, domain, dtype=None, copy=False, cache=True, seed=seed, train_mode=train_mode)
        if distributed.active():  # under torchrun the products are sharded like flatness's
            op = distributed.shard_operator(op)
        g = op.gradient().to("cpu", torch.float64)
        cnt.add()
        return op, g

    def loss(xv) -> float:
        v = _loss(work, unflatten(xv.to(work.device), params), terms, rng)
        cnt.add()
        return v

    f = loss(x)
    op, g = at(x)
    g0 = float(g.norm())
    target = max(rtol * g0, atol)
    losses, gnorms, it, stop = [f], [g0], 0, "budget"
    delta = max(1.0, float(x.norm()))
    delta_max = 1e8 * delta
    while True:
        gn = gnorms[-1]
        if not math.isfinite(f) or not math.isfinite(gn):
            raise UserError(f"descent on domain '{name}' reached a non-finite loss or gradient ({f:.4g}); the "
                            "loss is not defined along the way (try --optimizer adamw with a small --lr)")
        if gn <= target:
            stop = "gradient"
            break
        if steps is not None and it >= steps:
            stop = "steps"
            break
        if cnt.left < 3:
            break
        eta = min(0.5, math.sqrt(gn / max(g0, 1e-300)), gn / max(g0, 1e-300) * 10)
        eta = max(eta, 0.5 * target / gn)  # no need to solve beyond the final target

        def hv(d):
            cnt.add()
            return op.matvec(d.to(op.device)).to("cpu", torch.float64)

        p, Hp, used, boundary = _steihaug(hv, g, delta, eta, max(1, min(op.n, cnt.left - 2)))
        pred = -(float(g @ p) + 0.5 * float(p @ Hp))
        pn = float(p.norm())
        if pn == 0.0 or pred <= 0:
            stop = "stalled"
            break
        f_new = loss(x + p)
        noise = 1e-12 * max(abs(f), 1e-300)
        rho = (f - f_new) / pred if pred > noise else (1.0 if f_new <= f + noise else -1.0)
        if rho < 0.25:
            delta = 0.25 * pn
        elif rho > 0.75 and boundary:
            delta = min(2.0 * delta, delta_max)
        if rho > 1e-4:
            op.release()
            x = x + p
            f = f_new
            op, g = at(x)
            losses.append(f)
            gnorms.append(float(g.norm()))
            it += 1
        elif delta <= 1e-14 * max(1.0, float(x.norm())):
            stop = "stalled"
            break
    op.release()
    set_flat(params, x)
    return x, losses, gnorms, it, stop, cnt.used


def descend(obj: Objective, domain: str | None, *, optimizer: str = "newton-cg", steps: int | None = None,
            max_evals: int | None = None, rtol: float = 1e-8, atol: float = 1e-12, lr: float | None = None,
            tol: float = 1e-12, window: int = 10, seed: int = 0, validate: bool = True,
            progress: Progress | None = None, train_mode: bool = False) -> DescentResult:
    """Full-batch single-domain descent from the current weights (on a float64 copy) to the domain's nearest
    minimum (see NEAREST_MINIMUM); converged means ||grad|| <= max(rtol * ||grad at start||, atol).

    The loss is the domain's fixed batches weighted as obj.terms says (domain None/'train': the training loss),
    in eval mode; `train_mode=True`: the train-mode loss (dropout on, BatchNorm batch statistics) with batch k's
    RNG seeded by objective.batch_seed(seed, k) in every loss, gradient and Hessian-vector product, so the descent
    sees one smooth deterministic function of the weights (a different seed: different dropout masks).
    `optimizer`: 'newton-cg' (default: trust-region Newton-CG on exact float64 Hessian-vector products; no
    learning rate), 'lbfgs' (strong-Wolfe line search, lr 1.0), 'adamw' (full-batch Adam without weight decay,
    lr 1e-3; 'adam' is accepted too) or 'sgd' (lr 1e-2). The budget `max_evals` counts gradient, Hessian-vector
    and loss evaluations (default 5000 for newton-cg, 2000 for lbfgs, 300 for adamw/sgd); `steps` optionally caps
    the iterations too. First-order methods also stop on a plateau of the best loss (tol, window) -- stalled,
    which is not convergence. A non-finite loss raises UserError (divergence). The caller's model, its buffers,
    flags and the RNG are unchanged.
    """
    t0 = time.perf_counter()
    _check_settings(optimizer, steps, max_evals, lr, rtol, atol)
    optimizer = optimizer_name(optimizer)
    if not tol >= 0 or int(window) < 1:
        raise UserError(f"tol must be >= 0 and window >= 1, got tol={tol}, window={window}")
    window = int(window)
    budget = int(max_evals) if max_evals is not None else DEFAULT_MAX_EVALS[optimizer]
    if steps is not None and optimizer in ("adamw", "sgd") and max_evals is None:
        budget = int(steps) + 1  # one gradient per step (and one at the end)
    steps = None if steps is None else int(steps)
    lr = None if optimizer == "newton-cg" else float(OPTIMIZERS[optimizer] if lr is None else lr)
    obj.terms(domain)  # validates the domain
    name = "train" if domain is None else str(domain)
    if not obj.params():
        raise UserError("the model has no trainable parameters")
    if validate:
        obj.validate(obj.train_domains if name == "train" else [name], train_mode=train_mode)
    train_mode = bool(train_mode)
    work = obj.to(dtype=torch.float64)
    x0 = get_flat(work.params(), torch.float64).cpu()
    with work.preserved(train_mode, seed):
        if optimizer == "newton-cg":
            x, losses, gnorms, it, stop, used = _newton_cg(work, name, domain, x0.clone(), rtol=rtol, atol=atol,
                                                            max_evals=budget, steps=steps, seed=seed,
                                                            train_mode=train_mode, progress=progress)
            res = DescentResult(domain=name, theta=x, losses=losses, steps=it, converged=stop == "gradient",
                                 best_step=len(losses) - 1, loss_min=losses[-1], grad_norm=gnorms[-1],
                                 grad_norm_start=gnorms[0], evals=used, max_evals=budget, stop=stop,
                                 optimizer=optimizer, lr=None, rtol=float(rtol), atol=float(atol), tol=float(tol),
                                 window=window, seed=int(seed))
        else:
            res = _first_order(work, name, terms=work.keyed_terms(domain), optimizer=optimizer, lr=lr, steps=steps,
                                budget=budget, rtol=rtol, atol=atol, tol=tol, window=window, seed=seed,
                                rng=seed if train_mode else None, progress=progress)
    res.train_mode = train_mode
    res.seconds = time.perf_counter() - t0
    return res


def _first_order(work: Objective, name: str, *, terms, optimizer, lr, steps, budget, rtol, atol, tol, window, seed,
                 rng, progress) -> DescentResult:
    """Adam, SGD or L-BFGS on the float64 copy over keyed `terms` (batch_rng(rng, key) per batch), stopping on the
    gradient test, a plateau, steps or the budget."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in work.params().items()}
    vals = list(leaves.values())
    if optimizer == "adamw":  # full-batch Adam: a descent to a minimum has no weight decay
        opt = torch.optim.Adam(vals, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(vals, lr=lr)
    else:
        # max_eval bounds the line search too (its default, 5/4 max_iter, would allow a single trial point)
        opt = torch.optim.LBFGS(vals, lr=lr, max_iter=1, max_eval=25, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    cnt = _Counter(budget, progress, name)

    def closure():
        cnt.add()
        return _loss_grad(work, leaves, terms, rng)

    def gnorm() -> float:
        return math.sqrt(sum(float(v.grad.double().pow(2).sum()) for v in vals if v.grad is not None))

    def flat() -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1) for v in vals]).clone()

    def check(value: float, t: int) -> None:
        if not math.isfinite(value):
            raise UserError(f"descent on domain '{name}' diverged (loss {losses[-1] if losses else value:.4g}, "
                            f"started at {losses[0] if losses else value:.4g}) by step {t}; lower --lr "
                            f"(was {lr:g}) or use the default --optimizer newton-cg")

    losses, best, stop = [], [], "budget"
    f = closure()
    check(f, 0)
    g0 = gnorm()
    target = max(rtol * g0, atol)
    losses.append(f)
    best.append(f)
    best_theta, best_step, best_g = flat(), 0, g0
    t = 0
    while True:
        if best_g <= target and best_step == len(losses) - 1:
            stop = "gradient"
            break
        if steps is not None and t >= steps:
            stop = "steps"
            break
        if cnt.left < (26 if optimizer == "lbfgs" else 1):
            break
        if optimizer == "lbfgs":
            opt.step(closure)  # leaves the parameters at the new iterate
            f = closure()
        else:
            opt.step()
            f = closure()
        t += 1
        check(f, t)
        losses.append(f)
        g = gnorm()
        if f < best[-1] or (f == best[-1] and g < best_g):
            best_theta, best_step, best_g = flat(), t, g
        best.append(min(f, best[-1]))
        if len(best) > window and best[-1 - window] - best[-1] <= tol * max(abs(best[-1]), losses[0] - best[-1]):
            if min(losses[-window:]) > losses[0]:  # a whole window above the start: blowing up
                check(float("inf"), t)
            if not best_g <= target:
                stop = "stalled"
                break
    theta = best_theta.to(device="cpu", dtype=torch.float64)
    return DescentResult(domain=name, theta=theta, losses=losses, steps=t, converged=bool(best_g <= target),
                         best_step=best_step, loss_min=losses[best_step], grad_norm=best_g, grad_norm_start=g0,
                         evals=cnt.used, max_evals=budget, stop=stop if best_g > target else "gradient",
                         optimizer=optimizer, lr=lr, rtol=float(rtol), atol=float(atol), tol=float(tol),
                         window=window, seed=int(seed))
