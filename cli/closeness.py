"""`landscape closeness`: per-domain minima near each checkpoint, their distances, spread and Theorem 3.1 bound."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from .sources import source_options  # [ownmodel]
from .app import command
from .common import (analyse_each, check_output_file, check_range, comparison_table, console, figure_formats,
                     merge_alias, parse_names, tables)


def _g(v, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


STOP_WHY = {"budget": "its --max-evals budget was spent", "stalled": "no step lowered the loss further",
            "steps": "--max-steps was reached"}


def stop_note(r, d) -> str:
    """Why domain d's descent has no minimum, in words: how it stopped and how far it walked."""
    stop = (r.stop or {}).get(d, "budget")
    walked = r.reached.get(d)
    moved = "no step was accepted" if not walked else f"walked {_g(walked)}"
    return f"not converged: {STOP_WHY.get(stop, stop)}; {moved}"


def closeness_table(results: list, labels: list[str]) -> Table:
    """One table, one column per checkpoint: per-domain distances, losses, barriers, then the summaries."""
    t, row = comparison_table("closeness of per-domain minima", results, labels)

    row("train loss at theta", lambda r: _g(r.train_loss, ".4f"))
    row("||theta||", lambda r: _g(r.theta_norm))
    doms = list(dict.fromkeys(d for r in results for d in r.domains))
    for d in doms:
        def has(r, d=d):
            return d in r.domains

        def dist(r, d=d):
            if not has(r):
                return "-"
            if not r.converged_by_domain[d]:  # how far it walked is not the distance to a minimum
                return f"[yellow]n/a ({stop_note(r, d)})[/yellow]"
            rel = r.distance[d]["relative"]
            return _g(r.distance[d]["raw"]) + (f" ({100 * rel:.2f}%)" if rel is not None else "")
        row(f"[bold]{d}[/bold] ||theta - theta*||", dist)
        def losses(r, d=d):
            if not has(r):
                return "-"
            if r.converged_by_domain[d]:
                return f"{r.loss_start[d]:.4g} -> {r.loss_min[d]:.4g}"
            if not r.reached.get(d):  # nothing moved: the start is all there is
                return f"{r.loss_start[d]:.4g} [yellow](no step taken: no minimum)[/yellow]"
            return f"{r.loss_start[d]:.4g} -> {r.loss_min[d]:.4g} [yellow](where it stopped, not a minimum)[/yellow]"
        row(f"  {d} loss start -> min", losses)
        row(f"  {d} barrier", lambda r, d=d: _g(r.barrier[d], ".3g") if has(r) else "-")
        row(f"  {d} curvature along", lambda r, d=d: _g(r.curvature_along.get(d)) if has(r) else "-")
        row(f"  {d} converged (evals)", lambda r, d=d: (("yes" if r.converged_by_domain[d] else
                                                         f"[yellow]no: {(r.stop or {}).get(d, 'budget')}[/yellow]")
                                                        + f" ({(r.evals or {}).get(d, r.steps[d])})") if has(r) else "-")

    def pair_mean(r):
        vals = [r.pairwise[i][j] for i in range(len(r.domains)) for j in range(i + 1, len(r.domains))] \
            if r.pairwise else []
        if not vals or any(v is None for v in vals):
            return "n/a (a descent did not converge)" if vals else "n/a"
        return _g(sum(vals) / len(vals))
    unconv = "n/a (a descent did not converge)"
    row("mean pairwise ||theta_i* - theta_j*||", pair_mean, style="bold")
    row("spread sigma^2", lambda r: unconv if r.spread is None else _g(r.spread), style="bold")
    row("mean sq distance (measured)", lambda r: unconv if r.mean_sq_distance is None else _g(r.mean_sq_distance),
        style="bold")
    def applicable(r):
        a = r.bound.get("applicable")
        rel = r.bound.get("relative_stationarity")
        what = "" if rel is None else f" (||mean g|| / mean ||g_k|| = {rel:.2g})"
        return ("yes" if a else "[yellow]no: not a stationary point[/yellow]" if a is not None else "n/a") + what

    def bound(r):
        b = r.bound
        if b.get("value") is not None:
            return _g(b["value"])
        if b.get("applicable") is False:
            return "not applicable" + (f" (formula gives {_g(b['evaluated'])})" if b.get("evaluated") is not None
                                       else "")
        return f"n/a ({b.get('note', '')})"
    row("Thm 3.1 applicable (||mean g|| <= 0.05 mean ||g_k||)", applicable, style="bold")
    row("Theorem 3.1 bound", bound, style="bold")
    row("bound holds", lambda r: {True: "yes", False: "[red]no[/red]", None: "n/a"}[r.bound.get("holds")])
    row("stationarity ||mean_k g_k||", lambda r: _g(r.bound.get("stationarity")))
    return t


@command("closeness")
@source_options  # [ownmodel]
def closeness_cmd(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoint directories (a run directory means its latest)."),
    optimizer: str = typer.Option("newton-cg", help="Descent: newton-cg (trust-region Newton-CG on exact HVPs, "
                                                     "default), lbfgs, adamw (full-batch Adam, no weight decay) "
                                                     "or sgd."),
    max_evals: Optional[int] = typer.Option(None, help="Budget per domain in gradient/HVP/loss evaluations "
                                                       "(default: newton-cg 5000, lbfgs 2000, adamw/sgd 300)."),
    rtol: Optional[float] = typer.Option(None, help="Converged when ||grad|| <= max(rtol * ||grad at the checkpoint||, "
                                                    "atol) (default 1e-8; 1e-6 with the text suite's proximal "
                                                    "default)."),
    atol: float = typer.Option(1e-12, help="Absolute floor of the gradient-norm test."),
    steps: Optional[int] = typer.Option(None, "--max-steps", help="Optional cap on iterations (adamw/sgd: steps) "
                                                                  "per domain."),
    old_steps: Optional[int] = typer.Option(None, "--steps", hidden=True),  # the old spelling of --max-steps
    lr: Optional[float] = typer.Option(None, help="Learning rate of lbfgs (1), adamw (1e-3) or sgd (1e-2)."),
    domains: Optional[str] = typer.Option(None, help="Domains to descend on: 'train' (the default: the trained "
                                                     "domains), 'each' (OOD included) or comma-separated names."),
    seed: int = typer.Option(0, help="Seed recorded with the result; in train mode it fixes each batch's dropout "
                                     "masks (the descent itself is deterministic)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    train_mode: bool = typer.Option(False, help="Measure the train-mode loss (dropout with masks fixed per batch "
                                                "by --seed, BatchNorm batch statistics) in every descent, loss, "
                                                "barrier, gradient and curvature; default eval mode."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all results as JSON to this file ('-': stdout)."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write all results as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    plot: Optional[str] = typer.Option(None, help="Write the closeness figure (PNG, SVG or PDF) to this file."),
    keep_minima: bool = typer.Option(False, help="Store each theta_k* in the JSON (large for big models)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
    prox_mu: Optional[float] = typer.Option(None, help="Add mu/2 ||theta - theta_ckpt||^2 to every domain loss "
                                                       "(a finite minimum where the loss has none). Default: 0, "
                                                       "except on the byte-level text suite without --params: 1 "
                                                       "over the last MLP projection (as the demo; said on stderr)."),
):
    """Descend on each domain from the checkpoint to its nearest minimum (Newton-CG until the gradient norm falls
    by rtol); report distances, spread, cross-losses and the Thm 3.1 bound (n/a where a descent did not converge)."""
    from landscape.closeness import closeness, optimizer_name
    from nexus_opt.errors import UserError

    optimizer = optimizer_name(optimizer)  # adamw, as `train --optimizer adamw` ('adam' still accepted)
    steps = merge_alias(steps, old_steps, "steps", "--max-steps", "--steps")
    if lr is not None and not (0 < lr < float("inf")):
        raise UserError(f"--lr must be a positive finite number, got {lr}")
    if rtol is not None:
        check_range(rtol, "--rtol", 0.0, 0.5, "a fraction of the gradient norm at the checkpoint")
    if prox_mu is not None:
        check_range(prox_mu, "--prox-mu", 0.0, 1e6, "the weight of the proximal term")
    check_range(atol, "--atol", 0.0, 1e3, "an absolute gradient norm; larger would call the start converged")
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    check_output_file(plot, "--plot", figure_formats() if plot else None)
    doms = parse_names(domains, "--domains")
    def run(obj, bar):
        from landscape.closeness import suggest_objective

        mu, params, rt, budget = (prox_mu or 0.0), None, (1e-8 if rtol is None else rtol), max_evals
        sug = suggest_objective(obj) if prox_mu is None else None
        if sug:
            mu, params = sug["prox_mu"], sug["params"]
            rt = sug["rtol"] if rtol is None else rtol
            budget = sug["max_evals"] if max_evals is None else max_evals
            console.print(f"closeness: {sug['reason']}, so the default descends the proximal objective L_k + "
                          f"{mu:g}/2 ||theta - theta_ckpt||^2 over the parameters '{params}' to rtol {rt:g} within "
                          f"{budget} evaluations (as the demo does); --prox-mu 0 for the plain loss, --params to "
                          "choose the parameters", highlight=False, soft_wrap=True)
        return closeness(obj, steps=steps, lr=lr, optimizer=optimizer, domains=doms, seed=seed,
                         keep_minima=keep_minima, progress=bar, max_evals=budget, rtol=rt, atol=atol,
                         train_mode=train_mode, params=params, prox_mu=mu)

    results, labels, steps_at = analyse_each(checkpoints, run, device, trust_remote_code)
    tables(json_out, csv_out).print(closeness_table(results, labels))
    from .export import emit

    emit("closeness", [(str(p), s, r.to_dict()) for p, s, r in zip(checkpoints, steps_at, results)], json_out, csv_out)
    if plot:
        from landscape.render.geometry import closeness_figure
        closeness_figure(results, labels, plot)
        console.print(f"wrote {plot}")
