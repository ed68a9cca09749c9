"""Nexus on the distributed engine (2 gloo CPU processes): FSDP2 (fully_shard) == DDP == one process in float64,
for an MLP and a tiny GPT, both modes, with a sharded mid-walk resume through torch.distributed.checkpoint;
FSDP1 made correct by shard_group or refused; the local walk (sync="outer") against its R-rank reference."""
from __future__ import annotations

import contextlib
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


def run_local(kind, mode, rank=0, world=1, sync="outer", no_sync=True):
    """DDP with every micro-batch under no_sync (forward included): rank r walks its share of each global
    micro-batch; returns the final weights and the collectives Nexus issued. Raises what Nexus raises."""
    model = ddp(build(kind)) if world > 1 else build(kind)
    opt = make_opt(model, mode, sync=sync)
    share = GLOBAL_BS // world
    for x, y in batches(kind):
        sl = slice(rank * share, (rank + 1) * share)
        with (model.no_sync() if no_sync and world > 1 else contextlib.nullcontext()):
            loss_of(kind, model, x[sl], None if y is None else y[sl]).backward()
        opt.step()
        opt.zero_grad()
    return flat(model), opt._collectives


def local_reference(kind, mode, world):
    """A plain loop simulating `world` ranks of the local walk in one process: every rank walks K normalised steps
    from the anchor on its shares (parallel: sums gamma * g/||g|| at the anchor), the outer AdamW steps on the
    mean over ranks of anchor - theta_r (parallel: of the sums)."""
    model = build(kind)
    params = list(model.parameters())
    outer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    gamma, share, data = 0.05, GLOBAL_BS // world, batches(kind)
    for t in range(OUTER_STEPS):
        anchor = [p.detach().clone() for p in params]
        disp = [torch.zeros_like(p) for p in params]
        for r in range(world):
            with torch.no_grad():
                for p, a in zip(params, anchor):
                    p.copy_(a)
            acc = [torch.zeros_like(p) for p in params]
            for k in range(K):
                x, y = data[t * K + k]
                sl = slice(r * share, (r + 1) * share)
                gs = torch.autograd.grad(loss_of(kind, model, x[sl], None if y is None else y[sl]), params)
                inv = 1.0 / float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])))
                with torch.no_grad():
                    for p, a, g in zip(params, acc, gs):
                        a.add_(g * inv, alpha=gamma)
                        if mode == "sequential":
                            p.sub_(g * inv, alpha=gamma)
            with torch.no_grad():  # sequential: the displacement anchor - theta_r, as the walk leaves it
                for d, a, p, a0 in zip(disp, acc, params, anchor):
                    d.add_((a0 - p if mode == "sequential" else a) / world)
        with torch.no_grad():
            for p, a, d in zip(params, anchor, disp):
                p.copy_(a)
                p.grad = d.clone()
        outer.step()
        outer.zero_grad()
    return flat(model)


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
                res[f"ddp-resume-{kind}-{mode}"] = run(kind, mode, ddp, rank, world, ckpt=ck + "-ddp")
        from torch.distributed.tensor.debug import CommDebugMode

        model = fsdp2(build("gpt"))
        opt = make_opt(model, "sequential")
        counts = []
        for x, _ in batches("gpt")[:K]:  # K inner steps, the last one with the outer step
            loss_of("gpt", model, x[:GLOBAL_BS // world], None).backward()
            with CommDebugMode() as comm:
                opt.step()
            counts.append(comm.get_total_counts())
            opt.zero_grad()
        res["fsdp2-step-collectives"] = torch.tensor(counts)
        for name, kw in (("offload", {"offload_anchor": True}), ("outer", {"sync": "outer"})):
            try:
                make_opt(model, "sequential", **kw)
                res[f"fsdp2-refuses-{name}"] = ""
            except ValueError as e:
                res[f"fsdp2-refuses-{name}"] = str(e)
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
        for kind in KINDS:
            for mode in MODES:
                res[f"local-{kind}-{mode}"], res[f"local-collectives-{kind}-{mode}"] = run_local(kind, mode, rank,
                                                                                                  world)
        try:  # the AdamW way of using no_sync with the global walk: refused at the first outer step
            run_local("mlp", "sequential", rank, world, sync="global")
            res["misuse"] = ""
        except RuntimeError as e:
            res["misuse"] = str(e)
        res["global-ok"], res["global-collectives"] = run_local("mlp", "sequential", rank, world, sync="global",
                                                                no_sync=False)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawn_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn_and_wait(_worker, (WORLD, free_port(), str(out)), WORLD, 240, "FSDP workers")
    return out


@pytest.fixture(scope="module")
def spawned(spawn_dir):
    return [torch.load(spawn_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_checkpoint_resumes_in_one_process(spawn_dir, mode):
    """The sharded checkpoint written mid-walk by 2 FSDP2 ranks loads into one plain process (DCP reshards), and
    the run goes on to one process's weights."""
    model, opt = build("gpt", seed=7), None
    opt = make_opt(model, mode)
    assert load_sharded(spawn_dir / f"ck-gpt-{mode}", model, opt) == {"micro": RESUME_AT}
    assert opt.micro_step == RESUME_AT and not opt.at_outer_boundary
    for x, _ in batches("gpt")[RESUME_AT:]:
        loss_of("gpt", model, x, None).backward()
        opt.step()
        opt.zero_grad()
    assert (flat(model) - run("gpt", mode)).abs().max().item() < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_equals_ddp_equals_one_process(spawned, kind):
    """FSDP2 with the defaults (foreach kernels, sharded anchor/displacement), a sharded mid-walk resume, DDP and a
    DDP mid-walk resume through the same save_sharded/load_sharded all give one process's weights to 1e-10 in
    float64, in both modes."""
    for mode in MODES:
        single = run(kind, mode)
        assert (single - flat(build(kind))).abs().max() > 1e-3  # it trained
        for key in (f"fsdp2-{kind}-{mode}", f"fsdp2-resume-{kind}-{mode}", f"ddp-{kind}-{mode}",
                    f"ddp-resume-{kind}-{mode}"):
            for r in range(WORLD):
                d = (spawned[r][key] - single).abs().max().item()
                assert d < 1e-10, (key, r, d)


def test_fsdp2_step_costs_one_scalar_all_reduce(spawned):
    """Under FSDP2 each Nexus step issues exactly one collective (the norm's scalar all-reduce), the outer step
    included: the anchor and the displacement never leave their shards. offload_anchor and the local walk are
    refused on DTensor parameters in one line."""
    assert spawned[0]["fsdp2-step-collectives"].tolist() == [1] * K
    assert "drop offload_anchor" in spawned[0]["fsdp2-refuses-offload"]
    assert "use sync='global' with FSDP2" in spawned[0]["fsdp2-refuses-outer"]


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


@pytest.mark.parametrize("kind", KINDS)
def test_local_walk_equals_its_reference_in_one_and_two_processes(spawned, kind):
    """sync="outer": one process equals the global walk (R = 1) and the R = 1 reference; 2 gloo processes under
    no_sync stay identical, equal the 2-rank reference loop to 1e-12, issue exactly one all-reduce per outer step,
    and differ from the global walk (a different algorithm)."""
    for mode in MODES:
        one, _ = run_local(kind, mode)
        assert (one - run(kind, mode)).abs().max().item() < 1e-12
        assert (one - local_reference(kind, mode, 1)).abs().max().item() < 1e-12
        ref = local_reference(kind, mode, WORLD)
        assert torch.equal(spawned[0][f"local-{kind}-{mode}"], spawned[1][f"local-{kind}-{mode}"])
        d = (spawned[0][f"local-{kind}-{mode}"] - ref).abs().max().item()
        assert d < 1e-12, (mode, d)
        assert spawned[0][f"local-collectives-{kind}-{mode}"] == OUTER_STEPS
        assert (ref - run(kind, mode)).abs().max().item() > 1e-6


def test_no_sync_with_the_global_walk_is_refused(spawned):
    """DDP's no_sync under sync="global" (the ranks' walks drift apart) raises one clear line at the first outer
    step; without no_sync the same check passes (one 2-number all-reduce per outer step) and equals one process."""
    for r in range(WORLD):
        msg = spawned[r]["misuse"]
        assert "no_sync" in msg and "sync='outer'" in msg and "\n" not in msg, msg
        assert (spawned[r]["global-ok"] - run("mlp", "sequential")).abs().max().item() < 1e-10
        assert spawned[r]["global-collectives"] == OUTER_STEPS
