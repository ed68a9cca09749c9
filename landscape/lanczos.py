"""Extreme Hessian eigenvalues by thick-restart Lanczos (float64, full re-orthogonalisation), the deflated check
for missing multiplicities, and batched Lanczos tridiagonals (spectral density). Result types and the dense
and eigsh backends are in landscape.eigen (re-exported here)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from nexus_opt.errors import UserError

from .basis import Basis as _Basis
from .eigen import (DENSE_MAX_N, WHICH, EigenResult, RitzPairs, _all_converged, _converged, _ends, _keep,  # noqa: F401
                    _budget_basis, _result, basis_plan, _select, _thresh, _which, dense, eigsh, error_estimates, start_vector)


def lanczos(op, k: int = 5, which: str = "both", *, tol: float = 1e-8, max_hvps: int | None = None,
            max_basis: int | None = None, seed: int = 0, v0: torch.Tensor | None = None,
            return_vectors: bool = False, basis_bytes: float | None = None, strict: bool = False,
            verify: bool = True, progress: Callable[[int, int], None] | None = None) -> EigenResult:
    """k extreme eigenpairs of a symmetric operator (`op.n`, `op.matvec`) by thick-restart Lanczos, with
    multiplicities: once converged, the found eigenvectors are locked (deflated) and a fresh Lanczos run from
    a new random start looks for anything further out; each eigenvalue it finds is locked in and the check
    repeats, so an exactly repeated or clustered eigenvalue is returned as often as it occurs. `converged`
    is True only when that final check found nothing beyond (verify=False skips it; see `verify_extremes`).
    Within one run (`_lanczos_run`): """
    max_total = int(max_hvps) if max_hvps else None
    start = getattr(op, "hvps", None)
    res = _lanczos_run(op, k, which, tol=tol, max_hvps=max_hvps, max_basis=max_basis, seed=seed, v0=v0,
                       return_vectors=True, basis_bytes=basis_bytes, strict=strict, progress=progress)
    if verify:
        res = verify_extremes(op, res, k, which, tol=tol, seed=seed, strict=strict, basis_bytes=basis_bytes,
                              max_hvps=None if max_total is None else max(0, max_total - res.hvps),
                              progress=progress)
    if start is not None:
        res.hvps = op.hvps - start
    if not return_vectors:
        res.vectors = res.bottom_vectors = None
    return res


def _lanczos_run(op, k: int = 5, which: str = "both", *, tol: float = 1e-8, max_hvps: int | None = None,
                 max_basis: int | None = None, seed: int = 0, v0: torch.Tensor | None = None,
                 return_vectors: bool = False, basis_bytes: float | None = None, strict: bool = False,
                 deflate: torch.Tensor | None = None,
                 progress: Callable[[int, int], None] | None = None) -> EigenResult:
    """k extreme eigenpairs of a symmetric operator (`op.n`, `op.matvec`) by thick-restart Lanczos, restricted
    to the orthogonal complement of the orthonormal columns of `deflate` (n, L) when given.

    The basis (at most `max_basis` vectors, default eigen.basis_plan within `basis_bytes`) lives on the CPU
    (or in a temporary file where it does not fit), in float64 (float32 rows where only those fit), and is
    re-orthogonalised in full in float64 (two
    Gram-Schmidt passes in float64, the second where the first lost digits: DGKS) at every step, so both ends converge together from one Krylov space; the
    products may be float32 (the operator's dtype), the recurrence is float64. Stops when every wanted pair
    has an eigenvalue error bound min(r, r^2/gap) <= tol * |lambda| and a residual r <= sqrt(tol) * |lambda|
    (`strict`: r <= tol * |lambda|, as ARPACK), when the space is exhausted, or at max_hvps. The start vector
    is a Gaussian from `seed`.
    """
    which = _which(which)
    n_full = int(op.n)
    D = None if deflate is None or deflate.shape[1] == 0 else deflate.detach().to("cpu", torch.float64)
    n = n_full - (0 if D is None else D.shape[1])  # dimension of the searched space
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if n < 1:
        raise UserError("nothing left to search: the deflated space is empty")
    k = min(int(k), n)
    ends = _ends(which)
    kw = min(n, k * len(ends))
    if max_basis:
        m_max, bdt, disk = min(n, int(max_basis)), torch.float64, False
    else:
        plan = basis_plan(n_full, kw, basis_bytes)
        m_max, bdt, disk = min(plan.rows, n), plan.dtype, plan.disk
    if m_max < min(n, kw + 2):
        raise UserError(f"max_basis {m_max} is too small for {kw} wanted eigenvalues; use at least {kw + 2}")
    max_hvps = int(max_hvps) if max_hvps else max(500, 20 * kw)
    start_hvps = getattr(op, "hvps", 0)
    gen = torch.Generator().manual_seed(int(seed) + 1)

    def project(x: torch.Tensor) -> torch.Tensor:  # remove the deflated directions (twice: to working
        if D is not None:  # precision), in place: x is always the run's own vector
            for _ in range(2):
                x.addmv_(D, D.T @ x, alpha=-1.0)
        return x

    V = _Basis(n_full, bdt, m_max + 1, disk=disk)  # rows are the basis vectors
    try:
        return _iterate(op, V, m_max=m_max, k=k, ends=ends, which=which, n=n, n_full=n_full, tol=tol,
                        max_hvps=max_hvps, strict=strict, seed=seed, v0=v0, project=project, gen=gen,
                        start_hvps=start_hvps, return_vectors=return_vectors, progress=progress)
    finally:
        V.close()


def _iterate(op, V, *, m_max, k, ends, which, n, n_full, tol, max_hvps, strict, seed, v0, project, gen,
             start_hvps, return_vectors, progress) -> EigenResult:
    """The thick-restart Lanczos iteration of _lanczos_run over the basis V (at most m_max rows in use)."""
    T = np.zeros((m_max + 1, m_max + 1))
    v = start_vector(n_full, seed) if v0 is None else v0.detach().reshape(-1).to("cpu", torch.float64, copy=True)
    if v.numel() != n_full or not float(v.norm()) > 0:
        raise UserError(f"start vector must be a non-zero vector of {n_full} entries")
    v = project(v)
    V.append(v / v.norm())
    del v
    cur = V.row(0)
    # the product lands in one float64 work vector reused by every step: a fresh n-vector per step costs its
    # page faults (0.5 s for the 85M GPT's 680 MB on the bench box, more than the arithmetic on it)
    w = torch.empty(n_full, dtype=torch.float64)
    j, used, restarts, iterations = 0, 0, 0, 0
    theta = S = res = None
    beta = 0.0
    while True:
        w.copy_(op.matvec(cur).detach().reshape(-1))
        project(w)
        del cur
        used += 1
        iterations += 1
        before = float(w.norm())
        h = V.dots(w)
        V.subtract(w, h)
        if float(w.norm()) < 0.7071 * before:  # DGKS: a second pass only where the first lost digits (ARPACK)
            h2 = V.dots(w)
            V.subtract(w, h2)
            h = h + h2
        h = h.numpy()
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
            w.copy_(torch.randn(n_full, generator=gen, dtype=torch.float64))
            project(w)
            for _ in range(2):
                V.subtract(w, V.dots(w))
            if float(w.norm()) <= 1e-8:
                break
            beta = 0.0
            res = np.zeros_like(res)
        if m == m_max:  # thick restart: keep the wanted Ritz vectors and the best of the rest
            keep = _keep(theta, k, ends, m)
            kk = len(keep)
            V.restart(S[:, keep])  # in place, a column chunk at a time
            T[:] = 0.0
            T[np.arange(kk), np.arange(kk)] = theta[keep]
            j = kk
            restarts += 1
        else:
            j = m
        w.div_(float(w.norm()))
        V.append(w)
        cur = V.row(j)  # the stored row (float64: a view; float32: the rounded row, so the recurrence is consistent)

    m = len(theta)
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    est = error_estimates(theta, res)
    out = {}
    for end in ends:
        idx = _select(theta, k, end)
        conv = [_converged(theta, res, est, i, tol, scale, strict) for i in idx]
        if m == n and beta <= 1e-6 * scale:  # the whole space: Ritz pairs are eigenpairs
            conv = [True] * len(conv)
        vecs = V.combine(S[:, idx]) if return_vectors else None
        out[end] = RitzPairs(theta[idx].tolist(), res[idx].tolist(), est[idx].tolist(), conv, vecs)
    hvps = getattr(op, "hvps", start_hvps + used) - start_hvps
    return _result(which, out, ends, hvps=hvps, iterations=iterations, restarts=restarts, backend="lanczos")


CHECK_TOL = 1e-2  # the multiplicity check's first, cheap pass (verify_extremes)


def _end_lists(res: EigenResult, which: str) -> dict[str, RitzPairs]:
    """Per end: mutable Ritz pairs (errors filled with NaN where unknown)."""
    out = {}
    for e in _ends(which):
        p = res.end(e)
        out[e] = RitzPairs(list(p.values), list(p.residuals), list(p.errors or [float("nan")] * len(p.values)),
                           list(p.converged), p.vectors)
    return out


def _further(end: str, a: float, b: float) -> bool:
    """Is a further out than b at this end?"""
    return a > b if end == "top" else a < b if end == "bottom" else abs(a) > abs(b)


def _inside(end: str, kth: float, v: float, err: float, thresh: float) -> bool:
    """Does the value v (error bound err) lie inside the k-th found value kth by more than thresh + err?"""
    d = kth - v if end == "top" else v - kth if end == "bottom" else abs(kth) - abs(v)
    return d > thresh + err


def verify_extremes(op, res: EigenResult, k: int, which: str, *, tol: float = 1e-8, seed: int = 0,
                    strict: bool = False, max_hvps: int | None = None, repair: bool = True, max_rounds: int | None = None,
                    basis_bytes: float | None = None, progress=None,
                    check_tol: float | None = CHECK_TOL) -> EigenResult:
    """Check that no eigenvalue beyond the found ones is missing (a repeated or clustered eigenvalue that one
    Krylov space holds only once). The found eigenvectors are deflated and a Lanczos run from a fresh random
    start finds the extreme eigenvalue of the rest at each end; if it lies further out than the k-th found value
    (by more than the tolerance) it is locked in (`repair`) and the check repeats, else the result stands.
    `converged` becomes False when a check does not converge, the budget runs out, or (repair=False) something
    was missing. `res` must carry its vectors.

    Each round first runs the check to the loose `check_tol` (default CHECK_TOL): when the deflated extreme,
    with its error bound, lies inside the k-th found value by more than the tolerance, that settles it for a
    fraction of the products; only an undecided round (a copy or a near neighbour of the k-th value) goes on
    to a full-tolerance run. check_tol=None: every round at full tolerance."""
    ends = _ends(which)
    lists = _end_lists(res, which)
    n = int(op.n)
    if not res.all_converged or any(v.vectors is None for v in lists.values()):
        return res
    rounds = 0
    limit = max_rounds if max_rounds is not None else 2 * k * len(ends) + 2
    spent = 0
    ok = True
    while True:
        Vs = torch.cat([lists[e].vectors.to("cpu", torch.float64) for e in ends], dim=1)
        U, sv, _ = torch.linalg.svd(Vs, full_matrices=False)  # the span (both ends may share a vector)
        rank = int((sv > 1e-6 * float(sv.max())).sum()) if sv.numel() else 0
        if rank >= n:
            break  # every direction is found
        D = U[:, :rank]
        left = None if max_hvps is None else max_hvps - spent
        if left is not None and left < 4:
            ok = False
            break
        chk_seed = int(seed) + 7919 * (rounds + 1)
        v0 = None
        if check_tol is not None and check_tol > tol:
            # the cheap pass: the deflated extreme to a loose tolerance; it settles the question whenever that
            # value, with its error bound, lies inside the k-th found one by more than the tolerance (the usual
            # case: a gap); a copy of the k-th value cannot pass (its Ritz value approaches from inside)
            before = getattr(op, "hvps", 0)
            chk = _lanczos_run(op, 1, which, tol=check_tol, seed=chk_seed, return_vectors=True, max_hvps=left,
                               strict=False, deflate=D, basis_bytes=basis_bytes, progress=progress)
            spent += getattr(op, "hvps", before + chk.hvps) - before
            if chk.all_converged:
                loose = _end_lists(chk, which)
                scale = max([abs(x) for e in ends for x in lists[e].values + loose[e].values] +
                            [np.finfo(float).tiny])
                inside = all(_inside(e, lists[e].values[-1], loose[e].values[0], loose[e].errors[0],
                                     _thresh(lists[e].values[-1], tol, scale)) for e in ends)
                if inside:
                    break  # nothing further out: the result stands
                v0 = sum(loose[e].vectors[:, 0] for e in ends)  # go on from where the loose pass got to
            left = None if max_hvps is None else max_hvps - spent
            if left is not None and left < 4:
                ok = False
                break
        before = getattr(op, "hvps", 0)
        chk = _lanczos_run(op, 1, which, tol=tol, seed=chk_seed, v0=v0, return_vectors=True,
                           max_hvps=left, strict=strict, deflate=D, basis_bytes=basis_bytes, progress=progress)
        spent += getattr(op, "hvps", before + chk.hvps) - before
        if not chk.all_converged:
            ok = False
            break
        found = _end_lists(chk, which)
        scale = max([abs(x) for e in ends for x in lists[e].values + found[e].values] + [np.finfo(float).tiny])
        new = False
        for e in ends:
            v, kth = found[e].values[0], lists[e].values[-1]
            margin = _thresh(kth, tol, scale) + found[e].errors[0]
            if _further(e, v, kth) and abs(v - kth) > margin:
                new = True
                if not repair:
                    continue
                p, f = lists[e], found[e]
                entries = list(zip(p.values, p.residuals, p.errors, p.converged, list(p.vectors.T)))
                entries.append((v, f.residuals[0], f.errors[0], f.converged[0], f.vectors[:, 0]))
                entries.sort(key=lambda t: -t[0] if e == "top" else t[0] if e == "bottom" else -abs(t[0]))
                entries = entries[:len(p.values)]
                lists[e] = RitzPairs([t[0] for t in entries], [t[1] for t in entries], [t[2] for t in entries],
                                     [t[3] for t in entries], torch.stack([t[4] for t in entries], dim=1))
        rounds += 1
        if not new:
            break
        if not repair or rounds >= limit:
            ok = False
            break
    out = {e: dataclasses.replace(lists[e], converged=[bool(c) and ok for c in lists[e].converged]) for e in ends}
    return _result(which, out, ends, hvps=res.hvps + spent, iterations=res.iterations + spent,
                   restarts=res.restarts + rounds, backend=res.backend)



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

