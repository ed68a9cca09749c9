"""Outer-optimizer ablation: Nexus over AdamW vs Nexus over Muon(2-D hidden weights)+AdamW(rest) vs plain AdamW.

    python bench/ablation_outer.py [--steps 300] [--inner-steps 4] [--batch-size 8] [--seeds 0] [--suite text|mix]
                                   [--arms adamw nexus-adamw nexus-muon nexus-parallel-adamw]

All three see the same single-domain micro-batches (the suite's seeded sampler), the same number of gradient
evaluations (AdamW accumulates the K micro-batches of a step) and the same warmup+cosine schedule. Printed per run:
the final evaluation loss of each domain (the OOD one included), the mean cross-domain gradient cosine on the
evaluation batches, and a same-domain split-half cosine as its noise floor.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nexus_opt import Nexus  # noqa: E402
from nexus_opt.models import build_model  # noqa: E402
from nexus_opt.suites import make_suite  # noqa: E402

RUNS = ("adamw", "nexus-adamw", "nexus-muon")
ARMS = RUNS + ("nexus-parallel-adamw",)  # the last: Nexus without the walk (mode="parallel"), the first-order control


def hidden_matrices(model: torch.nn.Module) -> list:
    """2-D weights inside the network: GPT block matrices, or the MLP's Linear weights but the first and last."""
    if hasattr(model, "blocks"):
        return [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    mats = [p for p in model.parameters() if p.ndim == 2]
    return mats[1:-1]


def make_optimizer(kind: str, model: torch.nn.Module, a) -> torch.optim.Optimizer:
    """The optimizer of one arm; Muon takes the 2-D weights inside the blocks (not embeddings or the head)."""
    adamw = dict(lr=a.lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=a.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), **adamw)
    if kind in ("nexus-adamw", "nexus-parallel-adamw"):
        return Nexus(torch.optim.AdamW(model.parameters(), **adamw), inner_lr=a.inner_lr, inner_steps=a.inner_steps,
                     mode="parallel" if kind == "nexus-parallel-adamw" else "sequential")
    hidden = hidden_matrices(model)
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon(hidden, lr=a.lr, weight_decay=a.weight_decay, adjust_lr_fn="match_rms_adamw")
    return Nexus([muon, torch.optim.AdamW(rest, **adamw)], inner_lr=a.inner_lr, inner_steps=a.inner_steps)


def domain_grad(model, suite, domain: str) -> torch.Tensor:
    """The flat gradient of the mean evaluation loss of one domain."""
    model.zero_grad(set_to_none=True)
    batches = suite.eval_batches(domain)
    sum(suite.loss_fn(model, b) for b in batches).div(len(batches)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def half_grads(model, suite, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the two halves of a domain's evaluation batches (the noise floor of the cosine)."""
    out = []
    bs = suite.eval_batches(domain)
    for part in (bs[: len(bs) // 2], bs[len(bs) // 2:]):
        model.zero_grad(set_to_none=True)
        sum(suite.loss_fn(model, b) for b in part).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    return out[0], out[1]


def measure(model, suite) -> dict:
    """Evaluation loss per domain, mean cross-domain gradient cosine, mean split-half same-domain cosine."""
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        losses = {d: statistics.mean(suite.loss_fn(model, b).item() for b in suite.eval_batches(d))
                  for d in suite.domains}
    grads = {d: domain_grad(model, suite, d) for d in suite.train_domains}
    cross = [cos(grads[i], grads[j], dim=0).item() for i, j in itertools.combinations(suite.train_domains, 2)]
    floor = [cos(*half_grads(model, suite, d), dim=0).item() for d in suite.train_domains]
    model.zero_grad(set_to_none=True)
    return {"loss": losses, "train_loss": statistics.mean(losses[d] for d in suite.train_domains),
            "cross_cos": statistics.mean(cross), "floor_cos": statistics.mean(floor)}


def run(kind: str, seed: int, a) -> dict:
    suite = make_suite(a.suite, seed=seed)
    name, cfg = suite.default_model()
    torch.manual_seed(seed)
    model = build_model(name, cfg)
    opt = make_optimizer(kind, model, a)
    warm = max(1, a.steps // 10)
    cosine = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else cosine(s))
    K, t0 = a.inner_steps, time.perf_counter()
    for step in range(a.steps):
        for micro in range(K):
            batch = suite.train_batch(suite.sample_domain(step, micro), step, micro, a.batch_size)
            loss = suite.loss_fn(model, batch)
            if kind == "adamw":
                (loss / K).backward()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        if kind == "adamw":
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
    out = measure(model, suite)
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="text", choices=["text", "mix"])
    ap.add_argument("--steps", type=int, default=300, help="optimizer (outer) steps per run")
    ap.add_argument("--inner-steps", type=int, default=4, help="K: micro-batches per step")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--arms", nargs="+", default=list(RUNS), choices=list(ARMS),
                    help="optimizers to compare (nexus-parallel-adamw: the control without the inner walk)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"suite={a.suite} steps={a.steps} K={a.inner_steps} batch={a.batch_size} lr={a.lr} wd={a.weight_decay} "
          f"inner_lr={a.inner_lr} seeds={a.seeds} torch={torch.__version__}")
    results = {k: [] for k in a.arms}
    for seed in a.seeds:
        for kind in a.arms:
            r = run(kind, seed, a)
            results[kind].append(r)
            losses = " ".join(f"{d}={v:.4f}" for d, v in r["loss"].items())
            print(f"seed {seed} {kind:12s} train-domain loss {r['train_loss']:.4f} ({losses})  "
                  f"cross-domain cos {r['cross_cos']:+.4f}  same-domain floor {r['floor_cos']:+.4f}  "
                  f"[{r['seconds']:.0f} s]", flush=True)
    if len(a.seeds) > 1:
        for kind in a.arms:
            rs = results[kind]
            print(f"mean {kind:12s} train-domain loss {statistics.mean(r['train_loss'] for r in rs):.4f}  "
                  f"cross-domain cos {statistics.mean(r['cross_cos'] for r in rs):+.4f}")


if __name__ == "__main__":
    main()
