"""The paper's mechanism on a 2-D toy: two basins of equal training loss, AdamW vs the first-order control vs Nexus.

Each domain's loss is a soft minimum of two isotropic quadratic wells, one per basin. In the *shared* basin
every training domain has its well at the same point s (an intersection of minima); in the *separated* basin
the training domains' wells sit on a circle of radius d around p (a sum of minima), offset so that the
training loss has the same minimum value in both basins. A held-out *downstream* domain is low only at s.
From starts on the training-loss ridge between the basins and several seeded domain orders, AdamW
(gradient accumulation over the K micro-batches), the control (Nexus parallel mode: K normalised gradients
at the anchor, summed) and Nexus (the sequential inner walk) run with the same outer AdamW; the result is
where they end and what they pass through. Numerics only; the figure is in landscape/render/mechanism.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from ..render.style import ARM_LABELS  # noqa: F401  (the arms' display names)
from ..result import Result
from .mechanism_landscape import (SEPARATED, SHARED, UNDECIDED, Landscape, expansion_terms,  # noqa: F401
                                  expected_displacement, landscape_from_dict, landscape_to_dict, make_landscape,
                                  ridge_starts)

ARMS = ("adamw", "control", "nexus")
DEFAULT_GAMMAS = (0.1, 0.2, 0.4)


def domain_orders(n_domains: int, n_orders: int, steps: int, K: int, seed: int, kind: str = "balanced") -> np.ndarray:
    """(n_orders, steps, K) domain indices, seeded. 'balanced': every outer step holds each domain K/N times in a
    random order (the sum of the K micro-batch gradients is then the same for every order); 'iid': each
    micro-batch's source drawn uniformly."""
    rng = np.random.default_rng([int(seed) % 2 ** 63, 7])
    if kind == "iid":
        return rng.integers(0, n_domains, size=(n_orders, steps, K))
    if kind != "balanced":
        raise UserError(f"unknown order kind '{kind}'; choose 'balanced' or 'iid'")
    if K % n_domains:
        raise UserError(f"balanced orders need K to be a multiple of the {n_domains} domains, got K={K}")
    base = np.repeat(np.arange(n_domains), K // n_domains)
    return rng.permuted(np.broadcast_to(base, (n_orders, steps, K)), axis=-1)


# -- one run --------------------------------------------------------------------------------------------------
def run_arm(land: Landscape, arm: str, start, order: np.ndarray, *, gamma: float, lr: float,
            min_lr_ratio: float = 0.1) -> np.ndarray:
    """The outer-weight path (steps + 1, 2) of one arm from `start` on the domain order (steps, K).

    All arms use torch.optim.AdamW (betas 0.9/0.95, eps 1e-10, no weight decay; cosine lr from `lr` to
    `min_lr_ratio * lr`) on a 2-parameter tensor: AdamW on the mean of the K micro-batch gradients; the
    control and Nexus wrap it in nexus_opt.Nexus (mode 'parallel' / 'sequential', inner_lr = gamma)."""
    from nexus_opt import Nexus

    steps, K = order.shape
    names = land.train_domains
    theta = torch.nn.Parameter(torch.tensor(np.asarray(start, dtype=float), dtype=torch.float64))
    adamw = torch.optim.AdamW([theta], lr=lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    if arm == "adamw":
        opt = adamw
    elif arm in ("control", "nexus"):
        opt = Nexus(adamw, inner_lr=gamma, inner_steps=K, mode="parallel" if arm == "control" else "sequential")
    else:
        raise UserError(f"unknown arm '{arm}'; choose one of {list(ARMS)}")
    path = np.empty((steps + 1, 2))
    path[0] = theta.detach().numpy()
    x = theta.detach().numpy()  # a view: always the live weights
    for t in range(steps):
        f = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t / max(1, steps - 1)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        if arm == "adamw":
            theta.grad = torch.from_numpy(sum(land.grad(names[i], x) for i in order[t]) / K)
            opt.step()
        else:
            for i in order[t]:
                theta.grad = torch.from_numpy(land.grad(names[i], x))
                opt.step()
        path[t + 1] = x
    return path


# -- the experiment -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class MechanismResult(Result):
    """Where AdamW, the control and Nexus go on the two-basin toy, per gamma; the landscape and sample paths."""

    arms: list = dataclasses.field(default_factory=list)
    gammas: list = dataclasses.field(default_factory=list)
    table: list = dataclasses.field(default_factory=list)  # per (arm, gamma): fractions, losses, cosine, drift
    shifts: list = dataclasses.field(default_factory=list)  # per gamma: Nexus minus control, paired over runs
    landscape: dict = dataclasses.field(default_factory=dict)  # rebuild with landscape_from_dict
    basin_losses: dict = dataclasses.field(default_factory=dict)  # shared/separated -> train and downstream loss
    starts: list = dataclasses.field(default_factory=list)
    sample_paths: dict = dataclasses.field(default_factory=dict)  # arm -> list of paths (at sample_gamma)
    sample_gamma: Optional[float] = None
    settings: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    seed: int = 0

    def row(self, arm: str, gamma: Optional[float] = None) -> dict:
        for r in self.table:
            if r["arm"] == arm and (arm == "adamw" or r["gamma"] == gamma):
                return r
        raise KeyError((arm, gamma))

    def reading(self) -> str:
        """What the numbers show, in the same words whichever way they fall."""
        a, T0 = self.row("adamw"), self.settings.get("drift_steps")
        bl = self.basin_losses
        lines = [f"The two basins have training loss {bl[SHARED]['train']:.4f} (shared) and "
                 f"{bl[SEPARATED]['train']:.4f} (separated), downstream loss {bl[SHARED]['downstream']:.3f} and "
                 f"{bl[SEPARATED]['downstream']:.3f}.",
                 f"AdamW ends in the shared basin in {a['frac_shared']:.0%} of {a['n']} runs "
                 f"(mean downstream loss {a['downstream_mean']:.3f})."]
        for sh in self.shifts:
            c, n = self.row("control", sh["gamma"]), self.row("nexus", sh["gamma"])
            lines.append(
                f"gamma={sh['gamma']:g}: shared-basin fraction control {c['frac_shared']:.0%}, Nexus "
                f"{n['frac_shared']:.0%} (Nexus minus control {sh['d_frac_shared']:+.0%}: {sh['n_more_shared']} paired "
                f"runs moved into the shared basin, {sh['n_less_shared']} out of it); mean downstream loss "
                f"control {c['downstream_mean']:.3f}, Nexus {n['downstream_mean']:.3f} (paired difference "
                f"{sh['d_downstream']:+.3f} +- {sh['d_downstream_stderr']:.3f}); Nexus minus control: gradient "
                f"cosine at the end {sh['d_end_cosine']:+.3f}, drift towards the shared basin after {T0} outer steps "
                f"{sh['d_drift']:+.3f} +- {sh['d_drift_stderr']:.3f}.")
        d = [sh["d_frac_shared"] for sh in self.shifts]
        dr = [sh["d_drift"] for sh in self.shifts]

        def trend(v):
            if len(v) < 2 or all(y == v[0] for y in v):
                return "does not change with gamma"
            if all(y >= x for x, y in zip(v, v[1:])):
                return "rises with gamma"
            if all(y <= x for x, y in zip(v, v[1:])):
                return "falls with gamma"
            return "is not monotone in gamma"

        lines.append(f"Over gamma = {', '.join(f'{g:g}' for g in self.gammas)}, the Nexus-minus-control shift of the "
                     f"shared-basin fraction {trend(d)} ({', '.join(f'{x:+.0%}' for x in d)}) and the drift shift "
                     f"{trend(dr)} ({', '.join(f'{x:+.3f}' for x in dr)}); the expansion's second-order term at the "
                     f"starts points {'towards' if self.settings['predicted_drift_per_gamma2'] > 0 else 'away from'} "
                     f"the shared basin.")
        return "\n".join(lines)


def _toward_shared(land: Landscape) -> np.ndarray:
    """Unit vector from the separated centre p to the shared minimum s."""
    e = np.asarray(land.shared_min) - np.asarray(land.separated_centre)
    return e / np.linalg.norm(e)


def _stats(land: Landscape, paths: np.ndarray, radius: float, drift_steps: int) -> dict:
    """Per-run summaries of paths (runs, steps + 1, 2)."""
    end = paths[:, -1]
    T0 = min(drift_steps, paths.shape[1] - 1)
    return {"basin": [land.basin(x, radius) for x in end], "train": land.loss("train", end),
            "downstream": land.loss(land.downstream, end), "end_cosine": np.array([land.mean_cosine(x) for x in end]),
            "drift": (paths[:, T0] - paths[:, 0]) @ _toward_shared(land)}


def _se(v) -> Optional[float]:
    v = np.asarray(v, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


def _summary(arm: str, gamma, st: dict) -> dict:
    b, n = st["basin"], len(st["basin"])
    return {"arm": arm, "gamma": gamma, "n": n,
            "frac_shared": b.count(SHARED) / n, "frac_separated": b.count(SEPARATED) / n,
            "frac_undecided": b.count(UNDECIDED) / n,
            "train_mean": float(np.mean(st["train"])), "downstream_mean": float(np.mean(st["downstream"])),
            "downstream_stderr": _se(st["downstream"]), "end_cosine_mean": float(np.mean(st["end_cosine"])),
            "drift_mean": float(np.mean(st["drift"])), "drift_stderr": _se(st["drift"])}


def predicted_drift(land: Landscape, starts, K: int, gamma: float = 1.0) -> float:
    """Mean over `starts` of the outer step's second-order part projected towards the shared basin (the outer
    optimizer steps along minus the pseudo-gradient, so this is -second . e); scales as gamma^2."""
    e = _toward_shared(land)
    return float(np.mean([-expansion_terms(land, x, gamma, K)[1] @ e for x in starts]))


def mechanism_toy(gammas: Sequence[float] = DEFAULT_GAMMAS, *, seed: int = 0, n_orders: int = 3, steps: int = 40,
                  K: int = 4, lr: float = 0.1, n_along: int = 7, offsets: Sequence[float] = (-0.2, 0.2),
                  orders: str = "balanced", n_domains: int = 2, basin_radius: float = 0.75, drift_steps: int = 10,
                  sample_paths: int = 6, landscape: Landscape | None = None) -> MechanismResult:
    """AdamW, the control (Nexus parallel) and Nexus from every (ridge start, domain order) pair, at every gamma.

    With balanced orders the sum of each outer step's K gradients does not depend on the order, so AdamW and the
    control run once per start (with the first order) and are paired with every order's Nexus run.
    """
    seed = check_seed(seed, "--seed")
    try:
        gammas = [float(g) for g in gammas]
    except (TypeError, ValueError):
        raise UserError(f"--gammas must be numbers, got {gammas!r}") from None
    if not gammas or any(not (g > 0 and math.isfinite(g)) for g in gammas):
        raise UserError(f"--gammas must be positive finite numbers, got {gammas}")
    if len(set(gammas)) != len(gammas):
        raise UserError(f"--gammas must be distinct, got {gammas}")
    gammas = sorted(gammas)
    for name, v in (("steps", steps), ("K", K), ("orders", n_orders), ("starts along the ridge", n_along),
                    ("drift steps", drift_steps)):
        if int(v) < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"lr must be a positive number, got {lr}")
    t0 = time.perf_counter()
    land = landscape or make_landscape(n_domains=n_domains)
    starts = ridge_starts(land, n_along, offsets)
    order = domain_orders(len(land.train_domains), n_orders, steps, K, seed, orders)
    pairs = [(s, o) for s in range(len(starts)) for o in range(n_orders)]
    free = orders == "balanced"  # AdamW and the control do not see the order

    def sweep(arm, gamma):
        if free and arm != "nexus":
            one = np.stack([run_arm(land, arm, x, order[0], gamma=gamma, lr=lr) for x in starts])
            return np.repeat(one, n_orders, axis=0)
        return np.stack([run_arm(land, arm, starts[s], order[o], gamma=gamma, lr=lr) for s, o in pairs])

    paths = {("adamw", None): sweep("adamw", gammas[0])}
    for g in gammas:
        paths[("control", g)] = sweep("control", g)
        paths[("nexus", g)] = sweep("nexus", g)
    stats = {k: _stats(land, v, basin_radius, drift_steps) for k, v in paths.items()}
    table = [_summary(a, g, stats[(a, g)]) for a, g in paths]
    shifts = []
    for g in gammas:
        c, n = stats[("control", g)], stats[("nexus", g)]
        sc, sn = np.array([b == SHARED for b in c["basin"]]), np.array([b == SHARED for b in n["basin"]])
        dd = n["drift"] - c["drift"]
        shifts.append({"gamma": g, "d_frac_shared": float(sn.mean() - sc.mean()),
                       "n_more_shared": int((sn & ~sc).sum()), "n_less_shared": int((~sn & sc).sum()),
                       "d_downstream": float(np.mean(n["downstream"] - c["downstream"])),
                       "d_downstream_stderr": _se(n["downstream"] - c["downstream"]),
                       "d_drift": float(dd.mean()), "d_drift_stderr": _se(dd),
                       "d_end_cosine": float(np.mean(n["end_cosine"] - c["end_cosine"]))})
    sh, sp = land.minimize("train", land.shared_min), land.minimize("train", land.separated_centre)
    basin_losses = {SHARED: {"at": sh.tolist(), "train": float(land.loss("train", sh)),
                             "downstream": float(land.loss(land.downstream, sh))},
                    SEPARATED: {"at": sp.tolist(), "train": float(land.loss("train", sp)),
                                "downstream": float(land.loss(land.downstream, sp))}}
    sample_gamma = gammas[-1]
    pick = np.linspace(0, len(pairs) - 1, min(sample_paths, len(pairs))).round().astype(int)
    samples = {"adamw": paths[("adamw", None)][pick].tolist(),
               "control": paths[("control", sample_gamma)][pick].tolist(),
               "nexus": paths[("nexus", sample_gamma)][pick].tolist()}
    return MechanismResult(
        arms=list(ARMS), gammas=gammas, table=table, shifts=shifts, landscape=landscape_to_dict(land),
        basin_losses=basin_losses, starts=starts.tolist(), sample_paths=samples, sample_gamma=sample_gamma,
        settings={"n_orders": n_orders, "orders": orders, "steps": steps, "K": K, "lr": lr, "n_along": n_along,
                  "offsets": list(offsets), "runs_per_arm": len(pairs), "basin_radius": basin_radius,
                  "drift_steps": drift_steps,
                  "predicted_drift_per_gamma2": predicted_drift(land, starts, K),
                  "outer": "torch.optim.AdamW(betas=(0.9, 0.95), eps=1e-10, weight_decay=0), cosine lr to 0.1x",
                  "adamw": "AdamW on the mean of the K micro-batch gradients",
                  "control": "nexus_opt.Nexus(mode='parallel') around the same AdamW",
                  "nexus": "nexus_opt.Nexus(mode='sequential') around the same AdamW",
                  "order_free_arms_run_once_per_start": bool(free)},
        seconds=time.perf_counter() - t0, seed=seed)
