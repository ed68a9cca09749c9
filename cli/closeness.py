"""`landscape closeness`: per-domain minima near each checkpoint, their distances, spread and Theorem 3.1 bound."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from .sources import source_options  # [ownmodel]
from .app import command
from .common import (analyse_each, check_output_file, comparison_table, console, figure_formats, out, parse_names,
                     write_results)


def _g(v, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def closeness_table(results: list, labels: list[str]) -> Table:
    """One table, one column per checkpoint: per-domain distances, losses, barriers, then the summaries."""
    t, row = comparison_table("closeness of per-domain minima", results, labels)

    row("train loss at theta", lambda r: _g(r.train_loss, ".4f"))
    row("||theta||", lambda r: _g(r.theta_norm))
    doms = list(dict.fromkeys(d for r in results for d in r.domains))
    for d in doms:
        def has(r, d=d):
            return d in r.domains
        row(f"[bold]{d}[/bold] ||theta - theta*||", lambda r, d=d: _g(r.distance[d]["raw"]) + (
            f" ({100 * r.distance[d]['relative']:.2f}%)" if r.distance[d]["relative"] is not None else "")
            if has(r) else "-")
        row(f"  {d} loss start -> min", lambda r, d=d: f"{r.loss_start[d]:.4g} -> {r.loss_min[d]:.4g}"
            if has(r) else "-")
        row(f"  {d} barrier", lambda r, d=d: _g(r.barrier[d], ".3g") if has(r) else "-")
        row(f"  {d} curvature along", lambda r, d=d: _g(r.curvature_along.get(d)) if has(r) else "-")
        row(f"  {d} converged (steps)", lambda r, d=d: (("yes" if r.converged[d] else "[yellow]no[/yellow]")
                                                       + f" ({r.steps[d]})") if has(r) else "-")
    row("mean pairwise ||theta_i* - theta_j*||", lambda r: _g(
        sum(r.pairwise[i][j] for i in range(len(r.domains)) for j in range(i + 1, len(r.domains)))
        / max(1, len(r.domains) * (len(r.domains) - 1) // 2)), style="bold")
    row("spread sigma^2", lambda r: _g(r.spread), style="bold")
    row("mean sq distance (measured)", lambda r: _g(r.mean_sq_distance), style="bold")
    row("Theorem 3.1 bound", lambda r: _g(r.bound.get("value")) if r.bound.get("value") is not None
        else f"n/a ({r.bound.get('note', '')})", style="bold")
    row("bound holds", lambda r: {True: "yes", False: "[red]no[/red]", None: "n/a"}[r.bound.get("holds")])
    row("stationarity ||mean_k g_k||", lambda r: _g(r.bound.get("stationarity")))
    return t


@command("closeness")
@source_options  # [ownmodel]
def closeness_cmd(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoint directories (a run directory means its latest)."),
    steps: int = typer.Option(300, help="Maximum descent steps per domain."),
    lr: Optional[float] = typer.Option(None, help="Descent learning rate (default: adam 1e-3, sgd 1e-2, lbfgs 1)."),
    optimizer: str = typer.Option("adam", help="Descent optimizer: adam, sgd or lbfgs (full batch)."),
    domains: Optional[str] = typer.Option(None, help="Comma-separated domains to descend on (default: trained)."),
    seed: int = typer.Option(0, help="Seed recorded with the result (the descent itself is deterministic)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all results to this JSON file."),
    plot: Optional[str] = typer.Option(None, help="Write the closeness figure (PNG, SVG or PDF) to this file."),
    keep_minima: bool = typer.Option(False, help="Store each theta_k* in the JSON (large for big models)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
):
    """Descend on each domain from the checkpoint; report distances, spread, cross-losses and the Thm 3.1 bound."""
    from landscape.closeness import OPTIMIZERS, closeness
    from nexus_opt.errors import UserError

    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}'; choose one of {sorted(OPTIMIZERS)}")
    check_output_file(json_out, "--json")
    check_output_file(plot, "--plot", figure_formats() if plot else None)
    doms = parse_names(domains, "--domains")
    results, labels = analyse_each(
        checkpoints, lambda obj, bar: closeness(obj, steps=steps, lr=lr, optimizer=optimizer, domains=doms,
                                                seed=seed, keep_minima=keep_minima, progress=bar),
        device, trust_remote_code)
    out.print(closeness_table(results, labels))
    if json_out:
        write_results("closeness", checkpoints, results, json_out)
    if plot:
        from landscape.render.geometry import closeness_figure
        closeness_figure(results, labels, plot)
        console.print(f"wrote {plot}")
