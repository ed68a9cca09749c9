"""The main job, the paper's controlled comparison: train AdamW, the first-order control (Nexus without the walk,
`nexus-parallel`) and Nexus on built-in suites over several seeds with the gradient-similarity tracker on,
compare them at equal training loss (saved where each run first crosses a common target), measure their
geometry, give paired statistics over seeds, and publish one self-contained HTML report (+ JSON, figures)."""
from __future__ import annotations

import dataclasses
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import nexus_opt
from nexus_opt.checkpoint import list_checkpoints, read_checkpoint
from nexus_opt.suites import make_suite
from nexus_opt.train import TrainConfig, resume, train

from ..alignment import alignment
from ..closeness import closeness, proximal
from ..flatness import flatness
from ..gradsim import gradient_similarity
from ..load import load
from ..objective import Objective
from ..render.style import METRICS
from ..surface import surface
from ..tracking import GradSimTracker
from .matching import MATCH_TOL, MATCH_WINDOW, match_runs
from .runs import eval_records, gradsim_records
from .stats import paired
from .toys import figure2, trajectory_toy

# arm -> trainer optimizer; the control is Nexus's first-order term alone (same K normalised gradients, no walk)
ARMS = {"adamw": "adamw", "control": "nexus-parallel", "nexus": "nexus"}
PAIRS = (("nexus", "adamw"), ("nexus", "control"), ("control", "adamw"))


@dataclasses.dataclass
class SuitePlan:
    """One suite of the demo: how to train it and how hard to analyse it."""

    suite: str
    train: dict                 # TrainConfig fields shared by every arm
    nexus: dict                 # extra TrainConfig fields for both Nexus arms (control and Nexus)
    adamw: dict                 # extra TrainConfig fields for AdamW
    gradsim_every: int = 10     # tracker interval (optimizer steps)
    gradsim_batches: int = 1    # evaluation batches per domain the tracker measures on
    analysis_batches: int = 2   # evaluation batches per domain used by curvature analyses
    flatness_k: int = 3
    flatness_tol: float = 1e-6  # relative accuracy of the top eigenvalues
    trace_probes: int = 30      # Hutch++ probes (the trace's standard error is reported)
    closeness: dict = dataclasses.field(default_factory=dict)  # extra closeness() keywords (max_evals, rtol)
    closeness_params: str | None = None  # parameter regex for closeness (None: every parameter)
    closeness_prox: float = 0.0  # mu of the proximal term mu/2 ||theta - theta_ckpt||^2 added to each domain loss
    surface_grid: int = 21


@dataclasses.dataclass
class DemoConfig:
    """The demo's settings: `preset(quick)` gives the defaults used by `landscape demo [--quick]`."""

    out: str = "demo"
    device: str = "auto"
    seeds: tuple = (0, 1, 2, 3, 4)
    plans: list = dataclasses.field(default_factory=list)
    quick: bool = False
    mechanism: dict = dataclasses.field(default_factory=dict)  # mechanism_toy() keywords
    mechanism_distances: tuple = (0.05, 0.1)  # further start distances of the toy (beside its own), fraction vs distance


def preset(quick: bool = False, out: str = "demo", device: str = "auto", seeds=None) -> DemoConfig:
    """Default demo settings; quick mode (about 70 s on 2 idle CPU cores) shrinks models, steps and grids."""
    text_model = {"n_embd": 32, "n_layer": 1, "n_head": 2}
    text_data = {"block_size": 32, "eval_batches": 2, "eval_batch_size": 8}
    text_cl = dict(closeness_params=r"blocks\.0\.mlp\.2\.", closeness_prox=1.0, closeness={"max_evals": 600, "rtol": 1e-6})
    if quick:
        text = SuitePlan("text", dict(suite_options=text_data, model_config=text_model, steps=40, batch_size=8,
                                      accum=4, warmup=5, eval_every=5, ckpt_every=5, lr=3e-3),
                         nexus={"inner_lr": 0.01}, adamw={}, gradsim_every=10, analysis_batches=1, flatness_k=2,
                         trace_probes=10, flatness_tol=1e-4, surface_grid=13, **text_cl)
        mix = SuitePlan("mix", dict(suite_options={"eval_batches": 2, "eval_batch_size": 32}, steps=60,
                                    batch_size=16, accum=3, warmup=5, eval_every=5, ckpt_every=5, lr=1e-2,
                                    weight_decay=0.0), nexus={"inner_lr": 0.02}, adamw={}, gradsim_every=10,
                        analysis_batches=1, flatness_k=2, trace_probes=10, flatness_tol=1e-4, surface_grid=21,
                        closeness={"max_evals": 2000})
        return DemoConfig(out, device, tuple(seeds or (0, 1)), [text, mix], quick=True,
                          mechanism={"n_orders": 2, "n_along": 4, "steps": 30}, mechanism_distances=(0.05,))
    text = SuitePlan("text", dict(suite_options=text_data, model_config=text_model, steps=80, batch_size=8, accum=4,
                                  warmup=8, eval_every=5, ckpt_every=5, lr=3e-3), nexus={"inner_lr": 0.01}, adamw={},
                     gradsim_every=16, analysis_batches=1, trace_probes=20, flatness_k=3, flatness_tol=1e-5,
                     surface_grid=25, **text_cl)
    mix = SuitePlan("mix", dict(suite_options={"eval_batches": 2, "eval_batch_size": 32}, steps=150, batch_size=16,
                                accum=3, warmup=10, eval_every=5, ckpt_every=5, lr=1e-2, weight_decay=0.0),
                    nexus={"inner_lr": 0.02}, adamw={}, gradsim_every=25, analysis_batches=2, flatness_k=3,
                    trace_probes=30, flatness_tol=1e-5, surface_grid=41, closeness={"max_evals": 3000})
    return DemoConfig(out, device, tuple(seeds or (0, 1, 2, 3, 4)), [text, mix])


def _subset(obj: Objective, n: int) -> Objective:
    """The same objective on the first n evaluation batches of each domain (cheaper curvature)."""
    return Objective(obj.model, {d: b[:n] for d, b in obj.domains.items()}, obj.loss_fn,
                     train_domains=obj.train_domains, weights=obj.weights, ood=obj.ood, meta=obj.meta)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Clock:
    """Per-stage wall and CPU seconds (summary['timings'])."""

    def __init__(self):
        self.stages: dict = {}

    def __call__(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), _cpu()

            def __exit__(self, *exc):
                s = clock.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
                s["wall_s"] += time.perf_counter() - self.w
                s["cpu_s"] += _cpu() - self.c

        return _Stage()


def _tracker(tc: TrainConfig, plan: SuitePlan):
    """The trainer hook measuring gradient similarity every plan.gradsim_every steps on the first
    plan.gradsim_batches evaluation batches of each domain (fixed for the whole run)."""
    suite = make_suite(tc.suite, seed=tc.seed, weights=tc.weights, options=tc.suite_options)
    obj = Objective(torch.nn.Identity(), {d: suite.eval_batches(d)[:plan.gradsim_batches] for d in suite.domains},
                    suite.loss_fn, train_domains=suite.train_domains, weights=suite.weights, ood=suite.ood_domains,
                    meta={"suite": suite.spec()})
    return GradSimTracker(obj, every=plan.gradsim_every, seed=tc.seed).hook()


def run_training(cfg: DemoConfig, plan: SuitePlan, arm: str, seed: int, log: Callable,
                 progress: Callable[[str], Callable] | None = None) -> Path:
    """Train (or finish, or reuse) one run of the demo, gradient-similarity tracker on; returns its directory."""
    out = Path(cfg.out) / "runs" / f"{plan.suite}-{arm}-s{seed}"
    tc = TrainConfig(suite=plan.suite, optimizer=ARMS[arm], seed=seed, device=cfg.device, out=str(out),
                     **{**plan.train, **(plan.adamw if arm == "adamw" else plan.nexus)})
    bar = progress(out.name) if progress else None
    if list_checkpoints(out):
        last = read_checkpoint(out)
        if last.step >= tc.steps:
            log(f"reuse {out} (step {last.step})")
            return out
        log(f"resume {out} from step {last.step}")
        resume(out, device=cfg.device, progress=bar, on_step_record=_tracker(tc, plan))
        return out
    log(f"train {out.name}: {tc.steps} steps x {tc.accum} micro-batches of {tc.batch_size}")
    train(tc, progress=bar, on_step_record=_tracker(tc, plan))
    return out


def _final(run: Path) -> tuple[str, float]:
    ck = list_checkpoints(run)[-1]
    return str(ck), float(read_checkpoint(ck).manifest["metrics"]["train_loss"])


def _analyse(path: str, plan: SuitePlan, device: str, seed: int, surf_minima: bool, log: Callable,
             task: Callable | None = None) -> dict:
    """Losses, gradient similarity, closeness and flatness of one checkpoint (JSON-ready)."""
    obj = load(path, device=device)
    small = _subset(obj, plan.analysis_batches)
    name = f"{Path(path).parent.name}/{Path(path).name}"
    t0 = time.time()
    res = {"path": path, "step": obj.meta["step"], "losses": obj.losses(), "ood": obj.ood}
    res["gradsim"] = gradient_similarity(obj, seed=seed, per_layer=False).to_dict()
    # the mechanism at this checkpoint, noise-free: the cosine's rate along Nexus's vs the control's expected step
    res["alignment"] = alignment(small, gammas=[float(plan.nexus.get("inner_lr", 0.01))],
                                 K=int(plan.train.get("accum", 4)), seed=seed, samples=64).to_dict()
    cobj = proximal(small, plan.closeness_prox).select(plan.closeness_params)
    # the minima (over the analysed parameters) span the surface plane through the domain minima, on every suite
    cl = closeness(cobj, seed=seed, keep_minima=surf_minima, **plan.closeness,
                   progress=task(f"closeness {name}") if task else None)
    res["closeness"] = cl.to_dict()
    res["flatness"] = flatness(small, k=plan.flatness_k, seed=seed, trace=True, density=False, which="top",
                               tol=plan.flatness_tol, trace_probes=plan.trace_probes,
                               progress=task(f"flatness {name}") if task else None).to_dict()
    res["seconds"] = time.time() - t0
    log(f"  analysed {name} in {res['seconds']:.1f}s (closeness converged: {cl.all_converged})")
    return res


def _metrics(a: dict) -> dict:
    """The scalar numbers compared across arms (one checkpoint's analysis); None where not measured/converged."""
    ood = a["ood"]
    cl, gs = a["closeness"], a["gradsim"]
    fl = a["flatness"]["results"]["train"]  # flatness of the training loss (the default domain)
    bound = (cl.get("bound") or {}).get("value")
    return {"train_loss": a["losses"]["train"],
            # per-domain losses; a single OOD domain's loss is the "ood_loss" row already (no duplicate rows)
            **{f"loss:{d}": v for d, v in a["losses"].items() if d != "train" and (d not in ood or len(ood) > 1)},
            "ood_loss": statistics.fmean(a["losses"][d] for d in ood) if ood else None,
            "mean_cosine": gs.get("mean_offdiag_cosine"), "conflict_rate": gs.get("conflict_rate"),
            "spread": cl.get("spread"), "mean_sq_distance": cl.get("mean_sq_distance"),
            "thm31_bound": bound,
            "alignment_rate": ((a.get("alignment") or {}).get("per_gamma") or [{}])[0].get("rate_cosine", {}).get(
                "difference"),
            "top_eigenvalue": (fl.get("eigenvalues") or [None])[0],
            "trace": fl.get("trace")}


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": values}


def _steps_to(recs: list[dict], target: float):
    return next((r["step"] for r in recs if r["train_loss"] <= target), None)


def run_suite(cfg: DemoConfig, plan: SuitePlan, clock: _Clock, log: Callable, progress=None, task=None) -> dict:
    """Train every arm on every seed, match at equal training loss, analyse, and pair the seeds."""
    out = Path(cfg.out)
    with clock(f"{plan.suite}: training"):
        runs = {arm: {s: run_training(cfg, plan, arm, s, log, progress) for s in cfg.seeds} for arm in ARMS}
    per_seed = []
    for s in cfg.seeds:
        finals = {arm: _final(runs[arm][s])[1] for arm in ARMS}
        ref = max(finals, key=finals.get)  # the arm with the highest final training loss sets the target
        target = finals[ref]
        with clock(f"{plan.suite}: matching"):
            matched = match_runs({arm: runs[arm][s] for arm in ARMS}, target, cfg.device, log)
        gaps = {f"{a}-{b}": abs(matched[a]["train_loss"] - matched[b]["train_loss"]) for a, b in PAIRS}
        flagged = sorted(k for k, g in gaps.items() if g > MATCH_TOL)
        log(f"{plan.suite} seed {s}: target {target:.4f} ({ref}); matched steps "
            + ", ".join(f"{a} {m['step']} ({m['train_loss']:.4f})" for a, m in matched.items())
            + (f"; FLAGGED {flagged}" if flagged else ""))
        recs = {arm: eval_records(runs[arm][s]) for arm in ARMS}
        speed = {arm: _steps_to(recs[arm], finals["adamw"]) for arm in ARMS}
        first = s == cfg.seeds[0]
        with clock(f"{plan.suite}: analysis"):
            an = {arm: _analyse(matched[arm]["path"], plan, cfg.device, s, first, log, task) for arm in ARMS}
        per_seed.append({"seed": s, "target": target, "reference": ref, "final_train_loss": finals,
                         "matched": {a: {**matched[a], "analysis": an[a]} for a in ARMS},
                         "gaps": gaps, "flagged": flagged, "steps_to_adamw_final": speed})
    metrics = {a: [_metrics(r["matched"][a]["analysis"]) for r in per_seed] for a in ARMS}
    agg = {a: {k: _stats([m[k] for m in ms]) for k in ms[0]} for a, ms in metrics.items()}
    seeds = [r["seed"] for r in per_seed]
    pairs = []
    for a, b in PAIRS:
        for k in metrics[a][0]:
            pairs.append(paired(k, a, b, seeds, [m[k] for m in metrics[a]], [m[k] for m in metrics[b]]).to_dict())
    speed = {a: [r["steps_to_adamw_final"][a] for r in per_seed] for a in ARMS}
    speed_pairs = [paired("steps to AdamW's final training loss", a, b, seeds, speed[a], speed[b]).to_dict()
                   for a, b in PAIRS]
    curves = {a: [eval_records(runs[a][s]) for s in cfg.seeds] for a in ARMS}
    cos_curves = {a: [gradsim_records(runs[a][s]) for s in cfg.seeds] for a in ARMS}
    converged = {f"{a}/s{r['seed']}": bool(r["matched"][a]["analysis"]["closeness"].get("converged"))
                 for r in per_seed for a in ARMS}
    surf = {}
    p0 = per_seed[0]
    with clock(f"{plan.suite}: surfaces"):
        for a in ARMS:
            c = p0["matched"][a]["analysis"]["closeness"]
            mins = c.pop("minima", None) or {}
            obj = _subset(load(p0["matched"][a]["path"], device=cfg.device), plan.analysis_batches)
            if mins and plan.closeness_params:  # the plane lives where the minima do: the analysed parameters
                obj = obj.select(plan.closeness_params)
            sres = surface(obj, plane="domains" if mins else "random", grid=plan.surface_grid, seed=cfg.seeds[0],
                           minima={d: torch.tensor(v, dtype=torch.float64) for d, v in mins.items()} or None,
                           descend_others=False,  # closeness's minima are marked; no descent on the OOD loss
                           progress=task(f"surface {plan.suite} {a}") if task else None)
            spath = out / f"surface-{plan.suite}-{a}.npz"
            sres.save(spath)
            surf[a] = str(spath)
    from .demo_views import researcher_views  # issue 21: trajectories, sharpness, connectivity

    with clock(f"{plan.suite}: trajectories, sharpness, connectivity"):
        views = researcher_views(cfg, plan, runs, per_seed, log, task)
    return {"per_seed": per_seed, "aggregate": agg, "paired": pairs, "speed": {"steps": speed, "paired": speed_pairs},
            "curves": curves, "cosine_curves": cos_curves, "closeness_converged": converged, "surfaces": surf,
            "views": views,
            "ood": p0["matched"]["adamw"]["analysis"]["ood"], "match_tol": MATCH_TOL, "match_window": MATCH_WINDOW,
            "closeness_objective": {"params": plan.closeness_params, "prox_mu": plan.closeness_prox,
                                    **plan.closeness}}


def run_demo(cfg: DemoConfig, log: Callable = print, progress: Callable[[str], Callable] | None = None,
             task: Callable[[str], Callable] | None = None) -> dict:
    """Everything `landscape demo` does, minus printing: returns the summary written to summary.json.

    `progress(name)` returns a callback for the trainer's events of run `name`; `task(name)` one for an
    analysis's `(done, total, what)` reports (progress bars in the CLI).
    """
    from .mechanism import mechanism_toy, start_distance_sweep, sweep_entry

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), _cpu()
    clock = _Clock()
    summary: dict = {"settings": {"quick": cfg.quick, "device": cfg.device, "seeds": list(cfg.seeds),
                                  "arms": dict(ARMS), "plans": [dataclasses.asdict(p) for p in cfg.plans],
                                  "mechanism": cfg.mechanism, "mechanism_distances": list(cfg.mechanism_distances),
                                  "match_tol": MATCH_TOL,
                                  "match_window": MATCH_WINDOW},
                     "versions": {"package": nexus_opt.__version__, "torch": torch.__version__,
                                  "python": platform.python_version(), "platform": platform.platform()},
                     "suites": {}}
    log("toys: Figure 2, the 2-D two-domain trajectories and the mechanism toy")
    with clock("toys"):
        summary["figure2"] = figure2().to_dict()
        summary["trajectory_toy"] = trajectory_toy().to_dict()
    with clock("mechanism toy"):
        mech = mechanism_toy(**cfg.mechanism)
        summary["mechanism"] = mech.to_dict()
        others = [d for d in cfg.mechanism_distances if d != mech.settings["start_distance"]]
        sweep = start_distance_sweep(others, mech.gammas, **{k: v for k, v in cfg.mechanism.items()
                                                             if k not in ("gammas", "offsets", "start_distance")})
        summary["mechanism_distance"] = sorted(sweep + [sweep_entry(mech)], key=lambda e: e["distance"])
    for plan in cfg.plans:
        summary["suites"][plan.suite] = run_suite(cfg, plan, clock, log, progress, task)
    from .demo_report import write_report

    with clock("report"):
        summary["seconds"] = time.time() - t0
        summary["report"] = str(write_report(summary, out))
    summary["seconds"] = time.time() - t0
    summary["cpu_seconds"] = _cpu() - c0
    summary["timings"] = clock.stages
    from nexus_opt.files import write_atomic

    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n", "--out")
    return summary


# the CLI's summary rows: the report's metrics (one label table, render.style)
METRIC_ROWS = [(k, label) for k, (label, _) in METRICS.items()]
