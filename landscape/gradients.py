"""Full-batch gradients of a domain's loss as flat float64 vectors: the one implementation every analyzer uses
(gradient similarity, closeness's Theorem 3.1, the sharded cosines under torchrun)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from nexus_opt.errors import UserError


def batch_gradient(obj, batch, params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """(flat float64 gradient, loss) of one batch at the model's weights; touches no .grad, keeps no graph."""
    params = obj.params() if params is None else params
    loss = obj.loss_fn(obj.model, batch)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise UserError("the loss does not depend on any trainable parameter; check the model and loss_fn")
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for g, p in zip(grads, params.values())])
    return flat, float(loss.detach())


def domain_gradient(obj, domain: str | None, *, train_mode: bool | None = None,
                    seed: int | None = None) -> tuple[torch.Tensor, float]:
    """(flat float64 gradient, loss) of a domain's full loss (None/'train': the training loss), its fixed batches
    weighted as obj.terms says. Under torch.distributed each rank takes its share of the batches and the sums
    are all-reduced (the same numbers on every rank). `train_mode`: None keeps the model's mode flags as they
    are; True/False sets them for the call (restored after, with the buffers such as BatchNorm statistics and the
    RNG: Objective.preserved). `seed`: each batch runs on an RNG seeded for it
    (objective.batch_rng: train mode's fixed dropout masks); None leaves the RNG alone."""
    from . import distributed as dist
    from .objective import batch_rng

    if train_mode is not None:
        with obj.preserved(train_mode, seed=None):
            return domain_gradient(obj, domain, train_mode=None, seed=seed)
    params = obj.params()
    g = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64, device=obj.device)
    loss = 0.0
    terms = obj.keyed_terms(domain)
    if dist.active():
        terms = dist.shard(terms)
    for k, c, b in terms:
        with batch_rng(seed, k, obj.device):
            gb, lb = batch_gradient(obj, b, params)
        g.add_(gb, alpha=c)
        loss += c * lb
    if dist.active():
        g = dist.allreduce(g)
        loss = float(dist.allreduce(torch.tensor([loss], dtype=torch.float64, device=g.device))[0])
    return g, loss
