"""Hessian spectral density by stochastic Lanczos quadrature (SLQ): probes as one block, Gaussian broadening."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy.linalg import eigh_tridiagonal

from nexus_opt.errors import UserError

from .lanczos import lanczos_tridiagonals
from .result import Result
from .trace import rademacher

_SALT = 202  # density probes are independent of the trace probes


@dataclasses.dataclass
class SpectralDensity(Result):
    """The broadened density on `grid` (integrates to 1), and per probe the quadrature `nodes` and `weights`
    (each probe's weights sum to 1), from `probes` Lanczos runs of `steps` steps."""

    grid: list[float]
    values: list[float]
    nodes: list[list[float]]
    weights: list[list[float]]
    sigma: float
    probes: int
    steps: int
    hvps: int
    seed: int

    def mass_below(self, x: float) -> float:
        """The quadrature's fraction of eigenvalues <= x (averaged over probes)."""
        return float(np.mean([np.sum(np.asarray(w)[np.asarray(t) <= x]) for t, w in zip(self.nodes, self.weights)]))

    def moment(self, p: int) -> float:
        """Estimate of tr(H^p) / n (exact per probe for p < 2 * steps)."""
        return float(np.mean([np.sum(np.asarray(w) * np.asarray(t) ** p) for t, w in zip(self.nodes, self.weights)]))


def quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of one Lanczos run: nodes = Ritz values, weights = squared first eigenvector entries."""
    if len(alpha) == 1:
        return alpha.copy(), np.ones(1)
    theta, S = eigh_tridiagonal(alpha, beta)
    return theta, S[0, :] ** 2


def broaden(nodes: list[np.ndarray], weights: list[np.ndarray], sigma: float | None = None,
            sigma_rel: float = 0.005, grid_points: int = 1001) -> tuple[np.ndarray, np.ndarray, float]:
    """Sum of Gaussians (width sigma, default sigma_rel * spectral range) on a grid padded by 6 sigma;
    normalised to integrate to 1 on the grid."""
    allt = np.concatenate(nodes)
    lo, hi = float(allt.min()), float(allt.max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sigma = float(sigma) if sigma else sigma_rel * width
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, int(grid_points))
    dens = np.zeros_like(grid)
    for t, w in zip(nodes, weights):
        z = (grid[:, None] - t[None, :]) / sigma
        dens += (np.exp(-0.5 * z ** 2) * w[None, :]).sum(1) / (sigma * np.sqrt(2 * np.pi))
    dens /= len(nodes)
    total = np.trapezoid(dens, grid) if hasattr(np, "trapezoid") else np.trapz(dens, grid)
    return grid, dens / total, sigma


def spectral_density(op, probes: int = 4, steps: int = 80, *, seed: int = 0, sigma: float | None = None,
                     sigma_rel: float = 0.005, grid_points: int = 1001,
                     progress: Callable[[int, int], None] | None = None) -> SpectralDensity:
    """SLQ: `probes` normalised Rademacher starts advanced together (one matmat per step) for `steps` steps."""
    if probes < 1 or steps < 1:
        raise UserError(f"spectral density needs probes >= 1 and steps >= 1, got {probes} and {steps}")
    before = op.hvps
    Z = rademacher(op.n, probes, seed, 0, salt=_SALT)
    runs = lanczos_tridiagonals(op, Z, steps, progress=progress)
    quads = [quadrature(a, b) for a, b in runs]
    nodes = [q[0] for q in quads]
    weights = [q[1] / q[1].sum() for q in quads]
    grid, dens, sig = broaden(nodes, weights, sigma, sigma_rel, grid_points)
    return SpectralDensity(grid=grid.tolist(), values=dens.tolist(), nodes=[t.tolist() for t in nodes],
                           weights=[w.tolist() for w in weights], sigma=sig, probes=probes,
                           steps=max(len(a) for a, _ in runs), hvps=op.hvps - before, seed=seed)
