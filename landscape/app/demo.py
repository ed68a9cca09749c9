"""The main job: train AdamW and Nexus on built-in suites over several seeds, compare them at matched
training loss, measure their geometry (flatness, gradient similarity, closeness, surfaces) and publish
one self-contained HTML report (+ JSON and figures)."""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import nexus_opt
from nexus_opt.checkpoint import list_checkpoints, read_checkpoint
from nexus_opt.train import TrainConfig, resume, train

from ..closeness import closeness
from ..flatness import flatness
from ..gradsim import gradient_similarity
from ..load import load
from ..objective import Objective
from ..render.style import METRICS
from ..surface import surface
from .runs import MatchedPair, eval_records, match_by_training_loss
from .toys import figure2, trajectory_toy

OPTS = ("adamw", "nexus")


@dataclasses.dataclass
class SuitePlan:
    """One suite of the demo: how to train it and how hard to analyse it."""

    suite: str
    train: dict                 # TrainConfig fields shared by both optimizers
    nexus: dict                 # extra TrainConfig fields for Nexus
    adamw: dict                 # extra TrainConfig fields for AdamW
    analysis_batches: int = 2   # evaluation batches per domain used by curvature analyses
    flatness_k: int = 3
    flatness_tol: float = 1e-6  # relative accuracy of the top eigenvalues
    trace_probes: int = 30      # Hutch++ probes (the trace's standard error is reported)
    closeness_steps: int = 100
    surface_grid: int = 21


@dataclasses.dataclass
class DemoConfig:
    """The demo's settings: `preset(quick)` gives the defaults used by `landscape demo [--quick]`."""

    out: str = "demo"
    device: str = "auto"
    seeds: tuple = (0, 1, 2)
    plans: list = dataclasses.field(default_factory=list)
    quick: bool = False


def preset(quick: bool = False, out: str = "demo", device: str = "auto", seeds=None) -> DemoConfig:
    """Default demo settings; quick mode (< 2 min on 2 CPU cores) shrinks models, steps and grids."""
    if quick:
        text = SuitePlan("text", dict(suite_options={"block_size": 32, "eval_batches": 2, "eval_batch_size": 8},
                                      model_config={"n_embd": 32, "n_layer": 1, "n_head": 2}, steps=40,
                                      batch_size=8, accum=4, warmup=5, eval_every=10, ckpt_every=10, lr=3e-3),
                         nexus={"inner_lr": 0.01}, adamw={}, analysis_batches=1, flatness_k=2,
                         closeness_steps=25, surface_grid=9)
        mix = SuitePlan("mix", dict(steps=60, batch_size=16, accum=3, warmup=5, eval_every=10, ckpt_every=10,
                                    lr=1e-2, weight_decay=0.0), nexus={"inner_lr": 0.02}, adamw={},
                        analysis_batches=2, flatness_k=3, closeness_steps=40, surface_grid=11)
        return DemoConfig(out, device, tuple(seeds or (0, 1)), [text, mix], quick=True)
    text = SuitePlan("text", dict(steps=250, batch_size=16, accum=4, warmup=20, eval_every=25, ckpt_every=25,
                                  lr=3e-3), nexus={"inner_lr": 0.01}, adamw={}, analysis_batches=1, trace_probes=30,
                     flatness_k=3, closeness_steps=60, surface_grid=15)
    mix = SuitePlan("mix", dict(steps=400, batch_size=32, accum=3, warmup=20, eval_every=20, ckpt_every=20,
                                lr=1e-2, weight_decay=0.0), nexus={"inner_lr": 0.02}, adamw={},
                    analysis_batches=4, flatness_k=5, closeness_steps=200, surface_grid=31, trace_probes=60)
    return DemoConfig(out, device, tuple(seeds or (0, 1, 2)), [text, mix])


def _subset(obj: Objective, n: int) -> Objective:
    """The same objective on the first n evaluation batches of each domain (cheaper curvature)."""
    return Objective(obj.model, {d: b[:n] for d, b in obj.domains.items()}, obj.loss_fn,
                     train_domains=obj.train_domains, weights=obj.weights, ood=obj.ood, meta=obj.meta)


def run_training(cfg: DemoConfig, plan: SuitePlan, opt: str, seed: int, log: Callable,
                 progress: Callable[[str], Callable] | None = None) -> Path:
    """Train (or finish, or reuse) one run of the demo; returns its run directory."""
    out = Path(cfg.out) / "runs" / f"{plan.suite}-{opt}-s{seed}"
    tc = TrainConfig(suite=plan.suite, optimizer=opt, seed=seed, device=cfg.device, out=str(out),
                     **{**plan.train, **getattr(plan, opt)})
    if list_checkpoints(out):
        last = read_checkpoint(out)
        if last.step >= tc.steps:
            log(f"reuse {out} (step {last.step})")
            return out
        log(f"resume {out} from step {last.step}")
        resume(out, device=cfg.device, progress=progress(out.name) if progress else None)
        return out
    log(f"train {out.name}: {tc.steps} steps x {tc.accum} micro-batches of {tc.batch_size}")
    train(tc, progress=progress(out.name) if progress else None)
    return out


def _analyse(path: str, plan: SuitePlan, device: str, seed: int, surf_minima: bool, log: Callable,
             task: Callable | None = None) -> dict:
    """Losses, gradient similarity, closeness and flatness of one checkpoint (JSON-ready)."""
    obj = load(path, device=device)
    small = _subset(obj, plan.analysis_batches)
    name = f"{Path(path).parent.name}/{Path(path).name}"
    t0 = time.time()
    res = {"path": path, "step": obj.meta["step"], "losses": obj.losses(), "ood": obj.ood}
    res["gradsim"] = gradient_similarity(obj, seed=seed, per_layer=False).to_dict()
    cl = closeness(small, steps=plan.closeness_steps, max_evals=30 * plan.closeness_steps, seed=seed,
                   keep_minima=surf_minima,
                   progress=task(f"closeness {name}") if task else None)
    res["closeness"] = cl.to_dict()
    res["flatness"] = flatness(small, k=plan.flatness_k, seed=seed, trace=True, density=False, which="top",
                               tol=plan.flatness_tol, trace_probes=plan.trace_probes,
                               progress=task(f"flatness {name}") if task else None).to_dict()
    res["seconds"] = time.time() - t0
    log(f"  analysed {Path(path).parent.name}/{Path(path).name} in {res['seconds']:.1f}s")
    return res


def _metrics(a: dict) -> dict:
    """The scalar numbers compared across optimizers (one checkpoint's analysis)."""
    ood = a["ood"]
    cl, fl, gs = a["closeness"], a["flatness"], a["gradsim"]
    bound = (cl.get("bound") or {}).get("value")
    return {"train_loss": a["losses"]["train"],
            **{f"loss:{d}": v for d, v in a["losses"].items() if d != "train"},
            "ood_loss": statistics.fmean(a["losses"][d] for d in ood) if ood else None,
            "mean_cosine": gs.get("mean_offdiag_cosine"), "conflict_rate": gs.get("conflict_rate"),
            "spread": cl.get("spread"), "mean_sq_distance": cl.get("mean_sq_distance"),
            "thm31_bound": bound, "top_eigenvalue": (fl.get("eigenvalues") or [None])[0],
            "trace": fl.get("trace")}


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": values}


def run_demo(cfg: DemoConfig, log: Callable = print, progress: Callable[[str], Callable] | None = None,
             task: Callable[[str], Callable] | None = None) -> dict:
    """Everything `landscape demo` does, minus printing: returns the summary written to summary.json.

    `progress(name)` returns a callback for the trainer's events of run `name`; `task(name)` one for an
    analysis's `(done, total, what)` reports (progress bars in the CLI).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {"settings": {"quick": cfg.quick, "device": cfg.device, "seeds": list(cfg.seeds),
                                  "plans": [dataclasses.asdict(p) for p in cfg.plans]},
                     "versions": {"package": nexus_opt.__version__, "torch": torch.__version__,
                                  "python": platform.python_version(), "platform": platform.platform()},
                     "suites": {}}
    log("toys: Figure 2 and the 2-D two-domain trajectories")
    summary["figure2"] = figure2().to_dict()
    summary["trajectory_toy"] = trajectory_toy().to_dict()
    for plan in cfg.plans:
        runs = {opt: {s: run_training(cfg, plan, opt, s, log, progress) for s in cfg.seeds} for opt in OPTS}
        per_seed = []
        for s in cfg.seeds:
            pair: MatchedPair = match_by_training_loss(runs["adamw"][s], runs["nexus"][s])
            log(f"{plan.suite} seed {s}: matched adamw step {pair.a_step} ({pair.a_train_loss:.4f}) with nexus "
                f"step {pair.b_step} ({pair.b_train_loss:.4f})")
            first = s == cfg.seeds[0]
            matched = {"adamw": _analyse(pair.a, plan, cfg.device, s, first, log, task),
                       "nexus": _analyse(pair.b, plan, cfg.device, s, first, log, task)}
            final = {"adamw": load(pair.final_a, device=cfg.device).losses(),
                     "nexus": load(pair.final_b, device=cfg.device).losses()}
            per_seed.append({"seed": s, "pair": dataclasses.asdict(pair), "matched": matched, "final": final})
        agg = {}
        for opt in OPTS:
            ms = [_metrics(r["matched"][opt]) for r in per_seed]
            agg[opt] = {k: _stats([m[k] for m in ms]) for k in ms[0]}
            fs = [r["final"][opt] for r in per_seed]
            agg[opt]["final_train_loss"] = _stats([f["train"] for f in fs])
        curves = {opt: [eval_records(runs[opt][s]) for s in cfg.seeds] for opt in OPTS}
        surf = {}
        p0 = per_seed[0]
        for opt, path in (("adamw", p0["pair"]["a"]), ("nexus", p0["pair"]["b"])):
            obj = _subset(load(path, device=cfg.device), plan.analysis_batches)
            mins = p0["matched"][opt]["closeness"].get("minima") or {}
            sres = surface(obj, plane="domains", grid=plan.surface_grid, seed=cfg.seeds[0],
                           minima={d: torch.tensor(v, dtype=torch.float64) for d, v in mins.items()},
                           progress=task(f"surface {plan.suite} {opt}") if task else None)
            spath = out / f"surface-{plan.suite}-{opt}.npz"
            sres.save(spath)
            surf[opt] = str(spath)
            p0["matched"][opt]["closeness"].pop("minima", None)  # used; too bulky to keep
        summary["suites"][plan.suite] = {"per_seed": per_seed, "aggregate": agg, "curves": curves,
                                         "surfaces": surf, "ood": p0["matched"]["adamw"]["ood"]}
    summary["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    from .demo_report import write_report

    summary["report"] = str(write_report(summary, out))
    return summary


# the CLI's summary rows: the report's metrics (one label table, render.style) and the final training loss
METRIC_ROWS = [(k, label) for k, (label, _) in METRICS.items()] + [("final_train_loss", "final training loss")]
