"""The researcher views in the demo (issue 21): the three arms' training paths from one initialisation over one
trajectory plane, their sharpness at the matched checkpoints with paired intervals over seeds, and the
AdamW-Nexus connectivity barrier; plus the report section that shows them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..connect import ConnectResult, connect
from ..load import load
from ..sharpness import SharpnessResult, sharpness
from ..surface import SurfaceResult, surface
from ..surface.trajectory import run_checkpoints
from .stats import paired

ARMS = ("adamw", "control", "nexus")
PAIRS = (("nexus", "adamw"), ("nexus", "control"), ("control", "adamw"))
SHARPNESS_METRICS = {"sharpness_worst": "worst-case sharpness (training loss, rho 0.05)",
                     "sharpness_average": "average-case sharpness (training loss, rho 0.05)"}


def _subset(obj, n: int):
    from .demo import _subset as subset
    return subset(obj, n)


def researcher_views(cfg, plan, runs: dict, per_seed: list, log: Callable, task: Callable | None = None) -> dict:
    """Trajectory plane (first seed: every arm's checkpoints, one common PCA plane with origin AdamW's final
    weights), sharpness of the training loss at every seed's matched checkpoints (paired over seeds) and the
    barrier of the linear path between the matched AdamW and Nexus checkpoints (every seed)."""
    out = Path(cfg.out)
    s0 = cfg.seeds[0]
    quick = cfg.quick
    base = _subset(load(_last(runs["adamw"][s0]), device=cfg.device), plan.analysis_batches)
    trajectories = {a: run_checkpoints(base, runs[a][s0], a) for a in ARMS}
    tr = surface(base, plane="trajectory", trajectories=trajectories, trajectory_basis="all",
                 grid=plan.surface_grid, seed=s0, progress=task(f"trajectory plane {plan.suite}") if task else None)
    tpath = out / f"trajectory-{plan.suite}.npz"
    tr.save(tpath)
    log(f"  {plan.suite}: trajectory plane of {sum(len(v) for v in trajectories.values())} checkpoints, explained "
        f"variance {', '.join(f'{100 * v:.1f}%' for v in tr.normalization['explained_variance'])}")
    sharp = {a: [] for a in ARMS}
    conn = []
    for r in per_seed:
        objs = {a: _subset(load(r["matched"][a]["path"], device=cfg.device), plan.analysis_batches) for a in ARMS}
        for a in ARMS:
            res = sharpness(objs[a], domains=["each", "train"], rho=0.05, steps=8 if quick else 20,
                            samples=8 if quick else 50, seed=r["seed"],
                            progress=task(f"sharpness {plan.suite} {a} s{r['seed']}") if task else None)
            sharp[a].append(res.to_dict())
        c = connect(objs["adamw"], objs["nexus"], points=11 if quick else 21, seed=r["seed"],
                    progress=task(f"connect {plan.suite} s{r['seed']}") if task else None)
        c.endpoints = ["adamw", "nexus"]
        conn.append({"seed": r["seed"], **c.to_dict()})
    seeds = [r["seed"] for r in per_seed]
    values = {a: {"sharpness_worst": [s["results"]["train"]["worst"] for s in sharp[a]],
                  "sharpness_average": [s["results"]["train"]["average"] for s in sharp[a]]} for a in ARMS}
    pairs = [paired(k, a, b, seeds, values[a][k], values[b][k]).to_dict() for a, b in PAIRS for k in SHARPNESS_METRICS]
    barriers = [c["barrier"]["train"] for c in conn]
    log(f"  {plan.suite}: AdamW-Nexus barrier (training loss) " + ", ".join(f"{b:.3g}" for b in barriers))
    return {"trajectory": str(tpath), "sharpness": sharp, "sharpness_values": values, "sharpness_paired": pairs,
            "connect": conn}


def _last(run) -> str:
    from nexus_opt.checkpoint import list_checkpoints
    return str(list_checkpoints(run)[-1])


def report_views(rep, fig, summary: dict) -> None:
    """The report's section of the researcher views (figures through `fig(figure, name, caption)`)."""
    from ..render.surface import overlay_figure
    from ..render.views import connect_figure, sharpness_figure

    suites = {k: s["views"] for k, s in summary["suites"].items() if s.get("views")}
    if not suites:
        return
    rep.section("views", "Trajectories, sharpness and connectivity",
                "The three arms' training paths from one initialisation (first seed) over one plane: an uncentred "
                "PCA of all their checkpoints relative to AdamW's final weights (explained variance on the axes; "
                "`landscape plot-surface RUN_A RUN_C RUN_N --plane trajectory`). Sharpness of the training loss at "
                "the matched checkpoints (`landscape sharpness CKPT...`: worst case in the absolute rho = 0.05 "
                "ball by projected ascent, average case under Gaussian perturbations with its standard error), "
                "paired over seeds. The barrier of the linear path from the matched AdamW checkpoint to the "
                "matched Nexus one (`landscape connect A B`): max_t L(t) - ((1-t) L(A) + t L(B)).")
    for suite, v in suites.items():
        tr = SurfaceResult.load(v["trajectory"])
        fig(overlay_figure(tr), f"trajectory-{suite}", f"{suite}: AdamW, control and Nexus paths (first seed) over "
            f"the low-loss regions on the common trajectory plane")
        labels = [f"{a} s{v['connect'][0]['seed']}" for a in ARMS]
        fig(sharpness_figure([SharpnessResult.from_dict(v["sharpness"][a][0]) for a in ARMS], labels),
            f"sharpness-{suite}", f"{suite}: sharpness per domain at the matched checkpoints (first seed)")
        rows = [[SHARPNESS_METRICS[p["metric"]], f"{p['arm']} - {p['baseline']}",
                 ", ".join("-" if d is None else f"{d:+.3g}" for d in p["diffs"]),
                 "n/a" if p["mean"] is None else f"{p['mean']:+.3g}",
                 "n/a" if p["ci_low"] is None else f"[{p['ci_low']:+.3g}, {p['ci_high']:+.3g}]", p["verdict"]]
                for p in v["sharpness_paired"]]
        rep.table(["metric", "pair", "per-seed differences", "mean", "95% CI", "interval"], rows,
                  caption=f"{suite}: sharpness, paired over seeds")
        conns = [ConnectResult.from_dict({k: c[k] for k in c if k != "seed"}) for c in v["connect"]]
        fig(connect_figure(conns[:1], [f"{suite}: AdamW -> Nexus (seed {v['connect'][0]['seed']})"]),
            f"connect-{suite}", f"{suite}: loss along the linear path between the matched AdamW and Nexus checkpoints")
        doms = conns[0].domains
        rep.table(["seed", *doms], [[c["seed"], *[f"{c['barrier'][d]:.3g}" if c["barrier"].get(d) is not None
                                                  else "n/a" for d in doms]] for c in v["connect"]],
                  caption=f"{suite}: AdamW-Nexus barrier per domain")
