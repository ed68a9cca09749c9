"""`landscape connect A B`: loss along the linear path (and a trained Bezier curve) between two checkpoints, runs
or per-domain minima, with the barrier of each domain."""
from __future__ import annotations

from typing import Optional

import typer

from .app import command
from .common import check_output_file, check_range, comparison_table, console, figure_formats, label, \
    parse_names, progress_bar, tables
from .sources import source_options  # [ownmodel]


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def summary_table(r, title: str):
    """Per domain: the endpoints' losses, the linear barrier and (if trained) the Bezier barrier."""
    t, row = comparison_table(title, [r], ["value"])
    row("path", lambda r: f"{r.endpoints[0]} -> {r.endpoints[1]} (distance {r.distance:.4g})")
    row("BatchNorm", lambda r: "re-estimated per point" if r.settings.get("bn_reestimated") else
        ("first point's statistics" if r.settings.get("has_batchnorm") else "none"))
    for d in r.domains:
        row(f"{d} at ends", lambda r, d=d: f"{_fmt(r.linear[d][0])} / {_fmt(r.linear[d][-1])}")
        row(f"{d} linear barrier", lambda r, d=d: f"{_fmt(r.barrier.get(d))} at t={_fmt(r.barrier_t.get(d), 2)}")
        if r.bezier:
            row(f"{d} Bezier barrier", lambda r, d=d: _fmt(r.bezier_barrier.get(d)))
    return t


@command("connect")
@source_options  # [ownmodel]
def connect_cmd(
    a: str = typer.Argument(..., metavar="A", help="Start: a checkpoint or run directory, or min:DOMAIN (that domain's nearest "
                                      "minimum from --at)."),
    b: str = typer.Argument(..., metavar="B", help="End: a checkpoint or run directory, or min:DOMAIN."),
    at: Optional[str] = typer.Option(None, help="Checkpoint the min:DOMAIN ends descend from (default: the "
                                                "checkpoint among A and B)."),
    points: int = typer.Option(21, help="Points along each path (endpoints included)."),
    bezier: bool = typer.Option(False, help="Also train a quadratic Bezier curve between the ends (Garipov et al.)."),
    bezier_steps: int = typer.Option(200, help="Adam steps of the Bezier control point."),
    bn: Optional[bool] = typer.Option(None, "--bn/--no-bn", help="Re-estimate BatchNorm statistics at every point "
                                                                "(default: on for models with BatchNorm)."),
    seed: int = typer.Option(0, help="Seed of the Bezier training's t samples (and of dropout with --train-mode)."),
    domains: Optional[str] = typer.Option(None, help="Comma-separated domains (default: all, OOD included)."),
    train_mode: bool = typer.Option(False, help="Train-mode loss (dropout masks fixed by --seed); default eval mode."),
    descent_steps: int = typer.Option(300, help="Descent steps of a min:DOMAIN end."),
    batch: str = typer.Option("auto", help="auto (the measured faster), vmap or loop (without BatchNorm re-estimation)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the result as JSON to this file ('-': stdout)."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write the result as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    plot: Optional[str] = typer.Option(None, help="Write the loss-along-the-path figure (PNG, SVG or PDF) to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
):
    """Mode connectivity: loss along the linear path and an optional Bezier curve, barrier per domain."""
    from landscape.connect import connect
    from landscape.surface import BATCH_MODES
    from nexus_opt.errors import UserError

    from .export import checkpoint_step, emit
    from .sources import load_target as load  # [ownmodel]

    if batch not in BATCH_MODES:
        raise UserError(f"unknown batch mode '{batch}'; choose one of {list(BATCH_MODES)}")
    check_range(points, "--points", 3, 100_000, "points along the path")
    check_range(bezier_steps, "--bezier-steps", 1, 10 ** 6, "Adam steps of the control point")
    check_range(descent_steps, "--descent-steps", 1, 10 ** 6, "descent steps of a minimum")
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    check_output_file(plot, "--plot", figure_formats() if plot else None)
    is_min = [s.startswith("min:") for s in (a, b)]
    base = at or next((s for s, m in zip((a, b), is_min) if not m), None)
    if base is None:
        raise UserError("both ends are min:DOMAIN: name the checkpoint they descend from with --at")
    obj = load(base, device=device, trust_remote_code=trust_remote_code)

    def end(s):
        if s.startswith("min:"):
            return s
        return obj if s == base else load(s, device=device, trust_remote_code=trust_remote_code)

    with progress_bar() as bar:
        r = connect(obj, end(b), start=end(a), points=points, bezier=bezier, bezier_steps=bezier_steps, bn=bn,
                    seed=seed, domains=parse_names(domains, "--domains"), train_mode=train_mode, batch=batch,
                    descend_steps=descent_steps, progress=bar)
    names = [s if s.startswith("min:") else label(s) for s in (a, b)]
    r.endpoints = names
    tables(json_out, csv_out).print(summary_table(r, f"connectivity {names[0]} -> {names[1]}"))
    emit("connect", [(f"{a} -> {b}", checkpoint_step(obj), r.to_dict())], json_out, csv_out)
    if plot:
        from landscape.render.views import connect_figure
        connect_figure([r], [f"{names[0]} -> {names[1]}"], plot)
        console.print(f"wrote {plot}")
