"""Resumable, sharded grids: the fingerprint of what determines a grid, append-only sidecars of finished
row blocks (an interrupted grid resumes with the same numbers), and rows shared out over torch.distributed ranks."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError

from ..objective import Objective
from .results import FORMAT


def dist_info() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_rows(rows: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank's contiguous share of `rows`: shares differ in size by at most one and cover rows exactly once."""
    rows = list(rows)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world {world}")
    base, extra = divmod(len(rows), world)
    start = rank * base + min(rank, extra)
    return rows[start:start + base + (1 if rank < extra else 0)]


def _hash_tensors(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, Mapping):
        for k in sorted(x, key=str):
            h.update(str(k).encode())
            _hash_tensors(h, x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            _hash_tensors(h, v)
    else:
        h.update(repr(x).encode())


def fingerprint(obj: Objective, origin: torch.Tensor, D: torch.Tensor, x: np.ndarray, y: np.ndarray,
                names: Sequence[str], train_seed: int | None = None) -> str:
    """sha256 of what determines the grid: weights, directions, coordinates, domains, batches, loss, dtype, and
    in train mode (`train_seed` not None) the seed and batch keys that fix the dropout masks."""
    h = hashlib.sha256()
    _hash_tensors(h, [origin, D, torch.from_numpy(np.asarray(x, dtype=np.float64)),
                      torch.from_numpy(np.asarray(y, dtype=np.float64))])
    h.update(json.dumps([list(names), obj.train_domains, obj.weights, str(obj.dtype),
                         getattr(obj.loss_fn, "__qualname__", repr(obj.loss_fn))]).encode())
    if train_seed is not None:  # eval-mode fingerprints stay as they were (files written before still reuse)
        keys = [[k for k, _, _ in obj.keyed_terms(d)] for d in names]
        h.update(json.dumps(["train_mode", int(train_seed), keys]).encode())
    for d in names:
        _hash_tensors(h, obj.domains[d])
    return h.hexdigest()


def sidecars(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part*.jsonl"))


def _check_record(rec, p: Path, line: int, ny, nx, names) -> None:
    """A sidecar row block: {'rows': [row indices], 'names': [domains], 'losses': {domain: [[nx numbers]...]}}."""
    def bad(what):
        raise UserError(f"{p} line {line} is not a valid partial-grid record ({what}); delete the .part*.jsonl "
                        "files to recompute the grid")

    if not isinstance(rec, dict) or not isinstance(rec.get("rows"), list) or not isinstance(rec.get("names"), list) \
            or not isinstance(rec.get("losses"), dict):
        bad("it must hold 'rows', 'names' and 'losses'")
    rows, rnames, losses = rec["rows"], rec["names"], rec["losses"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and (ny is None or 0 <= i < ny) for i in rows):
        bad(f"row indices must be integers in [0, {ny})")
    if names is not None and rnames != list(names):
        bad("its domains are not the grid's")
    for d in rnames:
        v = losses.get(d) if isinstance(d, str) else None
        if not isinstance(v, list) or len(v) != len(rows) or not all(
                isinstance(r, list) and (nx is None or len(r) == nx) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in r) for r in v):
            bad(f"the losses of '{str(d)[:60]}' must be {len(rows)} rows of {nx} numbers")


def read_sidecars(out: Path, fp: str, ny: int | None = None, nx: int | None = None,
                  names=None) -> dict[int, dict[str, list[float]]]:
    """Rows finished by earlier (interrupted) runs, each record checked against the grid (shape, domains, row
    indices, numbers); a torn last line is ignored."""
    from nexus_opt.files import max_input_bytes, read_bounded

    done: dict[int, dict[str, list[float]]] = {}
    for p in sidecars(out):
        try:
            lines = read_bounded(p, "partial grid", max_input_bytes()).decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{p} is not UTF-8 text; delete the .part*.jsonl files to recompute the grid") from None
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if not isinstance(head, dict) or head.get("fingerprint") != fp:
            raise UserError(f"{p} holds a partial grid for other settings or weights; delete it (and its "
                            f"siblings) or choose another output path")
        for n, line in enumerate(lines[1:], 2):
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            _check_record(rec, p, n, ny, nx, names)
            for i, row in zip(rec["rows"], zip(*[rec["losses"][d] for d in rec["names"]])):
                done[int(i)] = dict(zip(rec["names"], row))
    return done


class Sidecar:
    """Append-only JSON-lines log of finished row blocks, flushed and fsynced per block."""

    def __init__(self, out: Path, rank: int, fp: str):
        from nexus_opt.files import check_output

        self.path = out.with_name(f"{out.name}.part{rank}.jsonl")
        check_output(self.path, "--out")  # never appended to an input, a FIFO or a device
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.f = open(self.path, "a")
        if new:
            self.f.write(json.dumps({"fingerprint": fp, "format": FORMAT}) + "\n")
            self.f.flush()

    def write(self, rows: list[int], losses: Mapping[str, np.ndarray]) -> None:
        names = list(losses)
        rec = {"rows": rows, "names": names, "losses": {d: np.asarray(losses[d]).tolist() for d in names}}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def broadcast(objs: list, device) -> list:
    """Rank 0's objects on every rank (tensors come back on `device`)."""
    cpu = [o.cpu() if isinstance(o, torch.Tensor) else o for o in objs]
    torch.distributed.broadcast_object_list(cpu, src=0)
    return [o.to(device) if isinstance(o, torch.Tensor) else o for o in cpu]


def all_gather(obj) -> list:
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts

