"""`landscape sharpness`: worst-case and average-case loss increase in a rho-ball, per domain, checkpoints side by side."""
from __future__ import annotations

from typing import List, Optional

import typer

from .app import command
from .common import analyse_each, check_output_file, check_range, comparison_table, console, figure_formats, \
    parse_names, tables
from .sources import source_options  # [ownmodel]

MAX_ASCENT_STEPS = 100_000
MAX_PAIRS = 1_000_000


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def summary_table(results: list, labels: list[str]):
    """Per domain: loss, worst-case increase (marked when the ascent stopped on its budget), average +- SE."""
    t, row = comparison_table(f"sharpness (rho {results[0].rho:g}, {results[0].adaptive})", results, labels)
    for d in dict.fromkeys(d for r in results for d in r.domains):
        row(f"{d} loss", lambda r, d=d: _fmt(r[d].loss) if d in r.results else "-")
        row(f"{d} worst case", lambda r, d=d: "-" if d not in r.results else
            _fmt(r[d].worst) + ("" if r[d].worst_converged or r[d].worst is None else " (budget)"))
        row(f"{d} average case", lambda r, d=d: "-" if d not in r.results or r[d].average is None else
            f"{_fmt(r[d].average)} ±{_fmt(r[d].average_stderr, 2)}")
    return t


@command("sharpness")
@source_options  # [ownmodel]
def sharpness_cmd(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoint directories (a run directory means its latest)."),
    rho: float = typer.Option(0.05, help="Radius of the perturbation ball (in units of T: absolute, or relative "
                                         "to |theta| with --adaptive)."),
    adaptive: str = typer.Option("none", help="Ball scaling T: none (absolute), elementwise (|theta|) or filter "
                                              "(each output filter's norm): adaptive sharpness."),
    steps: int = typer.Option(20, help="Projected gradient-ascent steps of the worst case."),
    samples: int = typer.Option(50, help="Antithetic pairs of random perturbations of the average case."),
    worst: bool = typer.Option(True, help="Measure the worst case (--no-worst: skip it)."),
    average: bool = typer.Option(True, help="Measure the average case (--no-average: skip it)."),
    seed: int = typer.Option(0, help="Seed of the perturbations (and of dropout with --train-mode)."),
    domains: Optional[str] = typer.Option(None, help="Comma-separated domains, 'train' for the training loss "
                                                     "(default: every domain and the training loss)."),
    train_mode: bool = typer.Option(False, help="Train-mode loss (dropout masks fixed by --seed, BatchNorm batch "
                                                "statistics); default eval mode."),
    batch: str = typer.Option("auto", help="Average case: auto (the measured faster), vmap or loop."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all results as JSON to this file ('-': stdout)."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write all results as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    plot: Optional[str] = typer.Option(None, help="Write the bar figure (PNG, SVG or PDF) to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
):
    """Sharpness: worst-case loss increase in a rho-ball (projected ascent) and average case with a standard error."""
    from landscape.sharpness import ADAPTIVE, sharpness
    from landscape.surface import BATCH_MODES
    from nexus_opt.errors import UserError
    from nexus_opt.limits import check_float

    if adaptive not in ADAPTIVE:
        raise UserError(f"unknown --adaptive '{adaptive}'; choose one of {list(ADAPTIVE)}")
    if batch not in BATCH_MODES:
        raise UserError(f"unknown batch mode '{batch}'; choose one of {list(BATCH_MODES)}")
    check_float(rho, "--rho", 0.0, 1e6, lo_open=True, why="the radius of the perturbation ball")
    check_range(steps, "--steps", 1, MAX_ASCENT_STEPS, "ascent steps")
    check_range(samples, "--samples", 2, MAX_PAIRS, "antithetic pairs")
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    check_output_file(plot, "--plot", figure_formats() if plot else None)
    doms = parse_names(domains, "--domains")
    results, labels, steps_at = analyse_each(
        checkpoints, lambda obj, bar: sharpness(obj, domains=doms, rho=rho, adaptive=adaptive, steps=steps,
                                                samples=samples, worst=worst, average=average, seed=seed,
                                                train_mode=train_mode, batch=batch, progress=bar),
        device, trust_remote_code)
    tables(json_out, csv_out).print(summary_table(results, labels))
    from .export import emit

    emit("sharpness", [(str(p), s, r.to_dict()) for p, s, r in zip(checkpoints, steps_at, results)], json_out, csv_out)
    if plot:
        from landscape.render.views import sharpness_figure
        sharpness_figure(results, labels, plot)
        console.print(f"wrote {plot}")
