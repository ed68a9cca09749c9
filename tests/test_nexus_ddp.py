"""Nexus (both modes) under DistributedDataParallel (2 CPU processes, gloo) equals one process fed the same global
micro-batches."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import free_port, spawn_and_wait
from nexus_opt import Nexus

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, K, OUTER_STEPS, GLOBAL_BS = 2, 4, 6, 8
MODES = ("sequential", "parallel")  # Nexus and its first-order control share the DDP semantics


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _batches():
    """Single-domain global micro-batches of a 3-domain regression (the same in every process)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = []
    for _ in range(K * OUTER_STEPS):
        d = int(torch.randint(3, (1,), generator=g))
        x = torch.randn(GLOBAL_BS, 4, generator=g, dtype=torch.float64)
        out.append((x, torch.tanh(x @ w[d]).unsqueeze(1)))
    return out


def _train(model, rank: int = 0, world: int = 1, mode: str = "sequential"):
    """Rank r takes its share of every global micro-batch; DDP all-reduces each micro-batch gradient (no no_sync)."""
    opt = Nexus(torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1),
                inner_lr=0.05, inner_steps=K, mode=mode)
    share = GLOBAL_BS // world
    for x, y in _batches():
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        ((model(xs) - ys) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.at_outer_boundary
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for mode in MODES:
            ddp = nn.parallel.DistributedDataParallel(_model())
            flat = _train(ddp, rank, world, mode)
            torch.save(flat, os.path.join(outdir, f"{mode}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch: ~10-20 s on 2 busy cores
def test_ddp_matches_single_process(tmp_path):
    spawn_and_wait(_worker, (WORLD, free_port(), str(tmp_path)), WORLD, 120, "DDP workers")
    finals = {}
    for mode in MODES:
        single = _train(_model(), mode=mode)
        ranks = [torch.load(tmp_path / f"{mode}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
        assert torch.equal(ranks[0], ranks[1])  # one global inner trajectory
        assert (ranks[0] - single).abs().max().item() < 1e-10
        assert (single - torch.cat([p.detach().reshape(-1) for p in _model().parameters()])).abs().max() > 1e-2
        finals[mode] = single
    assert (finals["sequential"] - finals["parallel"]).abs().max() > 1e-6
