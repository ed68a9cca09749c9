"""Pretrain the tiny GPT on the built-in `text` suite with FSDP2 + bf16 autocast + Nexus over AdamW + a warmup-cosine
schedule + sharded checkpoints (torch.distributed.checkpoint) + the domain gradient-cosine tracker.

    torchrun --nproc_per_node 2 scripts/pretrain_fsdp.py --steps 4 --out runs/fsdp          # 2 CPU processes
    torchrun --nproc_per_node 8 scripts/pretrain_fsdp.py --steps 2000 --out runs/fsdp       # 8 GPUs, unchanged
    torchrun --nproc_per_node 2 scripts/pretrain_fsdp.py --steps 8 --out runs/fsdp --resume  # go on from the last

The backend is nccl where CUDA is present, otherwise gloo. Every rank takes its share of each global single-domain
micro-batch (suite.train_batch is a pure function of (step, micro), so resume is exact); FSDP2 reduce-scatters each
micro-batch's gradient and Nexus normalises by the full-gradient norm (one scalar all-reduce), so all ranks walk one
global walk. The weights stay float32 (bf16 only inside autocast), so no master copy is needed. Rank 0 writes
metrics.jsonl (one JSON line per outer step) and the tracker's rows; checkpoints go to OUT/ckpt-NNNNNN (sharded)
with OUT/latest.json naming the last complete one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nexus_opt import Nexus  # noqa: E402
from nexus_opt.distributed import load_sharded, save_sharded  # noqa: E402
from nexus_opt.models import GPT  # noqa: E402
from nexus_opt.suites.text import Text, lm_loss  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="outer steps in total (a resumed run goes on to this)")
    ap.add_argument("--inner-steps", type=int, default=4, help="K: micro-batches per outer step")
    ap.add_argument("--batch-size", type=int, default=8, help="global micro-batch (sequences), split over ranks")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=2, help="warmup outer steps")
    ap.add_argument("--ckpt-every", type=int, default=2, help="outer steps between sharded checkpoints (0: end only)")
    ap.add_argument("--track-every", type=int, default=2, help="outer steps between gradient-cosine rows (0: off)")
    ap.add_argument("--autocast", choices=["bf16", "off"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/pretrain-fsdp")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/latest.json")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop (with a checkpoint) after this outer step; resume with the same --steps goes on exactly")
    a = ap.parse_args(argv)
    for name in ("steps", "inner_steps", "batch_size", "block_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def setup() -> tuple[int, int, torch.device]:
    """The process group from torchrun's environment (one process without it)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def warmup_cosine(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def full_copy(model: torch.nn.Module, cfg: dict, device) -> torch.nn.Module:
    """An unsharded replica of the FSDP2 model (every rank all-gathers; used by the tracker on rank 0)."""
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in model.state_dict().items()}
    replica = GPT(**cfg).to(device)
    replica.load_state_dict(sd)
    return replica


def main(argv=None) -> None:
    a = parse(argv)
    rank, world, device = setup()
    if a.batch_size % world:
        raise SystemExit(f"error: --batch-size {a.batch_size} must be a multiple of the {world} processes")
    torch.manual_seed(a.seed)
    out = Path(a.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    suite = Text(seed=a.seed, block_size=a.block_size)
    cfg = dict(vocab_size=256, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    from torch.distributed.fsdp import fully_shard

    model = GPT(**cfg).to(device)
    for blk in model.blocks:
        fully_shard(blk)
    fully_shard(model)  # the embeddings, tied head and final LayerNorm
    opt = Nexus(torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-10,
                                  weight_decay=a.weight_decay), inner_lr=a.inner_lr, inner_steps=a.inner_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(a.warmup, a.steps))
    tracker = None
    if a.track_every > 0:  # on every rank: under a process group the analyzers share the batches and all-reduce
        from landscape import GradSimTracker  # the script may use the analyzers; the optimizer package does not

        tracker = GradSimTracker.from_suite(suite, every=a.track_every, seed=a.seed, resamples=0)
    start = 0
    if a.resume:
        latest = json.loads((out / "latest.json").read_text())
        extra = load_sharded(out / latest["checkpoint"], model, opt)
        sched.load_state_dict(extra["sched"])
        start = int(extra["step"])
    share = a.batch_size // world
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.autocast == "bf16")
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None

    def checkpoint(step: int) -> None:
        name = f"ckpt-{step:06d}"
        save_sharded(out / name, model, opt, extra={"step": step, "sched": sched.state_dict()})
        if rank == 0:
            tmp = out / ".latest.json.tmp"
            tmp.write_text(json.dumps({"checkpoint": name, "step": step}))
            os.replace(tmp, out / "latest.json")

    t0 = time.perf_counter()
    stop = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
    for step in range(start, stop):
        losses = []
        for micro in range(a.inner_steps):
            domain = suite.sample_domain(step, micro)
            tok = suite.train_batch(domain, step, micro, a.batch_size)["tokens"]
            batch = {"tokens": tok[rank * share:(rank + 1) * share].to(device)}
            with amp:
                loss = lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        sched.step()  # once per outer step
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        row = {"step": step + 1, "train_loss": float(mean) / world, "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 3)}
        if a.track_every > 0 and (step + 1) % a.track_every == 0:
            replica = full_copy(model, cfg, device)  # collectives: every rank takes part
            if tracker is not None:
                r = tracker(step + 1, replica, None)  # the replica is the outer weights: the walk just ended
                if r is not None:
                    row["gradsim_mean_cosine"] = r["mean_cosine"]
                    row["gradsim_mean_cosine_stderr"] = r["mean_cosine_stderr"]
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            print(json.dumps(row), flush=True)
        if (a.ckpt_every > 0 and (step + 1) % a.ckpt_every == 0) or step + 1 == stop:
            checkpoint(step + 1)
    with torch.no_grad():  # held-out loss per domain (the same batches on every rank)
        evals = {d: sum(float(lm_loss(model, {"tokens": b["tokens"].to(device)})) for b in suite.eval_batches(d))
                 / len(suite.eval_batches(d)) for d in suite.domains}
    if rank == 0:
        print(json.dumps({"final_step": stop, "eval_loss": evals, "world": world,
                          "gradsim_rows": len(tracker.rows) if tracker else 0}), flush=True)
        metrics.close()
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: a rank of a finished run was seen (1 run in ~10) to abort with
    # "terminate called without an active exception" while C++ static destructors ran against a still-joinable
    # gloo/checkpoint thread; everything is written, flushed and the group destroyed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
