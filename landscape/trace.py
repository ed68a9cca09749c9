"""Hessian trace estimates with error bars: Hutchinson (Rademacher probes) and Hutch++, probes run as blocks."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import generator

from .result import Result

METHODS = ("hutch++", "hutchinson")
_SALT = 101  # keeps trace probes independent of the Lanczos start vector and the density probes


@dataclasses.dataclass
class TraceEstimate(Result):
    """A trace estimate with its standard error; `samples` are the per-probe values of the stochastic part."""

    method: str
    estimate: float
    stderr: float
    probes: int
    hvps: int
    seed: int
    exact_part: float = 0.0
    samples: list[float] = dataclasses.field(default_factory=list)
    target_rel_stderr: float | None = None  # adaptive runs: stop once stderr <= target * |estimate|
    stop: str = "probes"  # 'probes' (fixed count), 'target' (reached), 'budget' (max probes spent), 'exact'



def rademacher(n: int, count: int, seed: int, start: int = 0, salt: int = _SALT,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Probes start..start+count-1 as an (n, count) block of +-1 (exact in any float dtype), each from its own
    seeded stream."""
    cols = [torch.randint(0, 2, (n,), generator=generator(seed, salt, start + i), dtype=torch.int8)
            for i in range(count)]
    if not cols:
        return torch.zeros(n, 0, dtype=dtype)
    return torch.stack(cols, dim=1).to(dtype).mul_(2.0).sub_(1.0)


PROBE_BYTES = 2 ** 28  # the most memory one block of trace probes (and their products) may take


SINGLE_PROBES = 500_000  # parameters from which probes go one at a time (as PyHessian's): a batched product
# multiplies the backward's activations by the block and, on the bench GPTs, is no faster per probe there


def probe_block(n: int, block: int) -> int:
    """Probes per block: at most `block`, and few enough that the block and its products (3 float64 n-vectors
    per probe) stay within PROBE_BYTES; one at a time from SINGLE_PROBES parameters."""
    if int(n) >= SINGLE_PROBES:
        return 1
    return max(1, min(int(block), int(PROBE_BYTES // (24 * max(int(n), 1)))))


def sketch_fits(n: int, s: int) -> bool:
    """Does Hutch++'s sketch (S, H S, Q, H Q: 4 blocks of s float64 n-vectors) fit in the Lanczos basis's share
    of the memory available?"""
    from .precision import BASIS_SHARE, available_bytes
    return 4 * 8 * s * n <= BASIS_SHARE * available_bytes()


def _quadratic_forms(op, Z: torch.Tensor, block: int, progress=None, done: int = 0, total: int = 0) -> np.ndarray:
    """z^T H z for each column of Z, through op.matmat in blocks; the products' dtype, summed in float64 (no
    float64 copy of a float32 block)."""
    out = []
    for s in range(0, Z.shape[1], block):
        Zb = Z[:, s:s + block]
        HZ = op.matmat(Zb).detach()
        if Zb.shape[1] == 1:  # one probe (large models): a float64 dot in chunks, no n-length temporary
            from .basis import dot64
            out.append(np.array([dot64(Zb[:, 0].to(HZ), HZ[:, 0])]))
        else:
            out.append((Zb.to(HZ) * HZ).sum(0, dtype=torch.float64).cpu().numpy())
        if progress is not None:
            progress(done + s + Zb.shape[1], total)
    return np.concatenate(out) if out else np.zeros(0)


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def hutchinson(op, probes: int = 100, *, seed: int = 0, block: int = 32,
               progress: Callable[[int, int], None] | None = None) -> TraceEstimate:
    """mean of z^T H z over Rademacher z; standard error = sample std / sqrt(probes)."""
    if probes < 2:
        raise UserError(f"Hutchinson needs at least 2 probes for an error bar, got {probes}")
    block = probe_block(op.n, block)
    x = np.concatenate([_quadratic_forms(op, rademacher(op.n, min(block, probes - s), seed, s), block,
                                         progress, s, probes) for s in range(0, probes, block)])
    return TraceEstimate(method="hutchinson", estimate=float(x.mean()), stderr=_stderr(x), probes=probes,
                         hvps=probes, seed=seed, samples=x.tolist())


def hutchpp(op, probes: int = 99, *, seed: int = 0, block: int = 32,
            progress: Callable[[int, int], None] | None = None) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): the exact trace on a sketched top subspace Q (from H S) plus Hutchinson
    on the deflated rest; the standard error is that of the stochastic part. Uses `probes` products."""
    if probes < 4:
        raise UserError(f"Hutch++ needs at least 4 probes (sketch, projection, 2 stochastic), got {probes}")
    n = op.n
    s = max(1, probes // 3)
    s = min(s, n)
    rest = probes - 2 * s
    block = probe_block(n, block)
    S = rademacher(n, s, seed, 0)
    HS = op.matmat(S).detach().to("cpu", torch.float64)
    Q, _ = torch.linalg.qr(HS)
    HQ = op.matmat(Q).detach().to("cpu", torch.float64)
    exact = float((Q * HQ).sum())
    if progress is not None:
        progress(2 * s, probes)
    if s == n:  # the sketch spans everything: the trace is exact
        return TraceEstimate(method="hutch++", estimate=exact, stderr=0.0, probes=2 * s, hvps=2 * s, seed=seed,
                             exact_part=exact)
    xs = []
    for start in range(0, rest, block):
        G = rademacher(n, min(block, rest - start), seed, s + start)
        G = G - Q @ (Q.T @ G)
        xs.append(_quadratic_forms(op, G, block))
        if progress is not None:
            progress(2 * s + start + G.shape[1], probes)
    x = np.concatenate(xs)
    return TraceEstimate(method="hutch++", estimate=exact + float(x.mean()), stderr=_stderr(x), probes=probes,
                         hvps=2 * s + rest, seed=seed, exact_part=exact, samples=x.tolist())


def adaptive(op, method: str = "hutch++", *, target: float = 0.01, max_probes: int = 200, seed: int = 0,
             block: int = 10, min_samples: int = 10, progress=None) -> TraceEstimate:
    """Probes until the standard error is at most `target` x |estimate| or `max_probes` products are spent
    (`stop` says which). Hutch++: first the exact trace on a sketched top subspace (2s products, s = about a
    tenth of the budget), then Hutchinson on the deflated rest in blocks of `block` (seeded probe streams).
    Where the sketch would not fit in memory (sketch_fits) the estimate is plain Hutchinson (`method` says
    so), and probe blocks shrink with the model (probe_block)."""
    if method not in METHODS:
        raise UserError(f"unknown trace method '{method}'; choose one of {list(METHODS)}")
    if not (0 < float(target) < 1):
        raise UserError(f"the trace target relative standard error must be in (0, 1), got {target}")
    least = 4 if method == "hutch++" else 2
    if int(max_probes) < least + min_samples - 2:
        raise UserError(f"max_probes must be at least {least + min_samples - 2} for an adaptive {method} trace, "
                        f"got {max_probes}")
    n, max_probes = op.n, int(max_probes)
    block = probe_block(n, block)
    Q, exact, s, used = None, 0.0, 0, 0
    if method == "hutch++" and not sketch_fits(n, min(n, max(1, max_probes // 10))):
        method = "hutchinson"  # the sketch (4 blocks of s n-vectors) would not fit: plain probes, one block
    if method == "hutch++":
        s = min(n, max(1, max_probes // 10))
        S = rademacher(n, s, seed, 0)
        HS = op.matmat(S).detach().to("cpu", torch.float64)
        Q, _ = torch.linalg.qr(HS)
        HQ = op.matmat(Q).detach().to("cpu", torch.float64)
        exact = float((Q * HQ).sum())
        used = 2 * s
        if s == n:
            return TraceEstimate(method=method, estimate=exact, stderr=0.0, probes=used, hvps=used, seed=seed,
                                 exact_part=exact, target_rel_stderr=float(target), stop="exact")
    xs = np.zeros(0)
    stop = "budget"
    while used < max_probes:
        b = min(block, max_probes - used)
        # plain probes in the products' dtype (+-1 is exact): no float64 block to convert per probe
        G = rademacher(n, b, seed, s + len(xs), dtype=torch.float64 if Q is not None else
                       getattr(op, "dtype", torch.float64))
        if Q is not None:
            G = G - Q @ (Q.T @ G)
        xs = np.concatenate([xs, _quadratic_forms(op, G, b)])
        used += b
        if progress is not None:
            progress(used, max_probes)
        est, se = exact + float(xs.mean()), _stderr(xs)
        if len(xs) >= min_samples and se <= target * abs(est):
            stop = "target"
            break
    if progress is not None:
        progress(max_probes, max_probes)
    return TraceEstimate(method=method, estimate=exact + float(xs.mean()), stderr=_stderr(xs), probes=used,
                         hvps=used, seed=seed, exact_part=exact, samples=xs.tolist(),
                         target_rel_stderr=float(target), stop=stop)


def estimate_trace(op, method: str = "hutch++", probes: int | None = None, *, seed: int = 0, block: int = 32,
                   target: float = 0.01, max_probes: int = 200, progress=None) -> TraceEstimate:
    """Dispatch to `hutch++` or `hutchinson`: a fixed number of `probes`, or (probes None, the default) adaptive
    until the standard error is at most `target` (1%) of |estimate| or `max_probes` are spent."""
    if probes is None:
        return adaptive(op, method, target=target, max_probes=max_probes, seed=seed, progress=progress)
    if method == "hutch++":
        return hutchpp(op, 99 if probes is None else probes, seed=seed, block=block, progress=progress)
    if method == "hutchinson":
        return hutchinson(op, 100 if probes is None else probes, seed=seed, block=block, progress=progress)
    raise UserError(f"unknown trace method '{method}'; choose one of {list(METHODS)}")
