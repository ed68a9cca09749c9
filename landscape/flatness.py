"""Flatness of the loss at a point: extreme Hessian eigenvalues, the trace and the spectral density, per domain."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from .density import SpectralDensity, spectral_density
from .hvp import cpu_threads_for
from .eigen import dense, eigsh
from .eigen import start_vector
from .lanczos import lanczos, verify_extremes
from .objective import Objective
from .result import Result
from .trace import METHODS as TRACE_METHODS, estimate_trace

BACKENDS = ("lanczos", "eigsh", "dense", "pyhessian")
_nothing = contextlib.nullcontext
Progress = Callable[[int, int, str], None]  # progress(done, total, what), as the other analyzers


@dataclasses.dataclass
class DomainCurvature(Result):
    """Curvature of one domain's loss ('train' = the training loss) at the model's parameters.

    `eigenvalues` are the top k (descending) and `bottom_eigenvalues` the smallest k (ascending), each with
    residual norms ||Hv - lambda v|| and error bounds; `trace` +- `trace_stderr` is a stochastic estimate;
    `hvps` counts Hessian-vector products per part and in total; `seconds` per part in `timings`.
    """

    domain: str
    num_params: int
    loss: float
    eigenvalues: list[float] | None
    residuals: list[float] | None
    errors: list[float] | None
    bottom_eigenvalues: list[float] | None
    bottom_residuals: list[float] | None
    bottom_errors: list[float] | None
    converged: bool
    trace: float | None
    trace_stderr: float | None
    trace_method: str | None
    trace_probes: int | None
    density: SpectralDensity | None
    hvps: dict[str, int]
    seconds: float
    timings: dict[str, float]
    backend: str
    seed: int
    settings: dict
    trace_target: float | None = None  # adaptive trace: target relative standard error (None: fixed probes)
    trace_stop: str | None = None  # 'target', 'budget', 'exact' or 'probes' (fixed count)
    precision: str = "float64"  # the dtype of the products (landscape.precision)
    precision_error: float | None = None  # eigenvalue error product rounding can cause (included in `errors`)
    trace_precision_error: float | None = None  # bound on the trace error from product rounding

    @property
    def lambda_max(self) -> float | None:
        return self.eigenvalues[0] if self.eigenvalues else None

    @property
    def lambda_min(self) -> float | None:
        return self.bottom_eigenvalues[0] if self.bottom_eigenvalues else None

    @classmethod
    def from_dict(cls, d: dict) -> "DomainCurvature":
        d = dict(d)
        if isinstance(d.get("density"), dict):
            d["density"] = SpectralDensity.from_dict(d["density"])
        if "seconds" not in d and "wall_time_s" in d:  # written before the rename
            d["seconds"] = d["wall_time_s"]
        return super().from_dict(d)


@dataclasses.dataclass
class FlatnessResult(Result):
    """Flatness of one or more domains: `results[name]` (a DomainCurvature) in `domains` order, with the
    products, time and convergence over all of them. With one domain, its fields read through:
    `r.lambda_max`, `r.eigenvalues`, `r.trace`, ... (`r.only` is that DomainCurvature)."""

    domains: list[str]
    results: dict[str, DomainCurvature]
    converged: bool  # every domain's eigenvalues converged
    converged_by_domain: dict[str, bool]
    hvps: dict[str, int]  # products per part ('eigenvalues', 'trace', 'density') and 'total', over all domains
    seconds: float
    settings: dict
    seed: int

    def __getitem__(self, name: str) -> DomainCurvature:
        return self.results[name]

    def __iter__(self):
        return iter(self.results.values())

    def __len__(self) -> int:
        return len(self.results)

    @property
    def only(self) -> DomainCurvature:
        """The single domain's curvature (an error when several domains were measured)."""
        if len(self.results) != 1:
            raise ValueError(f"this result holds {len(self.results)} domains {list(self.results)}; "
                             "index it by name, e.g. result['train']")
        return next(iter(self.results.values()))

    def __getattr__(self, name: str):  # single-domain convenience: r.lambda_max, r.eigenvalues, r.trace, ...
        if name.startswith("_") or name in ("results", "domains"):
            raise AttributeError(name)
        results = self.__dict__.get("results") or {}
        if len(results) == 1 and hasattr(DomainCurvature, name) or (
                len(results) == 1 and name in {f.name for f in dataclasses.fields(DomainCurvature)}):
            return getattr(next(iter(results.values())), name)
        raise AttributeError(f"FlatnessResult has no attribute '{name}'" + (
            f" (it holds {len(results)} domains: read result['<domain>'].{name})" if len(results) > 1 else ""))

    @classmethod
    def from_dict(cls, d: dict) -> "FlatnessResult":
        if "results" not in d:  # a single domain's curvature (written before FlatnessResult held several)
            one = DomainCurvature.from_dict(d)
            return _combine({one.domain: one}, one.seconds, one.settings, one.seed)
        results = {k: DomainCurvature.from_dict(v) for k, v in d["results"].items()}
        first = next(iter(results.values()))
        hvps = d.get("hvps")
        out = _combine(results, float(d.get("seconds", d.get("wall_time_s", 0.0))),
                       d.get("settings") or first.settings, int(d.get("seed", first.seed)))
        if isinstance(hvps, dict):
            out.hvps = {k: int(v) for k, v in hvps.items()}
        return out


def _combine(results: dict[str, DomainCurvature], seconds: float, settings: dict, seed: int) -> FlatnessResult:
    hvps: dict[str, int] = {}
    for r in results.values():
        for part, n in r.hvps.items():
            hvps[part] = hvps.get(part, 0) + int(n)
    conv = {d: bool(r.converged) for d, r in results.items()}
    return FlatnessResult(domains=list(results), results=results, converged=all(conv.values()),
                          converged_by_domain=conv, hvps=hvps, seconds=float(seconds), settings=settings, seed=seed)


def flatness(obj: Objective, *, domains=None, params: str | None = None, seed: int = 0,
             progress: Progress | None = None, k: int = 5, trace: bool = True, density: bool = False,
             backend: str = "lanczos", which: str = "both", tol: float = 1e-4, max_hvps: int | None = None,
             trace_method: str = "hutch++", trace_probes: int | None = None, dtype: torch.dtype | None = None,
             train_mode: bool = False, density_probes: int = 4, density_steps: int = 80,
             mode: str = "double_backward", cache: bool = True, device=None, trace_target: float = 0.01,
             trace_max_probes: int = 200, curvature: str = "hessian", domain=None,
             precision: str = "auto", on_estimate: Callable | None = None) -> FlatnessResult:
    """Top/bottom Hessian eigenvalues (to `tol` relative accuracy; default 1e-4, tight on request, e.g. 1e-8),
    trace and optional spectral density of a domain's loss
    (`curvature='ggn'`: the Gauss-Newton matrix instead of the Hessian), for each domain of `domains`
    (Objective.resolve_domains: default 'train', the training loss; 'each', a name or a list); one
    FlatnessResult holds them all (`result['train']`; with one domain `result.lambda_max` reads through).
    `params`: a regex restricting the parameters (Objective.select). `domain=` is the deprecated name of
    `domains=`.

    Eigenvalues come with their multiplicities (lanczos and eigsh lock the found ones and verify from a fresh
    start that nothing further out is missing; `dense` is exact for small n). The trace is adaptive by default:
    probes until its standard error is at most `trace_target` (1%) of |trace| or `trace_max_probes` (200) are
    spent (`trace_stop` says which); `trace_probes` fixes the count instead. The loss is checked first
    (Objective.validate): a non-finite, non-scalar or parameter-free loss is refused before any work.

    Precision (landscape.precision): `precision='auto'` runs the products in float64 where that is cheap (up to
    AUTO_FLOAT64_MAX_CPU = 100k parameters on the CPU, 100k on an accelerator) and in float32 beyond;
    'float64'/'float32' force one (an explicit `dtype` wins, the older keyword). When the model already is in
    that dtype on that device the products run on its own weights (no private copy; buffers restored after),
    else on a copy. The Lanczos recurrence and basis are float64 either way. A float32 result records the
    rounding noise of its products (measured: 2 extra products per domain) as `precision_error`, added to the
    eigenvalue `errors`, and `trace_precision_error` for the trace. Eval mode unless `train_mode=True` (batch
    statistics, fixed dropout masks); the caller's model is never changed. `max_hvps` bounds the eigenvalue part; `mode` picks exact
    (double backward) or finite-difference products; `cache=False` rebuilds the gradient graph per product
    block (less memory); `progress(done, total, what)` is called as products are spent.
    `on_estimate(estimate, n_domains)`: called after the checks and before any work with the memory formula and
    cost (landscape.cost.flatness_estimate: one gradient graph and one timed product); lanczos on the Hessian.
    """
    if domain is not None:
        import warnings
        warnings.warn("flatness(domain=...) is deprecated; use domains=...", DeprecationWarning, stacklevel=2)
        if domains is not None:
            raise UserError("give domains= only (domain= is its deprecated name)")
        domains = domain
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}")
    if which not in ("both", "top", "bottom"):
        raise UserError(f"unknown which '{which}'; choose 'both', 'top' or 'bottom'")
    if backend == "pyhessian" and which != "top":
        raise UserError("the pyhessian backend finds only the top eigenvalues (power iteration); use which='top' "
                        "or backend 'lanczos'")
    if trace and trace_method not in TRACE_METHODS:
        raise UserError(f"unknown trace method '{trace_method}'; choose one of {list(TRACE_METHODS)}")
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    try:
        tol_ok = 0 < float(tol) < 1  # False for NaN
    except (TypeError, ValueError):
        tol_ok = False
    if not tol_ok:
        raise UserError(f"tol must be a relative accuracy between 0 and 1 (e.g. 1e-8), got {tol}")
    if trace and trace_probes is not None:  # refused now, not after the eigenvalues were paid for
        least = 2 if backend == "pyhessian" or trace_method == "hutchinson" else 4
        if int(trace_probes) < least:
            raise UserError(f"trace_probes must be at least {least} for a trace with an error bar "
                            f"({'Hutchinson' if least == 2 else 'Hutch++'}), got {trace_probes}")
    if density and (int(density_probes) < 1 or int(density_steps) < 1):
        raise UserError(f"spectral density needs density_probes >= 1 and density_steps >= 1, "
                        f"got {density_probes} and {density_steps}")
    if max_hvps is not None and int(max_hvps) < 1:
        raise UserError(f"max_hvps must be at least 1 (or None: the default budget), got {max_hvps}")
    if trace and trace_probes is None and not (0 < float(trace_target) < 1):
        raise UserError(f"trace_target must be a relative standard error in (0, 1), got {trace_target}")
    if trace and trace_probes is None and int(trace_max_probes) < 12:
        raise UserError(f"trace_max_probes must be at least 12, got {trace_max_probes}")
    seed = check_seed(seed, "seed")
    from .ggn import check_curvature  # [ownmodel]
    which = check_curvature(curvature, backend, which)  # [ownmodel] GGN is PSD: top end by default
    obj = obj.select(params)
    names = obj.resolve_domains(domains, default="train", train="loss")
    obj.validate(names, train_mode=train_mode)
    n = obj.num_params()
    if k > n:
        raise UserError(f"k={k} eigenvalues asked for, but the model has only {n} parameters; use k <= {n}")
    t0 = time.perf_counter()
    from . import precision as prec
    requested = prec.check_precision(precision) if dtype is None else prec.name(dtype)
    dtype = prec.resolve(precision, n, device if device is not None else obj.device, dtype)
    same_device = device is None or torch.device(device) == obj.device
    own = obj.dtype == dtype and same_device  # products on the model's own weights: no private copy
    if on_estimate is not None and backend == "lanczos" and curvature == "hessian":
        from .cost import flatness_estimate
        with obj.preserved(train_mode, seed=None):
            est = flatness_estimate(obj, domain=names[0], k=k, which=which, trace=trace, trace_method=trace_method,
                                    trace_probes=trace_probes, trace_max_probes=trace_max_probes, max_hvps=max_hvps,
                                    dtype=dtype, device=device, train_mode=train_mode, seed=seed)
        on_estimate(est, len(names))
    work = obj if own else obj.to(device=device, dtype=dtype)  # else one private copy for every domain
    results = {}
    with cpu_threads_for(n, work.device), (obj.preserved(train_mode, seed=None) if own else _nothing()):
        for name in names:
            results[name] = _one(obj, work, name, k=k, trace=trace, density=density, seed=seed, backend=backend,
                                 which=which, tol=tol, max_hvps=max_hvps, trace_method=trace_method,
                                 trace_probes=trace_probes, density_probes=density_probes, density_steps=density_steps,
                                 dtype=dtype, train_mode=train_mode, mode=mode, cache=cache, device=device,
                                 progress=progress, trace_target=trace_target, trace_max_probes=trace_max_probes,
                                 curvature=curvature)
    settings = dict(next(iter(results.values())).settings)
    for key in ("eigen_iterations", "eigen_restarts"):  # per domain, in each DomainCurvature
        settings.pop(key, None)
    settings.update(precision=requested, dtype=prec.name(dtype), own_weights=bool(own), backend=backend,
                    trace=bool(trace), density=bool(density), trace_probes=trace_probes,
                    trace_target=trace_target if trace and trace_probes is None else None,
                    trace_max_probes=trace_max_probes if trace and trace_probes is None else None, params=params)
    return _combine(results, time.perf_counter() - t0, settings, seed)


def _one(obj: Objective, work: Objective, name: str, *, k, trace, density, seed, backend, which, tol, max_hvps,
         trace_method, trace_probes, density_probes, density_steps, dtype, train_mode, mode, cache, device,
         progress, trace_target=0.01, trace_max_probes=200,
         curvature: str = "hessian") -> DomainCurvature:
    """Flatness of one domain on the private copy `work` (obj itself is only handed to PyHessian)."""
    t_start = time.perf_counter()
    from .ggn import make_operator  # [ownmodel] hessian | ggn, sharded under torch.distributed
    op = make_operator(work, name, curvature, dtype=None, mode=mode, train_mode=train_mode, cache=cache, copy=False,
                       seed=seed)
    timings, hvps = {}, {}

    def tick(part: str):
        return None if progress is None else (lambda done, total: progress(done, total, f"{name}: {part}"))

    loss = op.loss()
    t = time.perf_counter()
    if backend == "pyhessian":
        from .pyhessian_backend import pyhessian_eigen
        eig = pyhessian_eigen(obj, k, name, seed=seed, dtype=dtype, train_mode=train_mode, device=device)
        # power iteration finds the largest |eigenvalues| once each: check nothing above them was missed
        eig = verify_extremes(op, eig, k, "top", tol=max(float(tol), 1e-3), seed=seed, repair=False)
    elif backend == "dense":
        eig = dense(op, k, which, progress=tick("eigenvalues"))
    elif backend == "eigsh":
        eig = eigsh(op, k, which, tol=tol, max_hvps=max_hvps, seed=seed, progress=tick("eigenvalues"))
    else:
        eig = lanczos(op, k, which, tol=tol, max_hvps=max_hvps, seed=seed, progress=tick("eigenvalues"),
                      return_vectors=op.dtype != torch.float64)
    timings["eigenvalues"] = time.perf_counter() - t
    hvps["eigenvalues"] = eig.hvps
    top, bottom = eig.end("top"), eig.end("bottom")
    from . import precision as prec
    vals = (top.values if top else []) + (bottom.values if bottom else [])
    p_err = None
    if op.dtype != torch.float64 and vals:  # the rounding noise of the products, at the top eigenvector
        v = eig.vectors[:, 0] if eig.vectors is not None else start_vector(op.n, seed + 3)
        eig.vectors = eig.bottom_vectors = None  # v is the probe's own now
        noise, rel, spent = prec.product_noise(op, v, own=True)
        noise = rel * max(abs(x) for x in vals)  # relative noise at the largest |lambda|
        p_err = prec.eigen_error(vals, noise, op.dtype)
        hvps["precision"] = spent
        add = lambda errs: None if errs is None else [float(e) + p_err for e in errs]  # noqa: E731
        top = top and dataclasses.replace(top, errors=add(top.errors))
        bottom = bottom and dataclasses.replace(bottom, errors=add(bottom.errors))
    eig.vectors = eig.bottom_vectors = None

    tr, tr_err = None, None
    if trace:
        t = time.perf_counter()
        if backend == "pyhessian":
            from .pyhessian_backend import pyhessian_trace
            tr = pyhessian_trace(obj, name, 100 if trace_probes is None else trace_probes, seed=seed, dtype=dtype, train_mode=train_mode,
                                 device=device)
        else:
            tr = estimate_trace(op, trace_method, trace_probes, seed=seed, target=trace_target,
                                max_probes=trace_max_probes, progress=tick("trace"))
        timings["trace"] = time.perf_counter() - t
        hvps["trace"] = tr.hvps
        if op.dtype != torch.float64:  # |z^T E z| <= ||z|| ||E z||: the noise at a probe, times sqrt(n)
            from .trace import rademacher
            z = rademacher(op.n, 1, seed, 10 ** 6)[:, 0]
            noise, _, spent = prec.product_noise(op, z)
            tr_err = max(noise * float(z.norm()), 16.0 * prec.eps(op.dtype) * abs(tr.estimate))
            hvps["precision"] = hvps.get("precision", 0) + spent

    dens = None
    if density:
        t = time.perf_counter()
        dens = spectral_density(op, density_probes, density_steps, seed=seed, progress=tick("density"))
        timings["density"] = time.perf_counter() - t
        hvps["density"] = dens.hvps
    op.release()
    hvps["total"] = sum(hvps.values())
    conv = all(top.converged if top else []) and all(bottom.converged if bottom else [])
    settings = {"k": k, "which": which, "tol": tol, "max_hvps": max_hvps, "dtype": str(dtype).replace("torch.", ""),
                "train_mode": train_mode, "mode": mode, "cache": cache, "device": str(op.device),
                "trace_method": tr.method if tr else None, "density_probes": density_probes if density else None,
                "density_steps": density_steps if density else None, "eigen_iterations": eig.iterations,
                "eigen_restarts": eig.restarts, "curvature": curvature}
    return DomainCurvature(
        domain=name, num_params=op.n, loss=loss,
        eigenvalues=top.values if top else None, residuals=top.residuals if top else None,
        errors=top.errors if top else None, bottom_eigenvalues=bottom.values if bottom else None,
        bottom_residuals=bottom.residuals if bottom else None, bottom_errors=bottom.errors if bottom else None,
        converged=bool(conv), trace=tr.estimate if tr else None, trace_stderr=tr.stderr if tr else None,
        trace_method=tr.method if tr else None, trace_probes=tr.probes if tr else None, density=dens,
        hvps=hvps, seconds=time.perf_counter() - t_start, timings=timings, backend=backend, seed=seed,
        settings=settings, trace_target=getattr(tr, "target_rel_stderr", None) if tr else None,
        trace_stop=getattr(tr, "stop", None) if tr else None, precision=prec.name(op.dtype),
        precision_error=p_err if p_err is not None else (
            prec.eigen_error(vals, 0.0, op.dtype) if vals else None),
        trace_precision_error=tr_err if tr_err is not None else (
            16.0 * prec.eps(op.dtype) * abs(tr.estimate) if tr else None))


__all__ = ["flatness", "FlatnessResult", "DomainCurvature", "SpectralDensity"]
