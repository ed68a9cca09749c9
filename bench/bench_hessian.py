"""Benchmark: our Lanczos vs PyHessian on one MLP and batch (HVPs, time, accuracy vs the dense Hessian), and
batched Hessian-vector products (8/16/32 vectors) vs a loop of single products on the MLP and a tiny GPT.

    python bench/bench_hessian.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape import Objective  # noqa: E402
from landscape.hvp import HessianOperator  # noqa: E402
from landscape.lanczos import eigsh, lanczos  # noqa: E402
from landscape.params import flatten, unflatten  # noqa: E402
from landscape.pyhessian_backend import pyhessian_eigen  # noqa: E402
from landscape.trace import hutchpp  # noqa: E402
from nexus_opt.models import GPT, MLP  # noqa: E402
from nexus_opt.suites import make_suite  # noqa: E402
from nexus_opt.suites.text import lm_loss  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mlp_objective(device, hidden: int, batch: int) -> Objective:
    """The mix suite's regression data, one batch, an 8-hidden-hidden-1 tanh MLP."""
    s = make_suite("mix", seed=0, options={"eval_batches": 1, "eval_batch_size": batch})
    torch.manual_seed(0)
    model = MLP(8, hidden, 2, 1).to(device)
    b = {k: v.to(device) for k, v in s.eval_batches("a")[0].items()}
    return Objective(model, {"a": [b]}, s.loss_fn)


def gpt_objective(device, n_embd: int, block: int, batch: int) -> Objective:
    s = make_suite("text", seed=0, options={"block_size": block, "eval_batches": 1, "eval_batch_size": batch})
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=block, n_layer=2, n_head=2, n_embd=n_embd).to(device)
    b = {k: v.to(device) for k, v in s.eval_batches("code")[0].items()}
    return Objective(model, {"code": [b]}, lm_loss)


def dense_eigvals(obj: Objective) -> np.ndarray:
    """Eigenvalues of the dense float64 Hessian from torch.autograd.functional.hessian (the truth)."""
    w = obj.to(dtype=torch.float64)
    P = {k: v.detach() for k, v in w.params().items()}

    def f(flat):
        p = unflatten(flat, P)
        return sum(c * w.functional_loss(p, b) for c, b in w.terms(None))

    with w.evaluating():
        H = torch.autograd.functional.hessian(f, flatten(P), vectorize=True)
    return np.linalg.eigvalsh(H.cpu().numpy())


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def compare_pyhessian(device, hidden: int, batch: int) -> None:
    obj = mlp_objective(device, hidden, batch)
    print(f"\n== top-k eigenvalues: {obj.num_params()}-parameter MLP, one batch of {batch}, float64, {device} ==")
    ev = dense_eigvals(obj)[::-1]
    print(f"dense truth: top-5 {np.array2string(ev[:5], precision=6)}")
    print(f"{'k':>2} {'method':<34} {'HVPs':>5} {'time':>8} {'max rel.err':>11}")
    for k in (1, 5):
        truth = ev[:k]

        def err(vals):
            return float(np.max(np.abs(np.asarray(vals) - truth) / np.abs(truth)))

        py, t_py = timed(lambda: pyhessian_eigen(obj, k, seed=0, check=False, device=device), device)
        rows = [("PyHessian (maxIter=100, tol=1e-3)", py.hvps, t_py, err(py.eigenvalues))]
        for name, fn in (("Lanczos tol=1e-8", lambda op: lanczos(op, k, "top", tol=1e-8, seed=0)),
                         ("Lanczos tol=1e-3", lambda op: lanczos(op, k, "top", tol=1e-3, seed=0)),
                         ("eigsh tol=1e-8 (+k residual HVPs)", lambda op: eigsh(op, k, "top", tol=1e-8, seed=0))):
            op = HessianOperator(obj, device=device)
            op.matvec(torch.ones(op.n))  # build the graph outside the timing, as PyHessian does in its constructor
            op.hvps = 0
            r, t = timed(lambda: fn(op), device)
            rows.append((name, r.hvps, t, err(r.eigenvalues)))
        for name, h, t, e in rows:
            print(f"{k:>2} {name:<34} {h:>5} {t:>7.3f}s {e:>11.1e}")
        ph, ours = rows[0], rows[1]
        print(f"   ratios PyHessian / Lanczos(1e-8): HVPs {ph[1] / ours[1]:.2f}x, time {ph[2] / ours[2]:.2f}x, "
              f"error {ph[3]:.1e} vs {ours[3]:.1e}; at 1e-3: HVPs {ph[1] / rows[2][1]:.2f}x")

    # the trace: PyHessian's default stopping rule vs Hutch++ with a standard error
    from landscape.pyhessian_backend import _Session
    exact = float(ev.sum())
    s = _Session(obj, None, torch.float64, False, device)
    with s.context(0):
        samples = s.h.trace()  # its defaults: maxIter=100, tol=1e-3 relative to the signed running mean
    op = HessianOperator(obj, device=device)
    pp = hutchpp(op, 99, seed=0)
    print(f"trace: exact {exact:.5g}; PyHessian default {np.mean(samples):.5g} after {len(samples)} probes "
          f"({abs(np.mean(samples) - exact) / abs(exact):.1%} off, no error bar); Hutch++ 99 probes "
          f"{pp.estimate:.5g} ± {pp.stderr:.2g} ({abs(pp.estimate - exact) / abs(exact):.1%} off)")


def best_time(fn, device, repeats: int) -> float:
    """The fastest of `repeats` runs (robust to other processes sharing the CPU)."""
    times = []
    for _ in range(repeats):
        _, t = timed(fn, device)
        times.append(t)
    return min(times)


def batched_products(name: str, obj: Objective, device, sizes=(8, 16, 32), repeats: int = 5) -> None:
    print(f"\n== batched HVPs: {name} ({obj.num_params()} parameters, float64, {device}) ==")
    ops = {m: HessianOperator(obj, device=device, batched=m) for m in ("grads_batched", "fwd_rev", "loop", "auto")}
    g = torch.Generator().manual_seed(0)
    V0 = torch.randn(ops["loop"].n, max(sizes), generator=g, dtype=torch.float64).to(device)
    for op in ops.values():
        op.matmat(V0[:, :2])  # warm up and build the cached graph
    ops["auto"].matmat(V0[:, :2])  # 'auto' has timed both batched methods and keeps the faster
    single = best_time(lambda: ops["loop"].matvec(V0[:, 0]), device, repeats)
    print(f"one HVP (cached graph): {single * 1e3:.1f} ms")
    print(f"{'vectors':>7} | {'loop':>9} | {'grads_batched':>13} {'speedup':>7} | {'fwd_rev (vmap)':>14} {'speedup':>7}")
    for b in sizes:
        V = V0[:, :b]
        t_loop = best_time(lambda: [ops["loop"].matvec(V[:, j]) for j in range(b)], device, repeats)
        t_gb = best_time(lambda: ops["grads_batched"].matmat(V), device, repeats)
        try:
            t_fr = best_time(lambda: ops["fwd_rev"].matmat(V), device, repeats)
            fr = f"{t_fr * 1e3:>12.1f}ms {t_loop / t_fr:>6.2f}x" if ops["fwd_rev"].batched == "fwd_rev" \
                else f"{'(unsupported)':>14} {'':>7}"
        except Exception:
            fr = f"{'(failed)':>14} {'':>7}"
        print(f"{b:>7} | {t_loop * 1e3:>7.1f}ms | {t_gb * 1e3:>11.1f}ms {t_loop / t_gb:>6.2f}x | {fr}")
    pick = ops["auto"]._method(2)
    print(f"'auto' picked: {pick}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smaller models (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available; use --device cpu")
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    compare_pyhessian(device, hidden=16 if a.quick else 48, batch=256)
    batched_products("MLP", mlp_objective(device, 16 if a.quick else 48, 256), device)
    gpt = gpt_objective(device, n_embd=16 if a.quick else 32, block=16 if a.quick else 32, batch=8)
    batched_products("tiny GPT", gpt, device, sizes=(8, 16) if a.quick else (8, 16, 32))


if __name__ == "__main__":
    main()
