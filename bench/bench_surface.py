"""Grid points per second of the surface evaluator: vmap over chunks vs a per-point loop, same device.

    python bench/bench_surface.py [--device cpu|cuda] [--points N] [--repeats R] [--chunk C]

Models: the mix-suite MLP (its 4 domains x 4 batches of 64) and the tiny GPT on the text suite (4 domains
x 4 batches of 16 x 64 bytes). Prints points/s of each mode, the vmap/loop ratio, and what batch='auto'
picks (it must pick the faster). Timings are the best of R repeats after one warm-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape.objective import Objective  # noqa: E402
from landscape.params import get_flat  # noqa: E402
from landscape.surface import Evaluator, probe  # noqa: E402
from nexus_opt.models import build_model  # noqa: E402
from nexus_opt.suites import make_suite  # noqa: E402


def objective(suite: str, device: str) -> Objective:
    s = make_suite(suite, seed=0)
    name, cfg = s.default_model()
    torch.manual_seed(0)
    model = build_model(name, cfg)
    obj = Objective(model, {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains, weights=s.weights)
    return obj.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(obj: Objective, mode: str, theta, D, ab, repeats: int, chunk: int | None, device: str) -> float:
    """Best points/s over `repeats` evaluations of theta + a*d1 + b*d2 at the rows of ab (after one warm-up)."""
    names = list(obj.domains)
    with obj.evaluating():
        ev = Evaluator(obj, names, mode, chunk)
        ev(theta, D, ab[: max(2, min(len(ab), ev.chunk))])
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            ev(theta, D, ab)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        if ev.mode != mode:
            print(f"  note: {ev.note}")
    return len(ab) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=0, help="grid points per timing (default: 256 cuda, 64 mlp/8 gpt cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    rows = []
    for label, suite in (("mix MLP", "mix"), ("tiny GPT", "text")):
        obj = objective(suite, a.device)
        n = a.points or (256 if a.device.startswith("cuda") else (64 if suite == "mix" else 8))
        theta = get_flat(obj.params())
        g = torch.Generator().manual_seed(0)
        D = (torch.randn(2, theta.numel(), generator=g) * 0.01).to(device=a.device, dtype=obj.dtype)
        ab = torch.rand(n, 2, generator=g).to(device=a.device, dtype=obj.dtype) * 2 - 1
        r_loop = rate(obj, "loop", theta, D, ab, a.repeats, a.chunk, a.device)
        r_vmap = rate(obj, "vmap", theta, D, ab, a.repeats, a.chunk, a.device)
        if a.device.startswith("cuda"):
            auto, why = "vmap", "cuda rule"
        else:
            pr = probe(obj, list(obj.domains), a.chunk)
            auto, why = pr["pick"], f"probe: loop {pr['loop']:.1f}, vmap {pr['vmap']:.1f} pt/s"
        rows.append((label, obj.num_params(), n, r_loop, r_vmap, auto))
        print(f"{label:9s} params {obj.num_params():7d}  points {n:4d}  loop {r_loop:9.1f} pt/s  vmap {r_vmap:9.1f} pt/s"
              f"  vmap/loop {r_vmap / r_loop:5.2f}x  auto -> {auto} ({why})")
    ok = all((r[5] == "vmap") == (r[4] > r[3]) or abs(np.log(r[4] / r[3])) < np.log(1.15) for r in rows)
    print("auto picks the faster mode (within 15% noise):", "yes" if ok else
          "NO (the probe and the timing above disagree: on a shared CPU, rerun or use --threads 1)")


if __name__ == "__main__":
    main()
