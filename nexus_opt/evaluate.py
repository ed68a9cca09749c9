"""Per-domain evaluation shared by the trainer and the analyzers (so logged and reloaded losses agree)."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .util import batch_size, domain_loss, move_batch  # noqa: F401  (re-exported: their home is util)


def evaluate(model: torch.nn.Module, domains: Mapping[str, Sequence], loss_fn: Callable) -> dict[str, float]:
    """Per-domain evaluation losses in eval mode; the model's train/eval flags are restored after."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        return {d: domain_loss(model, b, loss_fn) for d, b in domains.items()}
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
