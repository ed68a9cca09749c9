"""Hessian spectral density by stochastic Lanczos quadrature (SLQ): probes as one block, Gaussian broadening."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from nexus_opt.errors import UserError

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


def lanczos_tridiagonals(op, starts: torch.Tensor, steps: int, *, reorth: bool | None = None,
                         basis_bytes: float | None = None,
                         progress: Callable[[int, int], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plain Lanczos from each column of `starts` (n, b), all advanced together by one matmat per step.

    Returns per start the tridiagonal (alpha, beta) after up to `steps` steps (fewer on breakdown). With
    `reorth` (default: when the b bases fit in `basis_bytes`) each recurrence is re-orthogonalised in full
    against its own basis, kept on the CPU in float64.
    """
    n, b = starts.shape
    steps = max(1, min(int(steps), n))
    if reorth is None:
        from .precision import BASIS_SHARE, available_bytes
        budget = BASIS_SHARE * available_bytes() if basis_bytes is None else basis_bytes
        reorth = 8.0 * b * steps * n <= budget
    Q = starts.detach().to("cpu", torch.float64).T.contiguous()  # (b, n): current vectors
    Q = Q / Q.norm(dim=1, keepdim=True)
    basis = torch.zeros(b, steps, n, dtype=torch.float64) if reorth else None
    if reorth:
        basis[:, 0] = Q
    alphas: list[list[float]] = [[] for _ in range(b)]
    betas: list[list[float]] = [[] for _ in range(b)]
    active = list(range(b))
    prev = torch.zeros_like(Q)
    prev_beta = [0.0] * b
    for step in range(steps):
        W = op.matmat(Q[active].T).detach().to("cpu", torch.float64).T
        still = []
        for col, i in enumerate(active):
            w = W[col].clone()
            a = float(Q[i] @ w)
            alphas[i].append(a)
            if step == steps - 1:
                continue
            w -= a * Q[i] + prev_beta[i] * prev[i]
            if reorth:
                B = basis[i, :step + 1]
                for _ in range(2):
                    w -= B.T @ (B @ w)
            bnorm = float(w.norm())
            if bnorm <= 1e-10 * max(abs(a), max(betas[i], default=0.0), 1e-300):
                continue  # invariant subspace: the quadrature is exact with the nodes so far
            betas[i].append(bnorm)
            prev[i] = Q[i]
            prev_beta[i] = bnorm
            Q[i] = w / bnorm
            if reorth:
                basis[i, step + 1] = Q[i]
            still.append(i)
        active = still
        if progress is not None:
            progress(step + 1, steps)
        if not active:
            break
    return [(np.asarray(alphas[i]), np.asarray(betas[i][:len(alphas[i]) - 1])) for i in range(b)]

