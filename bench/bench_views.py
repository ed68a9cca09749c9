"""Costs of the researcher views (issue 21) on the demo's models: sharpness and connectivity, batched vs loop.

    python bench/bench_views.py [--device cpu|cuda] [--pairs N] [--points N] [--repeats R] [--quick]

Models: the mix-suite MLP and the tiny GPT of the text suite (their default configurations, the demo's
models) at their initialisation. Measured, each as the best of R repeats in this process (ratios are
against the loop in the same process; absolute rates depend on the machine and its load):
  - average-case sharpness: perturbed points per second (2 per antithetic pair), vmap vs loop;
  - worst-case sharpness: ascent steps per second (one loss and gradient of the training loss each);
  - connect: points per second along the linear path, marginal (extra points over a 3-point path: the engine's
    rate) and end to end (validation and copies included), vmap vs loop;
  - Bezier training: Adam steps per second of the control point.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_surface import objective  # noqa: E402
from landscape.connect import connect  # noqa: E402
from landscape.params import get_flat  # noqa: E402
from landscape.sharpness import sharpness  # noqa: E402


def best(fn, repeats: int) -> float:
    """The shortest wall time of `repeats` calls (after one warm-up)."""
    fn()
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=0, help="antithetic pairs (default 64 cuda, 16 cpu)")
    ap.add_argument("--points", type=int, default=0, help="path points (default 129 cuda, 33 cpu)")
    ap.add_argument("--steps", type=int, default=5, help="ascent / Bezier steps per timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the mix MLP only")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    pairs = a.pairs or (64 if cuda else 16)
    points = a.points or (129 if cuda else 33)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, pairs {pairs}, "
          f"points {points}, steps {a.steps}")
    models = (("mix MLP", "mix"),) if a.quick else (("mix MLP", "mix"), ("tiny GPT", "text"))
    for label, suite in models:
        obj = objective(suite, a.device)
        n = obj.num_params()
        out = {}
        for mode in ("loop", "vmap"):
            t = best(lambda: sharpness(obj, worst=False, samples=pairs, batch=mode, seed=0), a.repeats)
            out[f"avg_{mode}"] = 2 * pairs / t
        t = best(lambda: sharpness(obj, domains="train", average=False, steps=a.steps), a.repeats)
        out["ascent"] = (a.steps + 1) / t
        theta = get_flat(obj.params(), torch.float64)
        g = torch.Generator().manual_seed(0)
        end = theta + 0.05 * torch.randn(n, generator=g, dtype=torch.float64).to(theta.device)
        t3 = best(lambda: connect(obj, end, points=3, batch="loop"), a.repeats)
        for mode in ("loop", "vmap"):  # the marginal rate: (points - 3) extra points over a 3-point path's time
            t = best(lambda: connect(obj, end, points=points, batch=mode), a.repeats)
            t3m = t3 if mode == "loop" else best(lambda: connect(obj, end, points=3, batch=mode), a.repeats)
            out[f"path_{mode}"] = (points - 3) / max(t - t3m, 1e-9)
            out[f"path_{mode}_e2e"] = points / t
        tb = best(lambda: connect(obj, end, points=3, batch="loop", bezier=True, bezier_steps=a.steps), a.repeats)
        out["bezier"] = a.steps / max(tb - t3, 1e-9)  # the curve's own steps (+ its 3-point path)
        print(f"{label} ({n} params):")
        print(f"  average-case sharpness: loop {out['avg_loop']:.1f} pts/s, vmap {out['avg_vmap']:.1f} pts/s "
              f"(vmap/loop {out['avg_vmap'] / out['avg_loop']:.2f}x)")
        print(f"  worst-case ascent: {out['ascent']:.1f} steps/s (training loss: every trained domain's batches)")
        print(f"  connect linear path, per extra point: loop {out['path_loop']:.1f} pts/s, vmap {out['path_vmap']:.1f} "
              f"pts/s (vmap/loop {out['path_vmap'] / out['path_loop']:.2f}x); end to end at {points} points: loop "
              f"{out['path_loop_e2e']:.1f}, vmap {out['path_vmap_e2e']:.1f} pts/s")
        print(f"  Bezier training: {out['bezier']:.1f} steps/s")


if __name__ == "__main__":
    main()
