"""Nexus on the distributed engine (2 gloo CPU processes): FSDP2 (fully_shard) == DDP == one process in float64,
for an MLP and a tiny GPT, both modes, with a sharded mid-walk resume through torch.distributed.checkpoint;
FSDP1 made correct by shard_group or refused; the local walk (sync="outer") against its R-rank reference."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from conftest import free_port, spawn_and_wait
from nexus_opt import Nexus
from nexus_opt.distributed import load_sharded, save_sharded
from nexus_opt.models import GPT

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, K, OUTER_STEPS, GLOBAL_BS = 2, 3, 3, 4
RESUME_AT = 4  # a mid-walk micro-step (phase 1 of the second walk)
MODES = ("sequential", "parallel")
KINDS = ("mlp", "gpt")


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":  # the last layer's (1, 8) weight shards unevenly over 2 ranks (one rank holds nothing)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return GPT(vocab_size=16, block_size=6, n_layer=1, n_head=2, n_embd=8).double()


def batches(kind: str, n: int = K * OUTER_STEPS):
    """Single-domain global micro-batches (the same in every process)."""
    g = torch.Generator().manual_seed(1)
    out = []
    if kind == "mlp":
        w = torch.randn(3, 4, generator=g, dtype=torch.float64)
        for _ in range(n):
            d = int(torch.randint(3, (1,), generator=g))
            x = torch.randn(GLOBAL_BS, 4, generator=g, dtype=torch.float64)
            out.append((x, torch.tanh(x @ w[d]).unsqueeze(1)))
    else:
        for _ in range(n):
            d = int(torch.randint(3, (1,), generator=g))  # a domain = a band of the vocabulary
            out.append((torch.randint(5 * d, 5 * d + 6, (GLOBAL_BS, 7), generator=g), None))
    return out


def loss_of(kind: str, model, x, y):
    if kind == "mlp":
        return ((model(x) - y) ** 2).mean()
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def make_opt(model, mode: str, **kw):
    return Nexus(torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1),
                 inner_lr=0.05, inner_steps=K, mode=mode, **kw)


def flat(model) -> torch.Tensor:
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for m in (model if isinstance(model, nn.Sequential) else model.blocks):
        if any(True for _ in m.parameters()):
            fully_shard(m)
    return fully_shard(model)


def ddp(model):
    return nn.parallel.DistributedDataParallel(model)


def fsdp1(use_orig_params: bool):
    def wrap(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    return wrap


def fsdp1_flat(model) -> torch.Tensor:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model):
        return torch.cat([p.detach().reshape(-1).clone() for p in model.module.parameters()])


def run(kind, mode, wrap=lambda m: m, rank=0, world=1, ckpt=None, flatten=flat, **kw):
    """Train on the global micro-batches (rank r takes its share of each); with `ckpt`, save sharded at RESUME_AT
    (mid-walk), rebuild everything from another seed and load before going on."""
    model = wrap(build(kind))
    opt = make_opt(model, mode, **kw)
    share = GLOBAL_BS // world
    for i, (x, y) in enumerate(batches(kind)):
        if ckpt is not None and i == RESUME_AT:
            save_sharded(ckpt, model, opt, extra={"micro": i})
            model = wrap(build(kind, seed=7))
            opt = make_opt(model, mode, **kw)
            assert load_sharded(ckpt, model, opt) == {"micro": i}
        sl = slice(rank * share, (rank + 1) * share)
        loss_of(kind, model, x[sl], None if y is None else y[sl]).backward()
        opt.step()
        opt.zero_grad()
    assert opt.at_outer_boundary
    return flatten(model)


def _init(rank, world, port):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    _init(rank, world, port)
    try:
        res = {}
        for kind in KINDS:
            for mode in MODES:
                res[f"fsdp2-{kind}-{mode}"] = run(kind, mode, fsdp2, rank, world)
                ck = os.path.join(outdir, f"ck-{kind}-{mode}")
                res[f"fsdp2-resume-{kind}-{mode}"] = run(kind, mode, fsdp2, rank, world, ckpt=ck)
                res[f"ddp-{kind}-{mode}"] = run(kind, mode, ddp, rank, world)
        for orig in (True, False):
            name = "orig" if orig else "flat"
            try:
                make_opt(fsdp1(orig)(build("mlp")), "sequential")
                res[f"fsdp1-{name}-refusal"] = ""
            except ValueError as e:
                res[f"fsdp1-{name}-refusal"] = str(e)
            for mode in MODES:
                model = fsdp1(orig)(build("mlp"))
                res[f"fsdp1-{name}-{mode}"] = run("mlp", mode, fsdp1(orig), rank, world, flatten=fsdp1_flat,
                                                  shard_group=model.process_group)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn_and_wait(_worker, (WORLD, free_port(), str(out)), WORLD, 240, "FSDP workers")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_equals_ddp_equals_one_process(spawned, kind):
    """FSDP2 with the defaults (foreach kernels, sharded anchor/displacement), a sharded mid-walk resume, and DDP
    all give one process's weights to 1e-10 in float64, in both modes."""
    for mode in MODES:
        single = run(kind, mode)
        assert (single - flat(build(kind))).abs().max() > 1e-3  # it trained
        for key in (f"fsdp2-{kind}-{mode}", f"fsdp2-resume-{kind}-{mode}", f"ddp-{kind}-{mode}"):
            for r in range(WORLD):
                d = (spawned[r][key] - single).abs().max().item()
                assert d < 1e-10, (key, r, d)


@pytest.mark.parametrize("layout", ["orig", "flat"])
def test_fsdp1_refused_without_shard_group_and_exact_with_it(spawned, layout):
    """FSDP1 (use_orig_params=True: per-parameter shard views; False: one FlatParameter) would normalise each rank
    by its own shard's norm: refused in one line naming the fix; with shard_group it equals one process."""
    for r in range(WORLD):
        msg = spawned[r][f"fsdp1-{layout}-refusal"]
        assert "shard_group=fsdp_model.process_group" in msg and "\n" not in msg, msg
    for mode in MODES:
        single = run("mlp", mode)
        for r in range(WORLD):
            d = (spawned[r][f"fsdp1-{layout}-{mode}"] - single).abs().max().item()
            assert d < 1e-10, (layout, mode, r, d)
