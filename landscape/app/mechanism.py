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
                                  expected_displacement, landscape_from_dict, mean_displacement, landscape_to_dict, make_landscape,
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
    shifts: list = dataclasses.field(default_factory=list)  # per gamma: Nexus minus control, clustered by start
    expansion_check: list = dataclasses.field(default_factory=list)  # per gamma: |exact - first - second| / |second|
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
        """What the numbers show, AdamW beside the control and Nexus, intervals clustered by start, signs as
        measured; the same words whichever way they fall."""
        a, T0 = self.row("adamw"), self.settings.get("drift_steps")
        bl = self.basin_losses
        S = self.settings.get("n_starts", a.get("n_starts"))
        lines = [f"The two basins have training loss {bl[SHARED]['train']:.4f} (shared) and "
                 f"{bl[SEPARATED]['train']:.4f} (separated), downstream loss {bl[SHARED]['downstream']:.3f} and "
                 f"{bl[SEPARATED]['downstream']:.3f}; {a['n']} runs per arm from {S} starts "
                 f"{self.settings.get('start_distance', 0):g} from the ridge (AdamW and the control see no order: "
                 f"one run per start); intervals are 95% over starts."]

        def ci(v):
            return "n/a" if v is None or v[0] is None else f"[{v[0]:+.3g}, {v[1]:+.3g}]"

        def pct(v):
            return "n/a" if v is None or v[0] is None else f"[{v[0]:+.0%}, {v[1]:+.0%}]"

        for sh in self.shifts:
            c, n = self.row("control", sh["gamma"]), self.row("nexus", sh["gamma"])
            lines.append(
                f"gamma={sh['gamma']:g}: ends in the shared basin: AdamW {a['frac_shared']:.0%}, control "
                f"{c['frac_shared']:.0%}, Nexus {n['frac_shared']:.0%} (Nexus minus control {sh['d_frac_shared']:+.0%} "
                f"{pct(sh.get('d_frac_shared_ci'))}; {sh['n_more_shared']} runs from {sh.get('starts_more_shared', '?')} "
                f"starts moved into it, {sh['n_less_shared']} from {sh.get('starts_less_shared', '?')} out of it); mean "
                f"downstream loss AdamW {a['downstream_mean']:.3f}, control {c['downstream_mean']:.3f}, Nexus "
                f"{n['downstream_mean']:.3f} (Nexus minus control {sh['d_downstream']:+.3f} "
                f"{ci(sh.get('d_downstream_ci'))}); gradient cosine at the end AdamW {a['end_cosine_mean']:+.3f}, "
                f"control {c['end_cosine_mean']:+.3f}, Nexus {n['end_cosine_mean']:+.3f}; drift towards the shared "
                f"basin after {T0} outer steps AdamW {a['drift_mean']:+.4f}, control {c['drift_mean']:+.4f}, Nexus "
                f"{n['drift_mean']:+.4f}, Nexus minus control {sh['d_drift']:+.4f} {ci(sh.get('d_drift_ci'))} "
                f"({'towards' if sh['d_drift'] > 0 else 'away from' if sh['d_drift'] < 0 else 'neither towards nor away from'} "
                f"the shared basin).")
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
                     f"{trend(dr)} ({', '.join(f'{x:+.4f}' for x in dr)}; positive: towards the shared basin); the "
                     f"expansion's second-order term at the starts points "
                     f"{'towards' if self.settings['predicted_drift_per_gamma2'] > 0 else 'away from'} the shared basin.")
        if self.expansion_check:
            ok = [e["gamma"] for e in self.expansion_check if e["median_residual_over_second"] < 0.25]
            lines.append("One outer step's exact mean displacement against the second-order expansion, median over "
                         "the starts of |exact - first - second| / |second|: "
                         + ", ".join(f"{e['median_residual_over_second']:.2g} at gamma {e['gamma']:g}"
                                     for e in self.expansion_check)
                         + (f"; the expansion describes the step (ratio below 0.25) only at gamma "
                            f"{', '.join(f'{g:g}' for g in ok)}." if ok else
                            "; the expansion does not describe the step (ratio 0.25 or more) at any gamma checked."))
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


def clustered(values, clusters, level: float = 0.95) -> dict:
    """Mean of per-run values with a standard error and t-interval clustered by start: the runs of one start
    (its domain orders; AdamW and the control are one run per start, repeated) are averaged first, and the
    interval is over the starts (n_starts - 1 degrees of freedom, scipy.stats.t)."""
    from scipy import stats as st

    v, c = np.asarray(values, dtype=float), np.asarray(clusters)
    means = np.array([v[c == k].mean() for k in dict.fromkeys(c.tolist())])
    n = len(means)
    out = {"mean": float(means.mean()), "stderr": None, "ci_low": None, "ci_high": None, "n_starts": n}
    if n > 1:
        se = float(means.std(ddof=1) / math.sqrt(n))
        half = float(st.t.ppf(0.5 + level / 2, n - 1)) * se
        out.update(stderr=se, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def _summary(arm: str, gamma, st: dict, clusters) -> dict:
    b, n = st["basin"], len(st["basin"])
    dn, dr = clustered(st["downstream"], clusters), clustered(st["drift"], clusters)
    return {"arm": arm, "gamma": gamma, "n": n, "n_starts": dn["n_starts"],
            "frac_shared": b.count(SHARED) / n, "frac_separated": b.count(SEPARATED) / n,
            "frac_undecided": b.count(UNDECIDED) / n,
            "train_mean": float(np.mean(st["train"])), "downstream_mean": float(np.mean(st["downstream"])),
            "downstream_stderr": dn["stderr"], "end_cosine_mean": float(np.mean(st["end_cosine"])),
            "drift_mean": float(np.mean(st["drift"])), "drift_stderr": dr["stderr"]}


def predicted_drift(land: Landscape, starts, K: int, gamma: float = 1.0) -> float:
    """Mean over `starts` of the outer step's second-order part projected towards the shared basin (the outer
    optimizer steps along minus the pseudo-gradient, so this is -second . e); scales as gamma^2."""
    e = _toward_shared(land)
    return float(np.mean([-expansion_terms(land, x, gamma, K)[1] @ e for x in starts]))


def mechanism_toy(gammas: Sequence[float] = DEFAULT_GAMMAS, *, seed: int = 0, n_orders: int = 3, steps: int = 40,
                  K: int = 4, lr: float = 0.1, n_along: int = 7, offsets: Sequence[float] = (-0.2, 0.2),
                  orders: str = "balanced", n_domains: int = 2, basin_radius: float = 0.75, drift_steps: int = 10,
                  sample_paths: int = 6, landscape: Landscape | None = None,
                  start_distance: float | None = None, check_gammas: Sequence[float] = (0.005, 0.01)) -> MechanismResult:
    """AdamW, the control (Nexus parallel) and Nexus from every (ridge start, domain order) pair, at every gamma.

    With balanced orders the sum of each outer step's K gradients does not depend on the order, so AdamW and the
    control run once per start (with the first order) and are paired with every order's Nexus run; every
    interval is therefore clustered by start (`clustered`). `start_distance` d: the starts sit at -d and +d from
    the ridge (in place of `offsets`). The second-order expansion of one outer step's mean displacement is checked
    at every start for each gamma of the run and of `check_gammas` (`expansion_check`: the median over starts of
    |exact - first - second| / |second|).
    """
    if start_distance is not None:
        if not (0 < float(start_distance) < 1.5):
            raise UserError(f"start distance must be in (0, 1.5) (the basins are 1.5 from the ridge), got {start_distance}")
        offsets = (-float(start_distance), float(start_distance))
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
    clusters = np.array([s_ for s_, _ in pairs])
    table = [_summary(a, g, stats[(a, g)], clusters) for a, g in paths]
    shifts = []
    for g in gammas:
        c, n = stats[("control", g)], stats[("nexus", g)]
        sc, sn = np.array([b == SHARED for b in c["basin"]]), np.array([b == SHARED for b in n["basin"]])
        dd, dn, de = (clustered(n[k] - c[k], clusters) for k in ("drift", "downstream", "end_cosine"))
        df = clustered(sn.astype(float) - sc.astype(float), clusters)
        shifts.append({"gamma": g, "d_frac_shared": float(sn.mean() - sc.mean()),
                       "d_frac_shared_ci": [df["ci_low"], df["ci_high"]],
                       "n_more_shared": int((sn & ~sc).sum()), "n_less_shared": int((~sn & sc).sum()),
                       "starts_more_shared": int(len(set(clusters[sn & ~sc].tolist()))),
                       "starts_less_shared": int(len(set(clusters[~sn & sc].tolist()))),
                       "d_downstream": dn["mean"], "d_downstream_stderr": dn["stderr"],
                       "d_downstream_ci": [dn["ci_low"], dn["ci_high"]],
                       "d_drift": dd["mean"], "d_drift_stderr": dd["stderr"], "d_drift_ci": [dd["ci_low"], dd["ci_high"]],
                       "d_end_cosine": de["mean"], "d_end_cosine_ci": [de["ci_low"], de["ci_high"]],
                       "n_starts": dd["n_starts"]})
    check = []
    for g in sorted(set(float(x) for x in check_gammas) | set(gammas)):
        ratios = []
        for x in starts:
            first, second = expansion_terms(land, x, g, K)
            exact = mean_displacement(land, x, g, K)
            ratios.append(float(np.linalg.norm(exact - first - second) / np.linalg.norm(second)))
        check.append({"gamma": g, "median_residual_over_second": float(np.median(ratios)),
                      "max_residual_over_second": float(np.max(ratios))})
    sh, sp = land.minimize("train", land.shared_min), land.minimize("train", land.separated_centre)
    basin_losses = {SHARED: {"at": sh.tolist(), "train": float(land.loss("train", sh)),
                             "downstream": float(land.loss(land.downstream, sh))},
                    SEPARATED: {"at": sp.tolist(), "train": float(land.loss("train", sp)),
                                "downstream": float(land.loss(land.downstream, sp))}}
    sample_gamma = gammas[-1]
    pick = np.linspace(0, len(pairs) - 1, max(0, min(sample_paths, len(pairs)))).round().astype(int)
    samples = {"adamw": paths[("adamw", None)][pick].tolist(),
               "control": paths[("control", sample_gamma)][pick].tolist(),
               "nexus": paths[("nexus", sample_gamma)][pick].tolist()}
    return MechanismResult(
        arms=list(ARMS), gammas=gammas, table=table, shifts=shifts, expansion_check=check,
        landscape=landscape_to_dict(land),
        basin_losses=basin_losses, starts=starts.tolist(), sample_paths=samples, sample_gamma=sample_gamma,
        settings={"n_orders": n_orders, "orders": orders, "steps": steps, "K": K, "lr": lr, "n_along": n_along,
                  "offsets": list(offsets), "start_distance": float(max(abs(o) for o in offsets)),
                  "n_starts": int(len(starts)), "runs_per_arm": len(pairs), "basin_radius": basin_radius,
                  "drift_steps": drift_steps,
                  "predicted_drift_per_gamma2": predicted_drift(land, starts, K),
                  "outer": "torch.optim.AdamW(betas=(0.9, 0.95), eps=1e-10, weight_decay=0), cosine lr to 0.1x",
                  "adamw": "AdamW on the mean of the K micro-batch gradients",
                  "control": "nexus_opt.Nexus(mode='parallel') around the same AdamW",
                  "nexus": "nexus_opt.Nexus(mode='sequential') around the same AdamW",
                  "order_free_arms_run_once_per_start": bool(free)},
        seconds=time.perf_counter() - t0, seed=seed)


def start_distance_sweep(distances: Sequence[float] = (0.05, 0.1, 0.2), gammas: Sequence[float] = DEFAULT_GAMMAS,
                         **kw) -> list[dict]:
    """The toy's outcome against how far from the ridge the starts sit: per distance, the shared-basin fraction
    of AdamW, the control and Nexus at each gamma and the runs (and starts) Nexus moved in or out, relative to the
    control. `kw`: mechanism_toy() keywords (seed, n_orders, n_along, steps, ...)."""
    try:
        distances = sorted(float(d) for d in distances)
    except (TypeError, ValueError):
        raise UserError(f"start distances must be numbers, got {distances!r}") from None
    if not distances or len(set(distances)) != len(distances):
        raise UserError(f"start distances must be distinct numbers, got {distances}")
    return [sweep_entry(mechanism_toy(gammas, start_distance=d, sample_paths=0, **kw)) for d in distances]


def sweep_entry(r: MechanismResult) -> dict:
    """One start distance's row of start_distance_sweep from a finished toy run."""
    a = r.row("adamw")
    return {"distance": r.settings["start_distance"], "runs": a["n"], "n_starts": a["n_starts"],
            "adamw": a["frac_shared"],
            "per_gamma": [{"gamma": sh["gamma"], "control": r.row("control", sh["gamma"])["frac_shared"],
                           "nexus": r.row("nexus", sh["gamma"])["frac_shared"],
                           "d_frac_shared": sh["d_frac_shared"], "d_frac_shared_ci": sh["d_frac_shared_ci"],
                           "n_more_shared": sh["n_more_shared"], "n_less_shared": sh["n_less_shared"],
                           "starts_more_shared": sh["starts_more_shared"]} for sh in r.shifts]}


def sweep_reading(sweep: list[dict]) -> str:
    """One line per start distance: AdamW, the control and Nexus side by side (the same words either way)."""
    lines = []
    for s in sweep:
        parts = [f"gamma {p['gamma']:g}: control {p['control']:.0%}, Nexus {p['nexus']:.0%} "
                 f"({p['n_more_shared']:+d}/-{p['n_less_shared']} runs moved in/out)" for p in s["per_gamma"]]
        lines.append(f"starts {s['distance']:g} from the ridge ({s['runs']} runs, {s['n_starts']} starts): shared-basin "
                     f"fraction AdamW {s['adamw']:.0%}; " + "; ".join(parts) + ".")
    return "\n".join(lines)
