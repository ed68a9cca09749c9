"""`landscape study`: the dose-response study of Nexus against its first-order control over gamma, with the
K = 1 null, paired seeds at equal training loss, the exact alignment rate and every null with its power."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .app import command
from .common import check_output_dir, check_range, console, out


@command("study")
def study_cmd(
    out_dir: str = typer.Option("study", "--out", help="Directory for runs/, study.json, report.html, figures/."),
    quick: bool = typer.Option(False, help="A small plan for tests (2 seeds, 2 gammas, 30 steps; about a minute)."),
    seeds: Optional[int] = typer.Option(None, help="Number of paired seeds (default 15; quick 2)."),
    gammas: Optional[str] = typer.Option(None, help="Comma-separated gamma grid (default 0.02,0.05,0.1,0.2)."),
    device: str = typer.Option("cpu", help="auto, cpu or cuda."),
):
    """Nexus vs the control (Nexus parallel) on `mix` over a gamma grid and the K = 1 null, at equal training
    loss over paired seeds: predictions stated first, then which held (intervals with their MDE), figures, data."""
    from landscape.app.study import PREDICTIONS, run_study, study_preset
    from nexus_opt.util import resolve_device

    from .mechanism import parse_gammas

    resolve_device(device)
    check_range(seeds, "--seeds", 2, 1000, "paired seeds (two at least, for an interval)")
    gs = parse_gammas(gammas) if gammas is not None else None
    check_output_dir(out_dir, "--out")
    cfg = study_preset(quick=quick, out=out_dir, device=device, seeds=tuple(range(seeds)) if seeds else None,
                       gammas=tuple(gs) if gs else None)
    summary = run_study(cfg, log=lambda m: console.print(f"[cyan]study[/cyan] {m}"))
    t = Table(title=f"predictions and outcomes ({len(cfg.seeds)} seeds, K={summary['settings']['K']})",
              title_style="bold")
    t.add_column("prediction")
    t.add_column("outcome")
    texts = dict(PREDICTIONS)
    for o in summary["outcomes"]:
        t.add_row(texts[o["id"]], o["outcome"])
    out.print(t)
    console.print(f"report: {summary['report']} (data: {out_dir}/study.json); {summary['seconds']:.0f} s")
