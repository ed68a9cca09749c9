"""Extreme Hessian eigenvalues by thick-restart Lanczos (float64 with full re-orthogonalisation; lean float32
vectors with partial re-orthogonalisation on large models) and the deflated check for missing multiplicities.
Result types and the dense and eigsh backends are in landscape.eigen (re-exported here); the batched
tridiagonals of the spectral density are in landscape.density."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from nexus_opt.errors import UserError

from .basis import Basis as _Basis
from .basis import dot64, dots64, norm64
from .eigen import (DENSE_MAX_N, WHICH, EigenResult, RitzPairs, _all_converged, _converged, _ends, _keep,  # noqa: F401
                    _result, basis_plan, run_plan, _select, _thresh, _which, dense, eigsh, error_estimates, start_vector)


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
    D = None if deflate is None or deflate.shape[1] == 0 else deflate.detach().to("cpu")
    if D is not None and D.dtype not in (torch.float32, torch.float64):
        D = D.to(torch.float64)
    n = n_full - (0 if D is None else D.shape[1])  # dimension of the searched space
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if n < 1:
        raise UserError("nothing left to search: the deflated space is empty")
    k = min(int(k), n)
    ends = _ends(which)
    kw = min(n, k * len(ends))
    lean = False
    if max_basis:
        m_max, bdt, disk = min(n, int(max_basis)), torch.float64, False
    else:
        plan = run_plan(n_full, kw, getattr(op, "dtype", torch.float64), basis_bytes)
        m_max, bdt, disk, lean = min(plan.rows, n), plan.dtype, plan.disk, plan.lean
    if m_max < min(n, kw + 2):
        raise UserError(f"max_basis {m_max} is too small for {kw} wanted eigenvalues; use at least {kw + 2}")
    max_hvps = int(max_hvps) if max_hvps else max(500, 20 * kw)
    start_hvps = getattr(op, "hvps", 0)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    rows = None if D is None else D.T  # the deflated directions as rows (a view)

    def project(x: torch.Tensor) -> torch.Tensor:  # remove the deflated directions (twice: to working
        if D is None:  # precision), in place: x is always the run's own vector
            return x
        for _ in range(2):
            if x.dtype == torch.float64 and D.dtype == torch.float64:
                x.addmv_(D, D.T @ x, alpha=-1.0)
            else:  # float32 vectors: float64 dots, one direction at a time
                for r in rows:
                    x.add_(r, alpha=-dot64(r, x))
        return x

    V = _Basis(n_full, bdt, m_max + 1, disk=disk)  # rows are the basis vectors
    try:
        return _iterate(op, V, m_max=m_max, k=k, ends=ends, which=which, n=n, n_full=n_full, tol=tol,
                        max_hvps=max_hvps, strict=strict, seed=seed, v0=v0, project=project, gen=gen,
                        start_hvps=start_hvps, return_vectors=return_vectors, progress=progress, lean=lean)
    finally:
        V.close()


ORTH_EVERY = 10  # a lean run measures its loss of orthogonality (one read of the rows) at least this often,
ORTH_LEVEL = 2.0 ** -12  # re-orthogonalises in full from the step it exceeds this (sqrt of float32's eps), or
ORTH_RESIDUAL = 1e-3  # from the step a Ritz residual falls below this share of |theta|max (Paige: the basis
# loses orthogonality towards converged Ritz vectors, by about eps ||H|| / residual)


def _against(w: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """Lean step: w minus its component along the unit vector v, float64 dots in one sweep over w, a second
    pass only where the first lost digits (DGKS, as ARPACK); returns the coefficient and the norm left."""
    coef = 0.0
    c = dots64(w, [v])
    for _ in range(2):
        w.add_(v, alpha=-float(c[0]))
        coef += float(c[0])
        left = float(c[1]) - float(c[0]) ** 2  # Pythagoras (v a unit vector)
        if left >= 0.5 * float(c[1]):
            return coef, math.sqrt(left)
        c = dots64(w, [v])  # cancellation: measure again and take out what is left
    return coef, math.sqrt(max(float(c[1]), 0.0))


def _iterate(op, V, *, m_max, k, ends, which, n, n_full, tol, max_hvps, strict, seed, v0, project, gen,
             start_hvps, return_vectors, progress, lean=False) -> EigenResult:
    """The thick-restart Lanczos iteration of _lanczos_run over the basis V (at most m_max rows in use).

    Full (`lean=False`): every step re-orthogonalises against every row, in float64. Lean (large models with
    float32 products): the recurrence vectors are float32 (the current row and the product, all the run holds
    in memory; coefficients and T in float64); a step is the three-term recurrence, v_{j-1} streamed from V
    (usually a file) with the known beta, then against v_j (twice where the first pass lost digits); it goes against every row right after a
    restart, at least every ORTH_EVERY steps to measure the loss of orthogonality, and at every step once that
    exceeds ORTH_LEVEL or a Ritz residual falls below ORTH_RESIDUAL |theta|max (partial
    re-orthogonalisation: the basis stays semi-orthogonal, so the Ritz values and bounds are those of full
    re-orthogonalisation)."""
    T = np.zeros((m_max + 1, m_max + 1))
    vdt = torch.float32 if lean else torch.float64  # lean: no float64 n-vector at all
    v = start_vector(n_full, seed, vdt) if v0 is None else v0.detach().reshape(-1).to("cpu", vdt, copy=True)
    if v.numel() != n_full or not norm64(v) > 0:
        raise UserError(f"start vector must be a non-zero vector of {n_full} entries")
    v = project(v)
    v.div_(norm64(v))
    V.append(v)
    cur = v if lean else V.row(0)
    del v
    local = lean  # lean: may this step use the three-term recurrence (False right after a restart)
    into = getattr(op, "matvec_into", None) if lean else None
    spare = None  # lean: the last row's vector, reused for the next product (no fresh n-vector per step)
    # the product lands in one float64 work vector reused by every step: a fresh n-vector per step costs its
    # page faults (0.5 s for the 85M GPT's 680 MB on the bench box, more than the arithmetic on it)
    w = None if lean else torch.empty(n_full, dtype=torch.float64)
    j, used, restarts, iterations = 0, 0, 0, 0
    theta = S = res = None
    beta = 0.0
    full_mode, since_full = False, 0
    while True:
        if not lean:
            w.copy_(op.matvec(cur).detach().reshape(-1))
        elif into is not None:  # (it copies where the operator's dtype or device differ)
            w = into(cur, spare if spare is not None else torch.empty(n_full, dtype=torch.float32))
        else:
            w = op.matvec(cur).detach().reshape(-1).to("cpu", torch.float32)
        spare = None
        project(w)
        used += 1
        iterations += 1
        h = np.zeros(j + 1)
        if lean and local:
            if j > 0:  # w -= beta_{j-1} v_{j-1}, the row read from V in chunks
                V.add_row(w, j - 1, -beta)
                h[j - 1] = beta
            alpha, beta = _against(w, cur)
            h[j] += alpha
            since_full += 1
            if full_mode or since_full >= ORTH_EVERY:  # measure (one read of the rows); subtract where needed
                hf = V.dots(w)
                since_full = 0
                if float(hf.abs().max()) > ORTH_LEVEL * max(beta, np.finfo(float).tiny):
                    full_mode = True
                if full_mode:
                    V.subtract(w, hf)
                    h += hf.numpy()
                    beta = None
        else:
            before = norm64(w)
            hf = V.dots(w)
            V.subtract(w, hf)
            if norm64(w) < 0.7071 * before:  # DGKS: a second pass only where the first lost digits (ARPACK)
                h2 = V.dots(w)
                V.subtract(w, h2)
                hf = hf + h2
            h += hf.numpy()
            since_full, beta = 0, None
        T[:j + 1, j] = h
        T[j, :j + 1] = h
        beta = norm64(w) if beta is None else beta
        m = j + 1
        theta, S = scipy.linalg.eigh(T[:m, :m], check_finite=False)  # numpy's eigh oversubscribes threads
        res = beta * np.abs(S[m - 1, :])
        scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        if lean and float(np.min(res)) < ORTH_RESIDUAL * scale:
            full_mode = True
        done = _all_converged(theta, res, k, ends, tol, scale, strict)
        if progress is not None:
            progress(used, max_hvps)
        if done or m == n or used >= max_hvps:
            break
        fresh = False
        if beta <= 64 * np.finfo(float).eps * scale * math.sqrt(m):  # invariant subspace: continue elsewhere
            w.copy_(torch.randn(n_full, generator=gen, dtype=torch.float64))
            project(w)
            for _ in range(2):
                V.subtract(w, V.dots(w))
            if norm64(w) <= 1e-8:
                break
            beta = 0.0
            res = np.zeros_like(res)
            fresh = True
        if m == m_max:  # thick restart: keep the wanted Ritz vectors and the best of the rest
            keep = _keep(theta, k, ends, m)
            kk = len(keep)
            V.restart(S[:, keep])  # in place, a column chunk at a time
            T[:] = 0.0
            T[np.arange(kk), np.arange(kk)] = theta[keep]
            j = kk
            restarts += 1
            fresh, full_mode = True, False
        else:
            j = m
        w.div_(beta if beta > 0 else norm64(w))
        V.append(w, background=lean)
        if lean:  # a fresh row (restart, breakdown) is coupled to more than its predecessor: a full step next
            local, spare, cur, w = not fresh, cur, w, None
        else:
            cur = V.row(j)  # the stored row (float64: a view; float32: the rounded row, so the recurrence is consistent)
    cur = spare = w = None  # the run's vectors go before the Ritz vectors are formed

    m = len(theta)
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    est = error_estimates(theta, res)
    out = {}
    for end in ends:
        idx = _select(theta, k, end)
        conv = [_converged(theta, res, est, i, tol, scale, strict) for i in idx]
        if m == n and beta <= 1e-6 * scale:  # the whole space: Ritz pairs are eigenpairs
            conv = [True] * len(conv)
        vecs = V.combine(S[:, idx], torch.float32 if lean else torch.float64) if return_vectors else None
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
        if len(ends) == 1 and lists[ends[0]].vectors.shape[1] == 1 and n > 1:
            D = lists[ends[0]].vectors.to("cpu")  # one unit vector (float32 from a lean run): no float64 copy
        else:
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
