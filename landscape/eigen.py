"""Eigenpairs of a symmetric operator: the result types (RitzPairs, EigenResult), the stopping tests, and the
dense (LAPACK) and scipy eigsh (ARPACK) backends; thick-restart Lanczos is in landscape.lanczos."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.linalg
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import choose

WHICH = ("top", "bottom", "both", "magnitude")
_ALIASES = {"LA": "top", "SA": "bottom", "BE": "both", "LM": "magnitude"}


@dataclasses.dataclass
class RitzPairs:
    """The Ritz pairs of one end of the spectrum: values with residual norms ||Hv - lambda v||, error bounds
    min(r, r^2/gap), per-pair convergence and the vectors (n, k) on the CPU, or None when not kept."""

    values: list[float]
    residuals: list[float]
    errors: list[float] | None
    converged: list[bool]
    vectors: torch.Tensor | None = None


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

    def end(self, name: str) -> RitzPairs | None:
        """The Ritz pairs of one end: 'top' (or the single end asked for) or 'bottom'; None where not found."""
        if name == "bottom" and self.which == "both":
            return RitzPairs(self.bottom_eigenvalues, self.bottom_residuals, self.bottom_errors, self.bottom_converged,
                             self.bottom_vectors)
        if name == self.which or (name == "top" and self.which == "both"):
            return RitzPairs(self.eigenvalues, self.residuals, self.errors, self.converged, self.vectors)
        return None


def _which(which: str) -> str:
    return choose(which, WHICH, "eigenvalue selection", _ALIASES)


def start_vector(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A deterministic Gaussian unit vector from a seed (CPU, float64 unless asked)."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n, generator=g, dtype=dtype)
    return v.div_(v.norm())


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


MAX_BASIS = 200  # the most basis vectors a run keeps before it restarts
STEP_BYTES = 2 ** 29  # a step re-orthogonalises against every row: rows beyond this many bytes (and beyond
# the 2 kw + 10 a restart wants) cost more memory traffic per step than they save in products on a large model


LEAN_MIN = 500_000  # parameters from which a run with float32 (or lower) products is lean (run_plan)
LEAN_FILE_BYTES = 2 ** 33  # a lean run's basis file stays under this and half the temporary directory's free space


@dataclasses.dataclass(frozen=True)
class BasisPlan:
    """How a Lanczos run holds its basis: at most `rows` rows of `dtype`, in memory or (`disk`) in a file;
    `lean`: float32 recurrence vectors, the rows a cold store (see lanczos._iterate)."""

    rows: int
    dtype: torch.dtype
    disk: bool = False
    lean: bool = False

    def row_bytes(self, n: int) -> int:
        return int(n) * (4 if self.disk else torch.empty(0, dtype=self.dtype).element_size())

    def resident_bytes(self, n: int, kw: int) -> float:
        """The most memory the rows (with the kw Ritz vectors a run returns: float32 when lean, else float64) and,
        when lean, its three float32 recurrence vectors take."""
        rows = 0.0 if self.disk else float((self.rows + 1) * self.row_bytes(n))
        return rows + (4.0 * (kw + 3) * n if self.lean else 8.0 * kw * n)


def lean_plan(n: int, kw: int, basis_bytes: float | None = None, directory: str | None = None) -> BasisPlan:
    """The basis of a lean run (LEAN_MIN parameters or more, products in float32): float32 rows in a temporary
    file, as many as LEAN_FILE_BYTES and half the directory's free space allow (at most MAX_BASIS, at least
    2 kw + 10), since a lean step holds only its current row and streams the one before, and the file is read
    whole only at restarts, re-orthogonalisations and the end; in memory (float32, within `basis_bytes`) where
    the directory has no room."""
    import shutil
    import tempfile

    n = max(int(n), 1)
    want = min(n, 2 * kw + 10)
    try:
        free = shutil.disk_usage(directory or tempfile.gettempdir()).free
    except OSError:
        free = 0
    rows = int(min(LEAN_FILE_BYTES, 0.5 * free) // (4 * n)) - 1
    if rows >= want:
        return BasisPlan(max(2, min(n, rows, MAX_BASIS)), torch.float32, disk=True, lean=True)
    plan = basis_plan(n, kw, basis_bytes)
    return BasisPlan(plan.rows, torch.float32, disk=plan.disk, lean=True)


def run_plan(n: int, kw: int, dtype: torch.dtype, basis_bytes: float | None = None) -> BasisPlan:
    """The plan of a Lanczos run over n parameters whose products are in `dtype`: lean (lean_plan) from LEAN_MIN
    parameters unless the products are float64, else basis_plan."""
    if int(n) >= LEAN_MIN and dtype != torch.float64:
        return lean_plan(n, kw, basis_bytes)
    return basis_plan(n, kw, basis_bytes)


def basis_plan(n: int, kw: int, basis_bytes: float | None = None) -> BasisPlan:
    """How a Lanczos run over n parameters with kw wanted pairs holds its basis, within `basis_bytes` (None:
    precision.BASIS_SHARE of the memory available now), the kw Ritz vectors it returns counted beside it.
    Float64 rows when at least min(n, 2 kw + 10) fit (inner products straight on the rows: a float32 row
    costs a conversion per use, which on the 10.8M bench GPT made the basis a third of the run), else float32
    rows (their rounding is below float32 products' own); at most MAX_BASIS rows and, past
    2 kw + 10, at most STEP_BYTES of them (each step touches every row). Where not even 2 kw + 10 float32 rows
    fit, that many float32 rows in a temporary file (`disk`: fewer rows would cost more products than the
    file costs in reads). No floor overrides the budget."""
    from .precision import BASIS_SHARE, available_bytes

    n = max(int(n), 1)
    budget = BASIS_SHARE * available_bytes() if basis_bytes is None else float(basis_bytes)
    want, least = min(n, 2 * kw + 10), min(n, kw + 2)
    for dt in (torch.float64, torch.float32):
        size = torch.empty(0, dtype=dt).element_size() * n
        fits = int((budget - 8.0 * kw * n) // size) - 1
        if fits >= want:
            cap = max(want, int(STEP_BYTES // size))
            return BasisPlan(max(2, min(n, fits, cap, MAX_BASIS)), dt)
    if least > n - 1 or budget < 8.0 * kw * n:
        raise UserError(f"the Lanczos run returns {kw} float64 vectors of {n} entries "
                        f"({8.0 * kw * n / 2 ** 30:.2f} GiB) but {budget / 2 ** 30:.2f} GiB are allowed; free memory, "
                        "ask for fewer eigenvalues (k, which='top') or pass basis_bytes")
    return BasisPlan(max(2, want), torch.float32, disk=True)


def _result(which: str, out: dict[str, RitzPairs], ends, **info) -> EigenResult:
    """An EigenResult from the Ritz pairs of each end."""
    first = out[ends[0]]
    bottom = out.get("bottom") if which == "both" else None
    return EigenResult(which=which, eigenvalues=first.values, residuals=first.residuals, converged=first.converged,
                       bottom_eigenvalues=bottom.values if bottom else None,
                       bottom_residuals=bottom.residuals if bottom else None,
                       bottom_converged=bottom.converged if bottom else None,
                       errors=first.errors, bottom_errors=bottom.errors if bottom else None,
                       vectors=first.vectors, bottom_vectors=bottom.vectors if bottom else None, **info)


DENSE_MAX_N = 4000


def dense(op, k: int = 5, which: str = "both", *, max_n: int = DENSE_MAX_N, return_vectors: bool = False,
          progress=None) -> EigenResult:
    """Exact eigenpairs of the dense float64 Hessian built from n Hessian-vector products (identity blocks),
    by LAPACK eigh: for small models (n <= max_n) and as the truth the iterative backends are tested against."""
    which = _which(which)
    n = int(op.n)
    if n > max_n:
        raise UserError(f"the dense backend builds the full {n} x {n} Hessian; it is limited to {max_n} "
                        "parameters: use backend 'lanczos' (or raise max_n if you have the memory)")
    k = min(int(k), n)
    start = getattr(op, "hvps", 0)
    cols = []
    block = 256
    for s0 in range(0, n, block):
        E = torch.zeros(n, min(block, n - s0), dtype=torch.float64)
        E[s0 + torch.arange(E.shape[1]), torch.arange(E.shape[1])] = 1.0
        cols.append(op.matmat(E).detach().to("cpu", torch.float64))
        if progress is not None:
            progress(min(n, s0 + block), n)
    H = torch.cat(cols, dim=1)
    H = 0.5 * (H + H.T)
    vals, vecs = scipy.linalg.eigh(H.numpy(), check_finite=False)
    ends = _ends(which)
    out = {}
    for end in ends:
        idx = _select(vals, k, end)
        out[end] = RitzPairs(vals[idx].tolist(), [0.0] * len(idx), [0.0] * len(idx), [True] * len(idx),
                             torch.from_numpy(np.ascontiguousarray(vecs[:, idx])) if return_vectors else None)
    return _result(which, out, ends, hvps=getattr(op, "hvps", start + n) - start, iterations=n, restarts=0,
                   backend="dense")


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
    if len(theta) < k * len(ends):  # both ends would share Ritz values: not k distinct ones at each
        return False
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
          seed: int = 0, return_vectors: bool = False, verify: bool = True, progress=None) -> EigenResult:
    """The same eigenpairs by scipy's ARPACK (implicitly restarted Lanczos) on `op.to_scipy()`, then the same
    deflated check for missing multiplicities as `lanczos` (verify=False skips it).

    Residuals are measured afterwards with one batched product of the returned vectors (counted in hvps).
    """
    start = op.hvps
    res = _eigsh(op, k, which, tol=tol, max_hvps=max_hvps, seed=seed, progress=progress)
    if verify:
        from .lanczos import verify_extremes  # the deflated check runs Lanczos
        res = verify_extremes(op, res, k, which, tol=tol, seed=seed, progress=progress,
                              max_hvps=None if not max_hvps else max(0, int(max_hvps) - res.hvps))
    res.hvps = op.hvps - start
    if not return_vectors:
        res.vectors = res.bottom_vectors = None
    return res


def _eigsh(op, k: int = 5, which: str = "both", *, tol: float = 1e-8, max_hvps: int | None = None,
           seed: int = 0, progress=None) -> EigenResult:
    """ARPACK's answer with measured residuals and vectors (no multiplicity check)."""
    return_vectors = True
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
        out[end] = RitzPairs(vals[idx].tolist(), res[idx].tolist(), est[idx].tolist(),
                             [_converged(vals, res, est, i, tol, scale, False) for i in idx],
                             Vt[:, idx] if return_vectors else None)
    if progress is not None:
        progress(op.hvps - start, op.hvps - start)
    return _result(which, out, ends, hvps=op.hvps - start, iterations=iterations, restarts=0, backend="eigsh")

