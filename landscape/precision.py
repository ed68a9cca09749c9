"""The precision policy of the curvature and gradient analyzers (float64 where cheap, float32 products on the
model's own weights where it is large) and the rounding-noise estimate that each result records with it."""
from __future__ import annotations

import math

import torch

from nexus_opt.errors import UserError

PRECISIONS = ("auto", "float64", "float32")
# auto: float64 up to this many parameters on the CPU and AUTO_FLOAT64_MAX_ACCEL on an accelerator. Past ~100k
# parameters a float64 product stops being cheap: on the default text GPT (120,576 parameters, 12 eval batches)
# one costs 4.2 s against 1.1 s in float32 on one thread (3.7x at 1M in the issue), and on accelerators
# float64 throughput is a small fraction of float32's.
AUTO_FLOAT64_MAX_CPU = 100_000
AUTO_FLOAT64_MAX_ACCEL = 100_000
PROBE_STRIDE = 16  # gradient_noise compares every 16th entry of the gradients
NOISE_SCALE = 3.0  # the product of c v / c differs from that of v only by rounding (c not a power of two)


def check_precision(precision: str) -> str:
    """The precision name, or a UserError listing the choices."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose one of {list(PRECISIONS)}")
    return precision


def resolve(precision: str | None, n_params: int, device=None, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the products: an explicit `dtype` wins (the older keyword), then 'float64'/'float32', and
    'auto' (None too) picks float64 for at most AUTO_FLOAT64_MAX_CPU parameters on the CPU
    (AUTO_FLOAT64_MAX_ACCEL on an accelerator) and float32 beyond."""
    if dtype is not None:
        return dtype
    precision = check_precision(precision or "auto")
    if precision == "float64":
        return torch.float64
    if precision == "float32":
        return torch.float32
    cpu = device is None or torch.device(device).type == "cpu"
    return torch.float64 if int(n_params) <= (AUTO_FLOAT64_MAX_CPU if cpu else AUTO_FLOAT64_MAX_ACCEL) \
        else torch.float32


def name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def product_noise(op, v: torch.Tensor, own: bool = False) -> tuple[float, float, int]:
    """(absolute, relative) rounding noise of op's products at the vector v, and the products spent: the
    difference of H v and H (c v) / c (c = 3: equal in exact arithmetic, rounded differently), over sqrt(2),
    from two single products in the operator's dtype (no float64 or batched copies: on a large model this
    probe must not be what sets the peak). `own`: v may be overwritten. Float64 operators are not probed
    (their noise, ~1e-16 relative, is far below any tolerance): the stated eps-level figure is returned for
    0 products."""
    from .basis import norm64

    dt = getattr(op, "dtype", torch.float64)
    if dt == torch.float64:
        return 0.0, 8 * eps(torch.float64), 0
    v = v.detach().reshape(-1)
    v = v.to("cpu", dt) if own else v.to("cpu", dt, copy=True)
    a = op.matvec(v).detach().reshape(-1).to("cpu")
    v.mul_(NOISE_SCALE)
    b = op.matvec(v).detach().reshape(-1).to("cpu")
    del v
    b.div_(NOISE_SCALE).sub_(a)
    absolute = norm64(b) / math.sqrt(2.0)
    size = max(norm64(a), float(torch.finfo(torch.float64).tiny))
    return absolute, absolute / size, 2


def eigen_error(values, noise_abs: float, dtype: torch.dtype) -> float:
    """The eigenvalue error that product rounding can cause (Weyl: at most the size of the perturbation): the
    measured noise, floored at 16 eps |lambda_max| for rounding the probe does not see (the forward pass)."""
    scale = max([abs(float(x)) for x in values] + [0.0])
    return max(float(noise_abs), 16.0 * eps(dtype) * scale)


def gradient_noise(obj, batch, params, check: str | None = None) -> float:
    """Relative rounding noise of a gradient in the model's dtype: one forward on an eighth of the batch's
    examples (where it can be cut) and two backwards through it, seeded with 1 and with 3 (the gradients of
    L and 3 L, equal after /3 in exact arithmetic, rounded differently), floored at 4 eps. `check` (eval mode):
    a second, gradient-free forward must give the same loss (Objective.check_deterministic, `check` naming
    the batch in its error)."""
    from .gradsim import _split_examples

    dt = next(iter(params.values())).dtype
    if dt == torch.float64:
        return 8 * eps(torch.float64)
    chunks = _split_examples(batch, 8)
    if not isinstance(chunks, str):
        batch = chunks[0][0]
    from .objective import seed_generators

    device = next(iter(params.values())).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # seeded masks (train mode)
        seed_generators(0, device)
        loss = obj.loss_fn(obj.model, batch)
        ps = list(params.values())
        g1 = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
        g3 = torch.autograd.grad(loss, ps, grad_outputs=torch.full_like(loss, NOISE_SCALE), allow_unused=True)
        if check is not None:
            obj.check_deterministic(batch, float(loss.detach().reshape(())), check)
    diff = size = 0.0
    for a, b in zip(g1, g3):  # every PROBE_STRIDE-th entry (a norm ratio needs no more; float64 copies cost)
        if a is not None and b is not None:
            a, b = a.reshape(-1)[::PROBE_STRIDE].double(), b.reshape(-1)[::PROBE_STRIDE].double()
            diff += float((a - b / NOISE_SCALE).pow(2).sum())
            size += float(a.pow(2).sum())
    rel = math.sqrt(diff) / math.sqrt(2.0) / math.sqrt(size) if size > 0 else 0.0
    return max(rel, 4 * eps(dt))


def available_bytes() -> float:
    """Memory available for new allocations: MemAvailable of /proc/meminfo, capped by a cgroup (v2) limit less
    its usage; 8 GiB where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = float(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            with open("/sys/fs/cgroup/memory.current") as f:
                left = float(limit) - float(f.read().strip())
            avail = left if avail is None else min(avail, left)
    except OSError:
        pass
    return avail if avail is not None and avail > 0 else 8.0 * 2 ** 30


BASIS_SHARE = 0.15  # the Lanczos basis may take this share of the memory available when the run starts (beyond
# it the rows go to a temporary file): on a 24 GB machine the 85M GPT's graph (3.7 GB) and basis stay under 8 GB
