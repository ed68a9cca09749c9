"""Time and memory of one optimizer step (K micro-batches of forward+backward + optimizer work): Nexus (and its
parallel control) vs AdamW.

    python bench/bench_nexus.py [--device cpu|cuda] [--steps N] [--repeats R] [--inner-steps K] [--batch-size B]

Both run on the tiny GPT (vocab 256, block 64, 2 layers, 2 heads, 64 wide) with random byte tokens, in the same
process, interleaved step by step; medians (and the median of paired-step ratios) are reported. AdamW accumulates
the K micro-batch gradients and steps once; Nexus takes K inner steps and one outer AdamW step; nexus-parallel
(mode="parallel", the first-order control) normalises the K gradients at the anchor and sums them. Memory: on CPU the
bytes held by optimizer state (the anchor or displacement vs the parameters); on CUDA torch.cuda.max_memory_allocated,
with and without offload_anchor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nexus_opt import Nexus  # noqa: E402
from nexus_opt.models import GPT  # noqa: E402

CONFIG = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


def loss_fn(model, batch):
    tok = batch["tokens"]
    logits = model(tok[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))


def build(kind: str, device: str, K: int):
    """A fresh GPT (same init for every kind) and its optimizer: 'adamw', 'nexus', 'nexus-parallel' or
    'nexus-offload'."""
    torch.manual_seed(0)
    model = GPT(**CONFIG).to(device)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    if kind == "adamw":
        return model, adamw
    return model, Nexus(adamw, inner_lr=0.01, inner_steps=K, offload_anchor=kind == "nexus-offload",
                        mode="parallel" if kind == "nexus-parallel" else "sequential")


def train_step(kind: str, model, opt, batches, K: int) -> float:
    """One optimizer step = K micro-batches; returns the seconds spent inside the optimizer."""
    t_opt = 0.0
    for b in batches:
        loss = loss_fn(model, b)
        if kind == "adamw":
            (loss / K).backward()
        else:
            loss.backward()
            t = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t_opt += time.perf_counter() - t
    if kind == "adamw":
        t = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_opt += time.perf_counter() - t
    return t_opt


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(kind, model, opt, batches, K, device) -> tuple[float, float]:
    """(seconds for one optimizer step, seconds of it inside the optimizer)."""
    sync(device)
    t = time.perf_counter()
    t_opt = train_step(kind, model, opt, batches, K)
    sync(device)
    return time.perf_counter() - t, t_opt


def state_bytes(opt) -> tuple[int, int, int]:
    """(parameter bytes, outer optimizer state bytes, Nexus anchor bytes)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    pb = sum(p.numel() * p.element_size() for p in params)
    sb = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    ab = sum(a.numel() * a.element_size() for g in getattr(opt, "_buf", []) for a in g)
    return pb, sb, ab


def cuda_peak(kind: str, K: int, B: int, steps: int) -> int:
    """Peak allocated bytes of a fresh model+optimizer over a few steps (alone on the device)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, opt = build(kind, "cuda", K)
    data = make_data(K, B, "cuda")
    for s in range(steps):
        train_step(kind, model, opt, data[:K], K)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, opt, data
    return peak


def make_data(K: int, B: int, device: str, pool: int = 4):
    g = torch.Generator().manual_seed(1)
    return [{"tokens": torch.randint(0, 256, (B, CONFIG["block_size"] + 1), generator=g).to(device)}
            for _ in range(pool * K)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps of each optimizer per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (the total is steps x repeats, interleaved)")
    ap.add_argument("--inner-steps", type=int, default=4, help="K: micro-batches per optimizer step")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if a.threads:
        torch.set_num_threads(a.threads)
    K, dev = a.inner_steps, a.device
    kinds = ["adamw", "nexus", "nexus-parallel"] + (["nexus-offload"] if dev == "cuda" else [])
    runs = {k: build(k, dev, K) for k in kinds}
    data = make_data(K, a.batch_size, dev)
    for k in kinds:  # warm-up: lazy optimizer state, kernels, allocator
        for _ in range(2):
            train_step(k, *runs[k], data[:K], K)
    # Interleave step by step (the order alternates) so that load drift hits both alike; pair adjacent steps.
    res = {k: ([], []) for k in kinds}
    for s in range(a.repeats * a.steps):
        batches = data[(s * K) % len(data):(s * K) % len(data) + K]
        for k in (kinds if s % 2 == 0 else kinds[::-1]):
            tot, opt = timed_step(k, *runs[k], batches, K, dev)
            res[k][0].append(tot)
            res[k][1].append(opt)
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
    n_params = sum(p.numel() for p in runs["adamw"][0].parameters())
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} params={n_params} K={K} "
          f"micro-batch={a.batch_size}x{CONFIG['block_size']} steps={a.steps} repeats={a.repeats}")
    for k in kinds:
        print(f"{k:14s} step {med[k][0] * 1e3:8.2f} ms   optimizer part {med[k][1] * 1e3:7.3f} ms")
    for k in kinds[1:]:
        paired = statistics.median(n / m for n, m in zip(res[k][0], res["adamw"][0]))
        print(f"time ratio {k}/adamw: {med[k][0] / med['adamw'][0]:.3f} (ratio of medians), "
              f"{paired:.3f} (median of paired steps); optimizer part "
              f"{med[k][1] * 1e3 - med['adamw'][1] * 1e3:+.3f} ms per step")
    pb, sb_a, _ = state_bytes(runs["adamw"][1])
    for k in ("nexus", "nexus-parallel"):
        _, sb_n, ab = state_bytes(runs[k][1])
        print(f"memory {k}: params {pb} B; AdamW state {sb_a} B; {k} state {sb_n} B + buffer {ab} B "
              f"= extra {sb_n + ab - sb_a} B = {(sb_n + ab - sb_a) / pb:.3f} x params")
    if dev == "cuda":
        del runs, data
        peaks = {k: cuda_peak(k, K, a.batch_size, 3) for k in kinds}
        for k in kinds[1:]:
            print(f"cuda peak {k}: {peaks[k]} B vs adamw {peaks['adamw']} B: overhead {peaks[k] - peaks['adamw']} B "
                  f"= {(peaks[k] - peaks['adamw']) / pb:.3f} x params")


if __name__ == "__main__":
    main()
