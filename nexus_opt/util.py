"""What training and analysis share, with nothing of the trainer: seeds, seeded generators, mixture weights,
devices and batch helpers (standard library and torch only, so `landscape` can import it alone)."""
from __future__ import annotations

import operator
from typing import Callable, Mapping, Sequence

import torch

from .errors import UserError

SEED_LIMIT = 2 ** 32  # seeds are mixed into 64-bit generator seeds (seed * 1e6 + i, seed + 1); keep them well inside
_MASK = (1 << 63) - 1


# -- seeds and generators ---------------------------------------------------------------------------------
def check_seed(seed, what: str = "--seed") -> int:
    """The seed as an int, or a UserError when it is not an integer of magnitude below 2**32."""
    try:
        seed = operator.index(seed)  # ints and numpy integers; not floats or strings
    except TypeError:
        raise UserError(f"{what} must be an integer, got {seed!r}") from None
    if not -SEED_LIMIT < seed < SEED_LIMIT:
        raise UserError(f"{what} must be an integer between -{SEED_LIMIT - 1} and {SEED_LIMIT - 1}, got {seed}; "
                        "pick a smaller seed")
    return seed


def choose(value, choices, what: str, aliases: Mapping | None = None):
    """`value` (or the name an alias stands for) when it is one of `choices`, else a UserError listing them."""
    if not isinstance(value, (str, int, float, type(None))):  # a list or dict from a forged manifest: unhashable
        raise UserError(f"{what} must be a name, got a {type(value).__name__}; choose one of "
                        f"{', '.join(map(str, choices))}")
    name = (aliases or {}).get(value, value)
    if name not in choices:
        raise UserError(f"unknown {what} '{value}'; choose one of {', '.join(map(str, choices))}")
    return name


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 over the parts)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return z & _MASK


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `mix_seed(*parts)`: independent streams for (seed, purpose, step, ...)."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def normalize_weights(train_domains: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Mixture weights over the trained domains, normalised to sum to 1 (uniform by default)."""
    if not weights:
        return {d: 1.0 / len(train_domains) for d in train_domains}
    unknown = sorted(set(weights) - set(train_domains))
    if unknown:
        raise UserError(f"mixture weight for unknown or untrained domain(s) {unknown}; trained domains are {train_domains}")
    try:
        w = {d: float(weights.get(d, 0.0)) for d in train_domains}
    except (TypeError, ValueError, OverflowError):
        w = {d: float("nan") for d in train_domains}
    if any(not (0 <= v < float("inf")) for v in w.values()) or not 0 < sum(w.values()) < float("inf"):
        raise UserError(f"mixture weights must be finite non-negative numbers with a positive sum, got {dict(weights)}")
    s = sum(w.values())
    return {d: v / s for d, v in w.items()}


# -- devices and batches -----------------------------------------------------------------------------------
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; cpu, cuda[:N] or mps otherwise, each checked to exist."""
    if not isinstance(device, str):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if dev.type not in DEVICE_TYPES:
        raise UserError(f"device '{device}' cannot train or analyse (no storage); use auto, cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but torch sees no MPS device; use --device cpu or auto")
    return dev


def batch_size(batch) -> int:
    """Examples in a batch: the leading dimension of its first tensor (1 for anything else)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    return 1


def move_batch(batch, device=None, dtype: torch.dtype | None = None):
    """The batch on `device`, floating tensors cast to `dtype` (integer tokens untouched)."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


@torch.no_grad()
def domain_loss(model: torch.nn.Module, batches: Sequence, loss_fn: Callable) -> float:
    """Mean loss over a domain's batches, each weighted by its size (as if one big batch)."""
    total, n = 0.0, 0
    for b in batches:
        k = batch_size(b)
        total += float(loss_fn(model, b)) * k
        n += k
    return total / max(n, 1)
