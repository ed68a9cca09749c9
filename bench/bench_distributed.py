"""Communication and time per outer step under 2 processes (gloo, CPU; DDP over the tiny GPT), side by side:
AdamW with K-step accumulation under no_sync, Nexus's global walk (every micro-batch all-reduced), Nexus's local walk
(sync="outer": every micro-batch under no_sync, one all-reduce of the displacement per outer step); and the memory
of the float32 master walk for bf16 weights.

    python bench/bench_distributed.py [--steps N] [--inner-steps K] [--batch-size B] [--world R]

All-reduces and bytes are counted where they happen: DDP's gradient buckets through a comm hook, Nexus's own
collectives through torch.distributed.all_reduce. Times are medians over the outer steps on rank 0, the arms
interleaved step by step in the same processes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nexus_opt import Nexus  # noqa: E402
from nexus_opt.models import GPT  # noqa: E402

CONFIG = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
ARMS = ("adamw+no_sync", "nexus-global", "nexus-local")
REAL_ALL_REDUCE = dist.all_reduce  # the DDP hook calls this one, so that only Nexus's calls pass the counting wrapper


class Counter:
    """All-reduce calls and bytes, by who issued them."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0

    def add(self, t: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += t.numel() * t.element_size()


def ddp_hook(counter: Counter):
    def hook(state, bucket):
        buf = bucket.buffer()
        counter.add(buf)
        fut = REAL_ALL_REDUCE(buf.div_(dist.get_world_size()), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


def build(arm: str, K: int, counter: Counter):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT(**CONFIG))
    model.register_comm_hook(None, ddp_hook(counter))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    if arm == "adamw+no_sync":
        return model, adamw
    return model, Nexus(adamw, inner_lr=0.01, inner_steps=K, sync="outer" if arm == "nexus-local" else "global")


def outer_step(arm: str, model, opt, batches, K: int) -> None:
    for k, tok in enumerate(batches):
        local = arm == "nexus-local" or (arm == "adamw+no_sync" and k < K - 1)
        with model.no_sync() if local else torch.enable_grad():
            logits = model(tok[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))
            (loss / K if arm == "adamw+no_sync" else loss).backward()
        if arm != "adamw+no_sync":
            opt.step()
            opt.zero_grad(set_to_none=True)
    if arm == "adamw+no_sync":
        opt.step()
        opt.zero_grad(set_to_none=True)


def worker(rank: int, world: int, port: int, a, outfile: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    nexus_counter = Counter()
    real = REAL_ALL_REDUCE

    def counted(t, *args, **kw):  # Nexus's own collectives (DDP's go through the hook, not through here)
        nexus_counter.add(t)
        return real(t, *args, **kw)

    try:
        counters = {arm: Counter() for arm in ARMS}
        runs = {arm: build(arm, a.inner_steps, counters[arm]) for arm in ARMS}
        nexus_by_arm = {arm: Counter() for arm in ARMS}
        times: dict = {arm: [] for arm in ARMS}
        g = torch.Generator().manual_seed(1 + rank)
        share = a.batch_size // world
        for step in range(a.steps + 1):  # step 0 warms up (DDP's first iteration builds its buckets)
            batches = [torch.randint(0, 256, (share, CONFIG["block_size"] + 1), generator=g)
                       for _ in range(a.inner_steps)]
            for arm in ARMS:
                model, opt = runs[arm]
                c0, b0 = counters[arm].calls, counters[arm].bytes
                n0, nb0 = nexus_counter.calls, nexus_counter.bytes
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce = counted
                try:
                    outer_step(arm, model, opt, batches, a.inner_steps)
                finally:
                    dist.all_reduce = real
                dt = time.perf_counter() - t
                if step > 0:
                    times[arm].append(dt)
                else:  # only the measured steps count
                    counters[arm].calls, counters[arm].bytes = c0, b0
                    nexus_counter.calls, nexus_counter.bytes = n0, nb0
                nexus_by_arm[arm].calls += nexus_counter.calls - n0 if step > 0 else 0
                nexus_by_arm[arm].bytes += nexus_counter.bytes - nb0 if step > 0 else 0
        same = {}
        for arm in ARMS:
            flat = torch.cat([p.detach().reshape(-1) for p in runs[arm][0].parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            same[arm] = max((x - gathered[0]).abs().max().item() for x in gathered)
        if rank == 0:
            n = a.steps
            res = {arm: {"allreduces_per_outer_step": (counters[arm].calls + nexus_by_arm[arm].calls) / n,
                         "bytes_per_outer_step": (counters[arm].bytes + nexus_by_arm[arm].bytes) / n,
                         "ddp_allreduces": counters[arm].calls / n, "nexus_allreduces": nexus_by_arm[arm].calls / n,
                         "step_ms": 1e3 * statistics.median(times[arm]),
                         "max_weight_difference_across_ranks": same[arm]} for arm in ARMS}
            with open(outfile, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def master_memory() -> dict:
    """Bytes Nexus holds beyond the outer optimizer for the tiny GPT, float32 vs bf16 weights (both modes)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("sequential", "parallel"):
            torch.manual_seed(0)
            model = GPT(**CONFIG).to(dtype)
            opt = Nexus(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-10), inner_lr=0.01, mode=mode)
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            buf = sum(b.numel() * b.element_size() for g in opt._buf for b in g)
            master = sum(w.numel() * w.element_size() for g in opt._master for w in g if w is not None)
            out[f"{str(dtype).split('.')[-1]}-{mode}"] = {"param_bytes": params, "anchor_or_displacement_bytes": buf,
                                                         "float32_walk_bytes": master,
                                                         "overhead_x_params": (buf + master) / params}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="measured outer steps (after one warm-up step)")
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="global micro-batch, split over the processes")
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        outfile = os.path.join(d, "res.json")
        mp.start_processes(worker, args=(a.world, port, a, outfile), nprocs=a.world, start_method="spawn")
        with open(outfile) as f:
            res = json.load(f)
    n_params = sum(p.numel() for p in GPT(**CONFIG).parameters())
    print(f"tiny GPT ({n_params:,} parameters, float32), DDP over {a.world} gloo processes, K = {a.inner_steps}, "
          f"global micro-batch {a.batch_size}, {a.steps} outer steps, torch {torch.__version__}")
    print(f"{'arm':<15} {'all-reduces/outer':>18} {'(DDP + Nexus)':>14} {'bytes/outer':>12} {'step ms':>9} "
          f"{'ranks differ by':>16}")
    for arm in ARMS:
        r = res[arm]
        print(f"{arm:<15} {r['allreduces_per_outer_step']:>18.2f} "
              f"{r['ddp_allreduces']:>7.2f} + {r['nexus_allreduces']:<4.2f} {r['bytes_per_outer_step']:>12,.0f} "
              f"{r['step_ms']:>9.1f} {r['max_weight_difference_across_ranks']:>16.1e}")
    base = res["adamw+no_sync"]["step_ms"]
    print("step time / AdamW+no_sync: " + ", ".join(f"{arm} {res[arm]['step_ms'] / base:.3f}" for arm in ARMS[1:]))
    print("memory beyond the outer optimizer (bytes; x = times the parameters' own bytes):")
    for k, m in master_memory().items():
        print(f"  {k:<21} params {m['param_bytes']:>9,}  anchor/displacement {m['anchor_or_displacement_bytes']:>9,}"
              f"  float32 walk {m['float32_walk_bytes']:>9,}  = {m['overhead_x_params']:.2f} x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
