"""Extreme Hessian eigenvalues: thick-restart Lanczos (float64, full re-orthogonalisation) and scipy eigsh."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from nexus_opt.errors import UserError

WHICH = ("top", "bottom", "both", "magnitude")
_ALIASES = {"LA": "top", "SA": "bottom", "BE": "both", "LM": "magnitude"}


@dataclasses.dataclass
class EigenResult:
    """Wanted Ritz pairs: `top` (descending), `bottom` (ascending) or `magnitude` (by |value|, descending).

    `residuals` are ||H v - lambda v|| per eigenvalue (unit v); `errors` the eigenvalue error bounds
    min(r, r^2/gap); `converged` says each met the stopping test at `tol`, relative to |lambda| floored at
    1e-3 of the spectral norm (values near zero). Vectors (n, k) on the CPU when asked for.
    """

    which: str
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    bottom_eigenvalues: list[float] | None = None
    bottom_residuals: list[float] | None = None
    bottom_converged: list[bool] | None = None
    errors: list[float] | None = None
    bottom_errors: list[float] | None = None
    hvps: int = 0
    iterations: int = 0
    restarts: int = 0
    backend: str = "lanczos"
    vectors: torch.Tensor | None = None
    bottom_vectors: torch.Tensor | None = None

    @property
    def all_converged(self) -> bool:
        return all(self.converged) and all(self.bottom_converged or [])


def _which(which: str) -> str:
    which = _ALIASES.get(which, which)
    if which not in WHICH:
        raise UserError(f"unknown eigenvalue selection '{which}'; choose one of {list(WHICH)}")
    return which


def start_vector(n: int, seed: int) -> torch.Tensor:
    """A deterministic Gaussian unit vector from a seed (CPU float64)."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return v / v.norm()


def _select(theta: np.ndarray, k: int, end: str) -> np.ndarray:
    """Indices of the k wanted Ritz values (theta ascending) for one end."""
    m = len(theta)
    k = min(k, m)
    if end == "top":
        return np.arange(m - 1, m - 1 - k, -1)
    if end == "bottom":
        return np.arange(k)
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def _ends(which: str) -> list[str]:
    return ["top", "bottom"] if which == "both" else [which]


def _budget_basis(n: int, kw: int, basis_bytes: float) -> int:
    """Default basis size: as many float64 vectors as fit in basis_bytes, at least 2 kw + 10, at most 200 or n."""
    fit = int(basis_bytes // (8 * max(n, 1)))
    return max(2, min(n, max(min(fit, 200), 2 * kw + 10)))


def _result(which: str, out: dict, ends, **info) -> EigenResult:
    """An EigenResult from per-end tuples (values, residuals, converged, vectors, errors)."""
    first = out[ends[0]]
    bottom = out.get("bottom") if which == "both" else None
    return EigenResult(which=which, eigenvalues=first[0], residuals=first[1], converged=first[2],
                       bottom_eigenvalues=bottom[0] if bottom else None,
                       bottom_residuals=bottom[1] if bottom else None,
                       bottom_converged=bottom[2] if bottom else None,
                       errors=first[4], bottom_errors=bottom[4] if bottom else None,
                       vectors=first[3], bottom_vectors=bottom[3] if bottom else None, **info)


def lanczos(op, k: int = 5, which: str = "both", *, tol: float = 1e-8, max_hvps: int | None = None,
            max_basis: int | None = None, seed: int = 0, v0: torch.Tensor | None = None,
            return_vectors: bool = False, basis_bytes: float = 2 ** 31, strict: bool = False,
            progress: Callable[[int, int], None] | None = None) -> EigenResult:
    """k extreme eigenpairs of a symmetric operator (`op.n`, `op.matvec`) by thick-restart Lanczos.

    The basis (at most `max_basis` vectors, default what fits in `basis_bytes`) lives on the CPU in float64
    and is re-orthogonalised in full (two Gram-Schmidt passes) at every step, so both ends converge together
    from one Krylov space. Stops when every wanted pair has an eigenvalue error bound min(r, r^2/gap) <=
    tol * |lambda| and a residual r <= sqrt(tol) * |lambda| (`strict`: r <= tol * |lambda|, as ARPACK), when
    the space is exhausted, or at max_hvps. The start vector is a Gaussian from `seed`.
    """
    which = _which(which)
    n = int(op.n)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    k = min(int(k), n)
    ends = _ends(which)
    kw = min(n, k * len(ends))
    m_max = min(n, int(max_basis)) if max_basis else _budget_basis(n, kw, basis_bytes)
    if m_max < min(n, kw + 2):
        raise UserError(f"max_basis {m_max} is too small for {kw} wanted eigenvalues; use at least {kw + 2}")
    max_hvps = int(max_hvps) if max_hvps else max(500, 20 * kw)
    start_hvps = getattr(op, "hvps", 0)
    gen = torch.Generator().manual_seed(int(seed) + 1)

    V = torch.zeros(m_max + 1, n, dtype=torch.float64)  # rows are the basis vectors (contiguous)
    T = np.zeros((m_max + 1, m_max + 1))
    v = start_vector(n, seed) if v0 is None else v0.detach().reshape(-1).to("cpu", torch.float64)
    if v.numel() != n or not float(v.norm()) > 0:
        raise UserError(f"start vector must be a non-zero vector of {n} entries")
    V[0] = v / v.norm()
    j, used, restarts, iterations = 0, 0, 0, 0
    theta = S = res = None
    beta = 0.0
    while True:
        w = op.matvec(V[j]).detach().to("cpu", torch.float64)
        used += 1
        iterations += 1
        B = V[:j + 1]
        h = B @ w
        w -= B.T @ h
        h2 = B @ w  # second pass: full re-orthogonalisation to working precision
        w -= B.T @ h2
        h = (h + h2).numpy()
        T[:j + 1, j] = h
        T[j, :j + 1] = h
        beta = float(w.norm())
        m = j + 1
        theta, S = scipy.linalg.eigh(T[:m, :m], check_finite=False)  # numpy's eigh oversubscribes threads
        res = beta * np.abs(S[m - 1, :])
        scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        done = _all_converged(theta, res, k, ends, tol, scale, strict)
        if progress is not None:
            progress(used, max_hvps)
        if done or m == n or used >= max_hvps:
            break
        if beta <= 64 * np.finfo(float).eps * scale * math.sqrt(m):  # invariant subspace: continue elsewhere
            w = torch.randn(n, generator=gen, dtype=torch.float64)
            for _ in range(2):
                w -= V[:m].T @ (V[:m] @ w)
            if float(w.norm()) <= 1e-8:
                break
            beta = 0.0
            res = np.zeros_like(res)
        if m == m_max:  # thick restart: keep the wanted Ritz vectors and the best of the rest
            keep = _keep(theta, k, ends, m)
            Y = torch.from_numpy(S[:, keep].T.copy()) @ V[:m]
            kk = len(keep)
            V[:kk] = Y
            T[:] = 0.0
            T[np.arange(kk), np.arange(kk)] = theta[keep]
            j = kk
            restarts += 1
        else:
            j = m
        V[j] = w / float(w.norm())

    m = len(theta)
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    est = error_estimates(theta, res)
    out = {}
    for end in ends:
        idx = _select(theta, k, end)
        conv = [_converged(theta, res, est, i, tol, scale, strict) for i in idx]
        if m == n and beta <= 1e-6 * scale:  # the whole space: Ritz pairs are eigenpairs
            conv = [True] * len(conv)
        vecs = (V[:m].T @ torch.from_numpy(S[:, idx].copy())) if return_vectors else None
        out[end] = (theta[idx].tolist(), res[idx].tolist(), conv, vecs, est[idx].tolist())
    hvps = getattr(op, "hvps", start_hvps + used) - start_hvps
    return _result(which, out, ends, hvps=hvps, iterations=iterations, restarts=restarts, backend="lanczos")


def _thresh(value: float, tol: float, scale: float) -> float:
    """Tolerance unit for one Ritz value: |value|, floored at 1e-3 of the spectral norm (values near zero)."""
    return tol * max(abs(value), 1e-3 * scale)


def error_estimates(theta: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Eigenvalue error bounds min(r, r^2 / gap) per Ritz value (gap: to the nearest other Ritz value, less
    that value's residual); the r^2/gap bound is what makes 1e-8 reachable with residuals near 1e-5."""
    theta, res = np.asarray(theta, dtype=float), np.asarray(res, dtype=float)
    if len(theta) < 2:
        return res.copy()
    d = np.abs(theta[:, None] - theta[None, :]) - res[None, :]
    np.fill_diagonal(d, np.inf)
    gap = d.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sharp = np.where(gap > 0, res ** 2 / np.where(gap > 0, gap, 1.0), np.inf)
    return np.minimum(res, sharp)


def _converged(theta, res, est, i, tol, scale, strict) -> bool:
    """Residual test (strict: r <= tol |lambda|) or error test (bound <= tol |lambda| and r <= sqrt(tol) |lambda|)."""
    unit = _thresh(theta[i], 1.0, scale)
    if strict:
        return bool(res[i] <= tol * unit)
    return bool(est[i] <= tol * unit and res[i] <= math.sqrt(tol) * unit)


def _all_converged(theta, res, k, ends, tol, scale, strict) -> bool:
    est = error_estimates(theta, res)
    for end in ends:
        idx = _select(theta, k, end)
        if len(idx) < k or not all(_converged(theta, res, est, i, tol, scale, strict) for i in idx):
            return False
    return True


def _keep(theta: np.ndarray, k: int, ends: list[str], m: int) -> np.ndarray:
    """Ritz vectors kept at a restart: the wanted ones plus neighbours, about half the basis."""
    kk = min(m - 1, max(k * len(ends) + 2, m // 2))
    if len(ends) == 2:
        hi = kk // 2 + kk % 2
        idx = np.concatenate([_select(theta, hi, "top"), _select(theta, kk - hi, "bottom")])
    else:
        idx = _select(theta, kk, ends[0])
    return np.unique(idx)


def eigsh(op, k: int = 5, which: str = "both", *, tol: float = 1e-8, max_hvps: int | None = None,
          seed: int = 0, return_vectors: bool = False, progress=None) -> EigenResult:
    """The same eigenpairs by scipy's ARPACK (implicitly restarted Lanczos) on `op.to_scipy()`.

    Residuals are measured afterwards with one batched product of the returned vectors (counted in hvps).
    """
    from scipy.sparse.linalg import ArpackNoConvergence
    from scipy.sparse.linalg import eigsh as _eigsh

    which = _which(which)
    n = int(op.n)
    k = min(int(k), n)
    ends = _ends(which)
    kw = k * len(ends)
    start = op.hvps
    if kw >= n - 1:  # ARPACK needs k < n - 1: take the whole (small) matrix
        H = op.to_dense().cpu().numpy()
        vals, vecs = scipy.linalg.eigh(H, check_finite=False)
        iterations = n
    else:
        arpack_which = {"top": "LA", "bottom": "SA", "both": "BE", "magnitude": "LM"}[which]
        ncv = min(n, max(2 * kw + 1, 20))
        maxiter = max(1, (int(max_hvps) if max_hvps else max(500, 20 * kw)) // max(ncv - kw, 1))
        v0 = start_vector(n, seed).numpy()
        try:
            vals, vecs = _eigsh(op.to_scipy(), k=kw, which=arpack_which, tol=tol, v0=v0, ncv=ncv, maxiter=maxiter)
        except ArpackNoConvergence as e:
            vals, vecs = e.eigenvalues, e.eigenvectors
        order = np.argsort(vals)
        vals, vecs = vals[order], vecs[:, order]
        iterations = op.hvps - start
    Vt = torch.from_numpy(np.ascontiguousarray(vecs))
    R = op.matmat(Vt).cpu().double() - Vt * torch.from_numpy(vals)[None, :] if len(vals) else Vt
    res = R.norm(dim=0).numpy() if len(vals) else np.zeros(0)
    scale = max(float(np.max(np.abs(vals))) if len(vals) else 0.0, np.finfo(float).tiny)
    est = error_estimates(vals, res)
    out = {}
    for end in ends:
        idx = _select(vals, k, end)
        out[end] = (vals[idx].tolist(), res[idx].tolist(),
                    [_converged(vals, res, est, i, tol, scale, False) for i in idx],
                    Vt[:, idx] if return_vectors else None, est[idx].tolist())
    if progress is not None:
        progress(op.hvps - start, op.hvps - start)
    return _result(which, out, ends, hvps=op.hvps - start, iterations=iterations, restarts=0, backend="eigsh")


def lanczos_tridiagonals(op, starts: torch.Tensor, steps: int, *, reorth: bool | None = None,
                         basis_bytes: float = 2 ** 31,
                         progress: Callable[[int, int], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plain Lanczos from each column of `starts` (n, b), all advanced together by one matmat per step.

    Returns per start the tridiagonal (alpha, beta) after up to `steps` steps (fewer on breakdown). With
    `reorth` (default: when the b bases fit in `basis_bytes`) each recurrence is re-orthogonalised in full
    against its own basis, kept on the CPU in float64.
    """
    n, b = starts.shape
    steps = max(1, min(int(steps), n))
    if reorth is None:
        reorth = 8.0 * b * steps * n <= basis_bytes
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
