"""`landscape gradsim`: cosine matrix of per-domain gradients for one or more checkpoints, side by side."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.columns import Columns
from rich.table import Table

from .sources import source_options  # [ownmodel]
from .app import command
from .common import (MAX_RESAMPLES, analyse_each, check_range, check_output_file, comparison_table, console,
                     figure_formats, parse_names, tables)


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ceiling(v, digits: int = 3, word: str = "ceiling ") -> str:
    """A split-half self-cosine: the ceiling of a domain's cosines at its gradient noise; flagged when so low that
    the domain's gradient is noise."""
    from landscape.render.style import LOW_SELF_COSINE

    if v is not None and v < LOW_SELF_COSINE:
        return f"[yellow]{word}{_fmt(v, digits)} (noise)[/yellow]"
    return f"[dim]{word}{_fmt(v, digits)}[/dim]" if word else _fmt(v, digits)


def cosine_table(r, title: str) -> Table:
    """The cosine matrix of one checkpoint: value +- stderr; the diagonal shows each domain's split-half
    self-cosine, the ceiling a cosine with it can reach at its gradient noise ('noise' below 0.1)."""
    t = Table(title=title, title_style="bold")
    t.add_column("")
    for d in r.domains:
        t.add_column(d + (" (OOD)" if d in r.ood else ""), justify="right")
    for i, a in enumerate(r.domains):
        cells = []
        for j, _ in enumerate(r.domains):
            if i == j:
                cells.append(_ceiling(r.split_half.get(a), 2))
                continue
            v = r.cosine[i][j]
            se = r.cosine_stderr[i][j] if r.cosine_stderr else None
            txt = _fmt(v) + (f" ±{se:.3f}" if se is not None else "")
            cells.append(f"[red]{txt}[/red]" if v is not None and v < 0 else txt)
        t.add_row(a, *cells)
    return t


def summary_table(results: list, labels: list[str]) -> Table:
    """Summary metrics, one column per checkpoint."""
    t, row = comparison_table("gradient similarity summary", results, labels)

    row("train loss", lambda r: _fmt(r.loss.get("train"), 4))
    row("mean off-diagonal cosine", lambda r: _fmt(r.mean_offdiag_cosine)
        + (f" ±{r.mean_offdiag_stderr:.3f}" if r.mean_offdiag_stderr is not None else ""))
    row("conflict rate", lambda r: "n/a" if r.conflict_rate is None else f"{100 * r.conflict_rate:.0f}%")
    row("summary pairs over", lambda r: ", ".join(r.summary_domains))
    for d in dict.fromkeys(d for r in results for d in r.domains):
        row(f"||g|| {d}", lambda r, d=d: "n/a" if d not in r.norms else f"{r.norms[d]:.4g}")
    for d in dict.fromkeys(d for r in results for d in r.domains):
        row(f"split-half ceiling {d}", lambda r, d=d: _ceiling(r.split_half.get(d), 3, ""))
    return t


@command("gradsim")
@source_options  # [ownmodel]
def gradsim_cmd(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoint directories (a run directory means its latest)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap resampling (and of dropout with --train-mode)."),
    resamples: int = typer.Option(200, help="Bootstrap resamples for the standard errors (0: none)."),
    domains: Optional[str] = typer.Option(None, help="'each' (the default: every domain, OOD included), 'train' (the "
                                                     "trained domains) or comma-separated domain names."),
    train_mode: bool = typer.Option(False, help="Differentiate in train mode (dropout on); default eval mode."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all results as JSON to this file ('-': stdout)."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write all results as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    plot: Optional[str] = typer.Option(None, help="Write the heatmap figure (PNG, SVG or PDF) to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
    precision: str = typer.Option("auto", help="auto (float64 up to 100k parameters; the "
                                               "model's own float32 weights beyond), float64 or float32."),
    split_half: bool = typer.Option(True, help="Measure each domain's split-half ceiling (on a single batch: "
                                               "its chunks, one extra pass); --no-split-half: one backward per "
                                               "batch, as a plain loop."),
):
    """Cosines between full-parameter domain gradients, with bootstrap error bars and each domain's split-half
    self-cosine: the ceiling its cosines can reach at its gradient noise (flagged as noise below 0.1)."""
    from landscape.gradsim import gradient_similarity

    check_range(resamples, "--resamples", 0, MAX_RESAMPLES, "the bootstrap error is settled long before")
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    check_output_file(plot, "--plot", figure_formats() if plot else None)
    doms = parse_names(domains, "--domains")
    from landscape.precision import check_precision
    check_precision(precision)
    results, labels, steps = analyse_each(
        checkpoints, lambda obj, bar: gradient_similarity(obj, seed=seed, domains=doms, resamples=resamples,
                                                          train_mode=train_mode, progress=bar,
                                                          precision=precision, split_half=split_half),
        device, trust_remote_code)
    show = tables(json_out, csv_out)
    show.print(Columns([cosine_table(r, lab) for r, lab in zip(results, labels)], padding=(0, 3)))
    show.print(summary_table(results, labels))
    from .export import emit

    emit("gradsim", [(str(p), s, r.to_dict()) for p, s, r in zip(checkpoints, steps, results)], json_out, csv_out)
    if plot:
        from landscape.render.geometry import gradsim_figure
        gradsim_figure(results, labels, plot)
        console.print(f"wrote {plot}")
