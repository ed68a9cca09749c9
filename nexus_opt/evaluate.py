"""Per-domain evaluation shared by the trainer and the analyzers (so logged and reloaded losses agree)."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch


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


def evaluate(model: torch.nn.Module, domains: Mapping[str, Sequence], loss_fn: Callable) -> dict[str, float]:
    """Per-domain evaluation losses in eval mode; the model's train/eval flags are restored after."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        return {d: domain_loss(model, b, loss_fn) for d, b in domains.items()}
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
