"""Flat views of a model's trainable parameters: one vector <-> named tensors, in obj.params() order."""
from __future__ import annotations

from typing import Mapping

import torch


def flatten(tensors) -> torch.Tensor:
    """Concatenate tensors (a sequence or a name->tensor mapping) into one 1-D vector."""
    if isinstance(tensors, Mapping):
        tensors = list(tensors.values())
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector into named tensors shaped like `like` (views of `vec`)."""
    out, i = {}, 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vec[i:i + n].view_as(t)
        i += n
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, parameters have {i}")
    return out


def get_flat(params: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached copy of the parameters as one vector."""
    v = flatten([p.detach() for p in params.values()]).clone()
    return v if dtype is None else v.to(dtype)


@torch.no_grad()
def set_flat(params: Mapping[str, torch.Tensor], vec: torch.Tensor) -> None:
    """Write a flat vector into the parameters in place."""
    for p, v in zip(params.values(), unflatten(vec, params).values()):
        p.copy_(v.to(p.dtype))


def layer_slices(params: Mapping[str, torch.Tensor]) -> dict[str, slice]:
    """Each parameter's slice of the flat vector, by name (for per-layer breakdowns)."""
    out, i = {}, 0
    for name, t in params.items():
        out[name] = slice(i, i + t.numel())
        i += t.numel()
    return out
