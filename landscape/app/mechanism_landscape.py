"""The mechanism toy's 2-D landscape (soft minima of quadratic wells: a shared and a separated basin of
equal training loss, a downstream domain low only at the shared minimum) and the expansion oracles."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError

SHARED, SEPARATED, UNDECIDED = "shared", "separated", "undecided"

# -- the landscape ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Landscape:
    """Soft-minimum-of-wells domain losses on R^2: L(theta) = -tau log sum_k exp(-(a/2 |theta - m_k|^2 + c_k) / tau)."""

    wells: dict  # domain -> list of (centre [x, y], offset c)
    train_domains: list
    downstream: str
    curvature: float
    tau: float
    shared_min: list  # s
    separated_centre: list  # p
    separated_minima: dict  # training domain -> its minimum near p
    spread: float  # d, the radius of the circle of separated minima

    def _arrays(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        w = self.wells[domain]
        return np.array([m for m, _ in w], dtype=float), np.array([c for _, c in w], dtype=float)

    def _weights(self, domain: str, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(softmax weights of the wells, theta - centres, well energies) at theta (..., 2)."""
        M, c = self._arrays(domain)
        diff = theta[..., None, :] - M  # (..., k, 2)
        e = 0.5 * self.curvature * (diff ** 2).sum(-1) + c
        z = -e / self.tau
        z = z - z.max(-1, keepdims=True)
        w = np.exp(z)
        return w / w.sum(-1, keepdims=True), diff, e

    def loss(self, domain: str, theta) -> np.ndarray:
        """The domain's loss at theta (any leading shape, last axis 2); 'train' is the mean over training domains."""
        theta = np.asarray(theta, dtype=float)
        if domain == "train":
            return sum(self.loss(d, theta) for d in self.train_domains) / len(self.train_domains)
        M, c = self._arrays(domain)
        e = 0.5 * self.curvature * ((theta[..., None, :] - M) ** 2).sum(-1) + c
        lo = e.min(-1)
        return lo - self.tau * np.log(np.exp(-(e - lo[..., None]) / self.tau).sum(-1))

    def grad(self, domain: str, theta) -> np.ndarray:
        """Exact gradient: sum_k w_k a (theta - m_k)."""
        theta = np.asarray(theta, dtype=float)
        if domain == "train":
            return sum(self.grad(d, theta) for d in self.train_domains) / len(self.train_domains)
        w, diff, _ = self._weights(domain, theta)
        return self.curvature * (w[..., None] * diff).sum(-2)

    def hessian(self, domain: str, theta) -> np.ndarray:
        """Exact Hessian at one point: a I - (1/tau) Cov_w[a (theta - m_k)]."""
        theta = np.asarray(theta, dtype=float)
        if domain == "train":
            return sum(self.hessian(d, theta) for d in self.train_domains) / len(self.train_domains)
        w, diff, _ = self._weights(domain, theta)
        v = self.curvature * diff  # (k, 2)
        mean = (w[:, None] * v).sum(0)
        cov = (w[:, None, None] * v[:, :, None] * v[:, None, :]).sum(0) - np.outer(mean, mean)
        return self.curvature * np.eye(2) - cov / self.tau

    def torch_loss(self, domain: str, theta: torch.Tensor) -> torch.Tensor:
        """The same loss as a differentiable torch function of a (2,) tensor (for autograd checks)."""
        M, c = (torch.as_tensor(x, dtype=theta.dtype) for x in self._arrays(domain))
        e = 0.5 * self.curvature * ((theta - M) ** 2).sum(-1) + c
        return -self.tau * torch.logsumexp(-e / self.tau, dim=0)

    def minimize(self, domain: str, start, iters: int = 50) -> np.ndarray:
        """Newton's method from `start` (damped to stay in the start's basin)."""
        x = np.asarray(start, dtype=float).copy()
        for _ in range(iters):
            g, H = self.grad(domain, x), self.hessian(domain, x)
            ev = np.linalg.eigvalsh(H)
            step = np.linalg.solve(H, g) if ev.min() > 1e-3 else g / self.curvature
            n = np.linalg.norm(step)
            x = x - (step if n < 0.5 else step * 0.5 / n)
            if n < 1e-13:
                break
        return x

    def basin(self, theta, radius: float) -> str:
        """SHARED within `radius` of s, SEPARATED within `radius` of the separated minima's hull, else UNDECIDED."""
        theta = np.asarray(theta, dtype=float)
        if np.linalg.norm(theta - np.asarray(self.shared_min)) < radius:
            return SHARED
        if np.linalg.norm(theta - np.asarray(self.separated_centre)) < self.spread + radius:
            return SEPARATED
        return UNDECIDED

    def mean_cosine(self, theta) -> float:
        """Mean cosine between the training domains' gradients over pairs i < j."""
        gs = [self.grad(d, theta) for d in self.train_domains]
        cs = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in itertools.combinations(gs, 2)]
        return float(np.mean(cs))


def make_landscape(n_domains: int = 2, separation: float = 3.0, spread: float = 0.75, curvature: float = 2.0,
                   tau: float = 0.25, downstream_offset: float = 1.5) -> Landscape:
    """The two-basin landscape: shared minimum s = (-separation/2, 0), separated minima on a circle of radius
    `spread` around p = (separation/2, 0); offsets tuned (Newton) so that the training loss has the same
    minimum value at both basins; the downstream domain has wells at s and at p + (downstream_offset, 0),
    both with the shared basin's offset, so it is low only at the intersection."""
    if int(n_domains) < 2:
        raise UserError(f"the toy needs at least 2 training domains, got {n_domains}")
    if not (separation > 0 and spread > 0 and curvature > 0 and tau > 0):
        raise UserError("separation, spread, curvature and tau must be positive")
    n = int(n_domains)
    s, p = np.array([-separation / 2, 0.0]), np.array([separation / 2, 0.0])
    angles = [math.pi / 2 + 2 * math.pi * i / n for i in range(n)]
    names = [chr(ord("A") + i) for i in range(n)]
    sep = {d: (p + spread * np.array([math.cos(t), math.sin(t)])) for d, t in zip(names, angles)}
    c_sep = 0.0
    c_shared = 0.5 * curvature * spread ** 2  # the mean of the separated quadratics at p: a d^2 / 2

    def build(c_sh: float) -> Landscape:
        wells = {d: [(s.tolist(), c_sh), (sep[d].tolist(), c_sep)] for d in names}
        wells["downstream"] = [(s.tolist(), c_sh), ((p + np.array([downstream_offset, 0.0])).tolist(), c_sh)]
        return Landscape(wells=wells, train_domains=names, downstream="downstream", curvature=curvature, tau=tau,
                         shared_min=s.tolist(), separated_centre=p.tolist(),
                         separated_minima={d: v.tolist() for d, v in sep.items()}, spread=spread)

    land = build(c_shared)
    for _ in range(6):  # the soft minimum shifts both minima slightly: equalise them exactly
        ls = float(land.loss("train", land.minimize("train", s)))
        lp = float(land.loss("train", land.minimize("train", p)))
        c_shared += lp - ls
        land = build(c_shared)
    return land


def ridge_starts(land: Landscape, n_along: int = 7, offsets: Sequence[float] = (-0.3, -0.1, 0.1, 0.3),
                 half_width: float = 1.2) -> np.ndarray:
    """A grid of starts on the ridge: for each of `n_along` heights y in [-half_width, half_width], the x of
    the training loss's maximum between the basins, plus each x offset (none exactly on the ridge)."""
    s, p = land.shared_min[0], land.separated_centre[0]
    xs = np.linspace(s, p, 2001)
    out = []
    for y in np.linspace(-half_width, half_width, n_along):
        vals = land.loss("train", np.stack([xs, np.full_like(xs, y)], -1))
        x0 = float(xs[int(np.argmax(vals))])
        out += [[x0 + o, float(y)] for o in offsets]
    return np.asarray(out)


def landscape_to_dict(land: Landscape) -> dict:
    return dataclasses.asdict(land)


def landscape_from_dict(d: dict) -> Landscape:
    """The Landscape recorded in a MechanismResult (for re-rendering from JSON)."""
    return Landscape(wells={k: [(list(m), float(c)) for m, c in v] for k, v in d["wells"].items()},
                     train_domains=list(d["train_domains"]), downstream=d["downstream"],
                     curvature=float(d["curvature"]), tau=float(d["tau"]), shared_min=list(d["shared_min"]),
                     separated_centre=list(d["separated_centre"]), separated_minima=dict(d["separated_minima"]),
                     spread=float(d["spread"]))


# -- the expansion (test oracle) ------------------------------------------------------------------------------
def expected_displacement(land: Landscape, theta, gamma: float, K: int) -> np.ndarray:
    """E[theta_0 - theta_K] of one Nexus outer step from theta, exactly: the mean over all N^K domain orders
    of the real Nexus's pseudo-gradient (outer SGD with lr 0, so .grad holds theta_0 - theta_K)."""
    from nexus_opt import Nexus

    names = land.train_domains
    total = np.zeros(2)
    for seq in itertools.product(range(len(names)), repeat=K):
        p = torch.nn.Parameter(torch.tensor(np.asarray(theta, dtype=float), dtype=torch.float64))
        opt = Nexus(torch.optim.SGD([p], lr=0.0), inner_lr=gamma, inner_steps=K)
        for i in seq:
            p.grad = torch.from_numpy(land.grad(names[i], p.detach().numpy()))
            opt.step()
        total += p.grad.numpy()
    return total / len(names) ** K


def mean_displacement(land: Landscape, theta, gamma: float, K: int) -> np.ndarray:
    """E[theta_0 - theta_K] over all N^K orders by a plain numpy walk sharing prefixes (the same number as
    expected_displacement, which drives the real optimizer; this one is fast enough for every start)."""
    names = land.train_domains

    def mean_end(x, m):
        if m == K:
            return x
        out = np.zeros(2)
        for d in names:
            g = land.grad(d, x)
            n = np.linalg.norm(g)
            out += mean_end(x - gamma * g / n if n > 0 else x, m + 1)
        return out / len(names)

    x0 = np.asarray(theta, dtype=float)
    return x0 - mean_end(x0, 0)


def expansion_terms(land: Landscape, theta, gamma: float, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) order terms of E[theta_0 - theta_K] (nexus.md): gamma K mean_i u_i and
    -gamma^2 K(K-1)/(2 N^2) sum_{i,j} J_i u_j with J_i = (I - u_i u_i^T) H_i / ||g_i||."""
    N = len(land.train_domains)
    us, Js = [], []
    for d in land.train_domains:
        g, H = land.grad(d, theta), land.hessian(d, theta)
        n = np.linalg.norm(g)
        u = g / n
        us.append(u)
        Js.append((np.eye(2) - np.outer(u, u)) @ H / n)
    first = gamma * K * np.mean(us, axis=0)
    second = -gamma ** 2 * K * (K - 1) / (2 * N ** 2) * sum(J @ u for J in Js for u in us)
    return first, second
