"""Sharded checkpoints of a model and its Nexus optimizer through torch.distributed.checkpoint (DCP).

Every tensor (DTensor shards under FSDP2, plain tensors under DDP or one process) goes through DCP, so each rank
writes and reads only its own shards; everything else (counters, lrs, flags) goes into a JSON sidecar,
``nexus.json``, written atomically by rank 0. Nothing is unpickled on load (DCP would unpickle non-tensor values,
so none are given to it). Only torch and the standard library are used.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import pack, unpack

__all__ = ["save_sharded", "load_sharded"]

SIDECAR = "nexus.json"
FORMAT = "nexus-sharded-checkpoint"


def _pack(obj: Any, tensors: dict, path: str) -> Any:
    """checkpoint.pack keeping tensors as they are (no copy: DTensors stay sharded)."""
    return pack(obj, tensors, path, keep=lambda t: t, where="a sharded checkpoint")


def _tensor_keys(obj: Any, out: list) -> list:
    if isinstance(obj, list):
        for v in obj:
            _tensor_keys(v, out)
    elif isinstance(obj, dict):
        if "__tensor__" in obj:
            out.append(obj["__tensor__"])
        else:
            for v in obj.values():
                _tensor_keys(v, out)
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _no_dist() -> bool:
    """No process group: DCP reads and writes as one process (and says so only when asked)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _one_process_is_intended():
    """Silence DCP's 'assuming the intent is to ... in a single process': without a process group it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process")
        yield


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _init_outer_state(opt) -> None:
    """Give every outer optimizer its per-parameter state (a zero-gradient step at lr 0, gradients put back), so that
    a fresh optimizer has the tensors DCP loads into. Only for loading: the loaded state replaces all of it."""
    for o in (opt.outer if isinstance(opt.outer, list) else [opt.outer]):
        if o.state:
            continue
        params = [p for g in o.param_groups for p in g["params"] if p.requires_grad]
        saved = [p.grad for p in params]
        lrs = [g["lr"] for g in o.param_groups]
        try:
            for p in params:
                p.grad = torch.zeros_like(p)
            for g in o.param_groups:
                g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
            o.step()
        finally:
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr
            for p, gr in zip(params, saved):
                p.grad = gr


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, opt, *, extra: Optional[dict] = None) -> None:
    """Save model.state_dict() and opt.state_dict() (a Nexus, or any torch optimizer) under directory `path`:
    the tensors through DCP (each rank its own shards), the rest and `extra` (JSON values) in nexus.json.
    Call on every rank; mid-walk is fine (the model holds the inner weights, the optimizer the anchor)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tensors: dict = {}
    skeleton = _pack(opt.state_dict(), tensors, "o")
    with _one_process_is_intended():
        dcp.save({"model": model.state_dict(), "optim": tensors}, checkpoint_id=str(path), no_dist=_no_dist())
    if _rank() == 0:
        tmp = path / f".{SIDECAR}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "optim": skeleton, "extra": extra or {}}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / SIDECAR)
    _barrier()


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, opt) -> dict:
    """Load a save_sharded() directory into `model` and `opt` in place (every rank reads its own shards); returns
    the saved `extra`. A missing or foreign sidecar, or an optimizer of another structure, is a one-line ValueError."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    try:
        meta = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a sharded Nexus checkpoint ({SIDECAR}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sharded Nexus checkpoint ({SIDECAR} has no format {FORMAT!r})")
    _init_outer_state(opt)
    template: dict = {}
    _pack(opt.state_dict(), template, "o")
    wanted = _tensor_keys(meta["optim"], [])
    missing = [k for k in wanted if k not in template]
    if missing:
        raise ValueError(f"{path}: the checkpoint's optimizer state does not fit this optimizer "
                         f"(no tensor {missing[0]!r} here)")
    # Fresh tensors to load into (the optimizer's own would be overwritten before load_state_dict validates).
    dest = {k: torch.empty_like(template[k]) for k in wanted}
    with _one_process_is_intended():
        dcp.load({"model": model.state_dict(), "optim": dest}, checkpoint_id=str(path), no_dist=_no_dist())
    opt.load_state_dict(unpack(meta["optim"], dest))
    return meta.get("extra") or {}
