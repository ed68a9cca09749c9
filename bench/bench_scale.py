"""Benchmark at the scale users bring: the project's GPT (vocab 256, block 64, one eval batch of 8 per domain) at
about 1M, 10M, 30M and 85M parameters (and a randomly initialised Hugging Face GPT-2 small in its released config,
vocab 50257 and 1024 positions: 124M parameters, where transformers is importable and --sizes names it), landscape
against PyHessian in the same process, per row:

  top-1 eigenvalue at tol 1e-4: products, seconds, peak memory (resident, above the row's start), and the
      relative difference to a float64 reference (landscape, tol 1e-6) where one is computed (--reference);
      with a reference, PyHessian is also run at tighter tolerances (1e-5, 1e-6, 1e-7) until its value is as
      close to the reference as landscape's (the same accuracy);
  trace: landscape's adaptive Hutchinson to 5% (or its probe budget) against PyHessian's Hutchinson with the
      same number of probes, each with its standard error;
  gradient cosines of the 3 trained domains: landscape's gradsim (no bootstrap) against a plain loop
      (autograd per domain, cosines of the flat gradients), the baseline a user would write, with its Gram
      in float32 and (the same accuracy as landscape's) in float64, each with its largest difference (these
      short blocks: the least time of 3 runs, the first run's memory).

    python bench/bench_scale.py [--quick] [--sizes 1m,10m,30m,85m,gpt2] [--json out.json] [--reference]

--quick: the smallest two (1M, 10M). Speed and memory are ratios within a row (same process, same load);
the box's load is printed with the table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape import Objective, flatness, gradient_similarity  # noqa: E402
from landscape.hvp import HessianOperator  # noqa: E402
from landscape.pyhessian_backend import pyhessian_eigen, pyhessian_trace  # noqa: E402
from landscape.trace import estimate_trace  # noqa: E402
from nexus_opt.models import GPT  # noqa: E402
from nexus_opt.suites import make_suite  # noqa: E402
from nexus_opt.suites.text import lm_loss  # noqa: E402

SIZES = {"1m": (4, 128, 4), "10m": (6, 384, 6), "30m": (10, 512, 8), "85m": (12, 768, 12)}  # layers, width, heads


def rss() -> float:
    with open("/proc/self/status") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class Peak:
    """Peak resident memory above the start of the block (freed heap trimmed first), sampled every 20 ms."""

    def __enter__(self):
        import ctypes
        import gc

        gc.collect()
        try:  # hand freed heap back to the OS, so each block starts from what it holds (not what it inherits)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = rss()
        self.peak = self.base
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.02):
                self.peak = max(self.peak, rss())

        self.t = threading.Thread(target=sample, daemon=True)
        self.t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, rss())
        self.gib = (self.peak - self.base) / 2 ** 30


def objective(size: str) -> Objective:
    s = make_suite("text", seed=0, options={"block_size": 64, "eval_batches": 1, "eval_batch_size": 8})
    torch.manual_seed(0)
    if size == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small as released: vocab 50257, 1024 positions, 124M

        def loss(m, b):
            tok = b["tokens"]
            return m(tok[:, :-1], labels=tok[:, :-1]).loss  # HF shifts the labels itself
        model.config.use_cache = False
        if hasattr(model.config, "_attn_implementation"):
            model.config._attn_implementation = "eager"  # double backward needs the math path
    else:
        L, d, h = SIZES[size]
        model = GPT(vocab_size=256, block_size=64, n_layer=L, n_head=h, n_embd=d)
        loss = lm_loss
    model.eval()
    doms = {d: s.eval_batches(d) for d in s.train_domains}
    return Objective(model, doms, loss)


def plain_cosines(obj: Objective, float64: bool = False) -> list:
    """The user's baseline: each domain's flat gradient by autograd, then their cosines (`float64`: the Gram in
    float64, which the float32 one needs for the same accuracy: summed in float32 over 10M entries it is off
    by ~1e-3)."""
    params = [p for p in obj.model.parameters() if p.requires_grad]
    gs = []
    for d, bs in obj.domains.items():
        loss = obj.loss_fn(obj.model, bs[0])
        gs.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(gs)
    if float64:
        G = G.double()
    n = G.norm(dim=1)
    return ((G @ G.T) / torch.outer(n, n)).tolist()


GRADSIM_REPEATS = 3


def best_of(fn, repeats: int = GRADSIM_REPEATS):
    """(result, Peak) of fn() run `repeats` times: the least seconds, the first run's memory."""
    best = None
    for _ in range(repeats):
        with Peak() as p:
            out = fn()
        if best is None:
            best, first = p, p.gib
        elif p.seconds < best.seconds:
            best = p
    best.gib = first
    return out, best


def warm(obj: Objective) -> None:
    """One gradient and one Hessian-vector product, untimed: the allocator pools and BLAS buffers that the
    first curvature work of a process creates are then not charged to whichever block comes first."""
    op = HessianOperator(obj, precision="float32", copy=False)
    op.matvec(torch.ones(op.n))
    op.release()


def row(size: str, reference: bool, probes_max: int, peers: bool = True) -> dict:
    obj = objective(size)
    n = obj.num_params()
    one = Objective(obj.model, {"code": obj.domains["code"]}, obj.loss_fn)
    out = {"size": size, "params": n}
    print(f"[{size}] {n:,} parameters", file=sys.stderr, flush=True)
    warm(one)

    with Peak() as p:
        r = flatness(one, k=1, which="top", tol=1e-4, trace=False)
    out["ours_top1"] = {"value": r.lambda_max, "products": r.hvps["total"], "seconds": p.seconds, "gib": p.gib,
                        "converged": r.converged, "precision": r.precision, "error": r.errors[0]}
    print(f"  landscape top-1 {r.lambda_max:.6g} in {r.hvps['total']} products, {p.seconds:.1f} s", file=sys.stderr)
    out["pyhessian_top1"] = None
    if peers:
        with Peak() as p:
            e = pyhessian_eigen(one, 1, seed=0, tol=1e-4, max_iter=100, dtype=torch.float32, check=False)
        out["pyhessian_top1"] = {"value": e.eigenvalues[0], "products": e.hvps, "seconds": p.seconds, "gib": p.gib}
        print(f"  pyhessian top-1 {e.eigenvalues[0]:.6g} in {e.hvps} products, {p.seconds:.1f} s", file=sys.stderr)
    if reference:
        with Peak() as p:
            ref = flatness(one, k=1, which="top", tol=1e-6, trace=False, precision="float64")
        out["reference"] = {"value": ref.lambda_max, "seconds": p.seconds}
        for key in ("ours_top1", "pyhessian_top1"):
            if out[key] is not None:
                out[key]["rel_diff"] = abs(out[key]["value"] - ref.lambda_max) / abs(ref.lambda_max)
        ours_err = out["ours_top1"]["rel_diff"]
        if peers and out["pyhessian_top1"]["rel_diff"] > ours_err:  # PyHessian run on until it is as accurate
            for tol in (1e-5, 1e-6, 1e-7):
                with Peak() as p:
                    e = pyhessian_eigen(one, 1, seed=0, tol=tol, max_iter=400, dtype=torch.float32, check=False)
                err = abs(e.eigenvalues[0] - ref.lambda_max) / abs(ref.lambda_max)
                out["pyhessian_same_accuracy"] = {"tol": tol, "value": e.eigenvalues[0], "products": e.hvps,
                                                  "seconds": p.seconds, "gib": p.gib, "rel_diff": err,
                                                  "reached": err <= ours_err}
                print(f"  pyhessian at tol {tol:g}: {e.eigenvalues[0]:.6g} (rel. diff {err:.2g}) in {e.hvps} "
                      f"products, {p.seconds:.1f} s", file=sys.stderr)
                if err <= ours_err:
                    break

    with Peak() as p:
        from landscape.precision import resolve
        op = HessianOperator(one, precision="auto", copy=resolve("auto", n, one.device) != one.dtype)
        tr = estimate_trace(op, "hutchinson", None, seed=0, target=0.05, max_probes=probes_max)
        op.release()
        del op
    out["ours_trace"] = {"value": tr.estimate, "stderr": tr.stderr, "products": tr.hvps, "seconds": p.seconds,
                         "gib": p.gib, "stop": tr.stop}
    print(f"  landscape trace {tr.estimate:.5g} +- {tr.stderr:.2g} ({tr.probes} probes, {tr.stop}), "
          f"{p.seconds:.1f} s", file=sys.stderr)
    out["pyhessian_trace"] = None
    if peers:
        with Peak() as p:
            pt = pyhessian_trace(one, probes=max(2, tr.probes), seed=0, dtype=torch.float32)
        out["pyhessian_trace"] = {"value": pt.estimate, "stderr": pt.stderr, "products": pt.hvps,
                                  "seconds": p.seconds, "gib": p.gib}
        print(f"  pyhessian trace {pt.estimate:.5g} +- {pt.stderr:.2g}, {p.seconds:.1f} s", file=sys.stderr)

    # the plain loop's question: the cosines (with their rounding error), no floors; these blocks take seconds
    # or less, so each is timed GRADSIM_REPEATS times (the least time, the first run's memory)
    gs, p = best_of(lambda: gradient_similarity(obj, resamples=0, per_layer=False, split_half=False))
    out["ours_gradsim"] = {"seconds": p.seconds, "gib": p.gib, "precision": gs.settings["dtype"],
                           "precision_error": gs.cosine_precision_error}
    with Peak() as p:  # and with the split-half ceilings (each single batch in chunks)
        gf = gradient_similarity(obj, resamples=0, per_layer=False)
    out["ours_gradsim_floors"] = {"seconds": p.seconds, "gib": p.gib}
    print(f"  landscape gradsim {out['ours_gradsim']['seconds']:.1f} s (with floors {p.seconds:.1f} s)",
          file=sys.stderr)
    out["plain_gradsim"] = None
    if peers:
        cos, p = best_of(lambda: plain_cosines(obj))
        out["plain_gradsim"] = {"seconds": p.seconds, "gib": p.gib}
        out["gradsim_max_diff"] = max(abs(a - b) for ra, rb in zip(gs.cosine, cos) for a, b in zip(ra, rb)
                                      if a is not None)
        cos64, p = best_of(lambda: plain_cosines(obj, float64=True))
        out["plain_gradsim_f64"] = {"seconds": p.seconds, "gib": p.gib}
        out["gradsim_max_diff_f64"] = max(abs(a - b) for ra, rb in zip(gs.cosine, cos64) for a, b in zip(ra, rb)
                                          if a is not None)
    return out


def table(rows: list, load: str) -> str:
    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}g}"

    def top(a):
        return "-" if a is None else (f"{f(a['value'], 6)} ({a['products']}, {a['seconds']:.1f} s, {a['gib']:.2f}, "
                                      f"{f(a.get('rel_diff'), 2)})")

    def trace(t):
        return "-" if t is None else (f"{t['value']:.5g} ± {t['stderr']:.2g} ({t['products']}, {t['seconds']:.1f} s, "
                                      f"{t['gib']:.2f})")

    def grad(g):
        return "-" if g is None else f"{g['seconds']:.1f} s, {g['gib']:.2f}"

    lines = [f"load: {load}", "",
             "| params | top-1 landscape (products, s, GiB, rel. diff) | top-1 PyHessian | PyHessian as accurate "
             "(tol) | trace landscape (± se, products, s, GiB) | trace PyHessian (same probes) | gradsim landscape "
             "(with floors) | plain loop (max diff) | plain loop, float64 Gram (max diff) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fl = r.get("ours_gradsim_floors")
        same = r.get("pyhessian_same_accuracy")
        same_s = "-" if same is None else f"{top(same)} (tol {same['tol']:g}{'' if same['reached'] else ', not reached'})"
        lines.append(f"| {r['params'] / 1e6:.1f}M | {top(r['ours_top1'])} {r['ours_top1']['precision']} | "
                     f"{top(r['pyhessian_top1'])} | {same_s} | {trace(r['ours_trace'])} | {trace(r['pyhessian_trace'])} | "
                     f"{grad(r['ours_gradsim'])} ({grad(fl)}) | {grad(r['plain_gradsim'])} "
                     f"({f(r.get('gradsim_max_diff'), 2)}) | {grad(r.get('plain_gradsim_f64'))} "
                     f"({f(r.get('gradsim_max_diff_f64'), 2)}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smallest two sizes (1M, 10M)")
    ap.add_argument("--sizes", default=None, help="comma-separated of 1m,10m,30m,85m,gpt2")
    ap.add_argument("--reference", action="store_true", help="a float64 tol-1e-6 reference top-1 per row")
    ap.add_argument("--trace-probes", type=int, default=60, help="landscape's most trace probes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-peers", action="store_true", help="landscape only (no PyHessian, no plain loop)")
    a = ap.parse_args()
    sizes = a.sizes.split(",") if a.sizes else (["1m", "10m"] if a.quick else ["1m", "10m", "30m", "85m"])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    importlib.import_module("torch.fx.experimental.symbolic_shapes")  # autograd's first use imports it (~1 s)
    rows = []
    for s in sizes:
        if s == "gpt2":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("transformers not importable: gpt2 row skipped", file=sys.stderr)
                continue
        rows.append(row(s, a.reference, a.trace_probes, peers=not a.no_peers))
        if a.json:  # each row as it completes
            Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    print(table(rows, load))
    if a.json:
        Path(a.json).write_text(json.dumps({"load": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
