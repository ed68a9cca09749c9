"""`landscape demo`: the main job (AdamW, the first-order control and Nexus at equal training loss, paired over seeds)."""
from __future__ import annotations

from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .app import command
from .common import check_output_dir, console, out


class _RunBars:
    """One rich progress task per training run, fed by the trainer's events."""

    def __init__(self, p: Progress):
        self.p = p

    def __call__(self, name: str):
        task = None

        def cb(ev: dict) -> None:
            nonlocal task
            if ev["event"] == "step":
                if task is None:
                    task = self.p.add_task(name, total=ev["steps"], completed=ev["step"] - 1)
                self.p.update(task, completed=ev["step"])

        return cb

    def task(self, name: str):
        """A callback `(done, total, what)` for one analysis, shown as its own bar."""
        tid = None

        def cb(done: int, total: int, what: str = "") -> None:
            nonlocal tid
            if tid is None:
                tid = self.p.add_task(name, total=total)
            self.p.update(tid, completed=done, total=total)

        return cb


@command("demo")
def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="Small models and grids: about 70 s on 2 idle CPU cores (longer "
                                                  "on a loaded machine)."),
    out_dir: str = typer.Option("demo", "--out", help="Output directory (runs, figures, report.html, summary.json)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default 0,1,2,3,4; quick: 0,1)."),
):
    """Train AdamW, the first-order control (Nexus parallel) and Nexus on the built-in suites, compare them at equal
    training loss with paired statistics over seeds, track gradient similarity over training, run the mechanism toy,
    and write one self-contained HTML report."""
    from nexus_opt.errors import UserError
    from nexus_opt.util import check_seed, resolve_device

    from landscape.app.demo import METRIC_ROWS, preset, run_demo

    resolve_device(device)
    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds else None
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got '{seeds}'") from None
    if seed_list is not None:
        if len(set(seed_list)) != len(seed_list):
            raise UserError(f"--seeds must be distinct (a repeated seed would be counted twice), got '{seeds}'")
        for s in seed_list:
            check_seed(s, "--seeds entries")
    check_output_dir(out_dir, "--out")
    cfg = preset(quick=quick, out=out_dir, device=device, seeds=seed_list)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as p:
        bars = _RunBars(p)
        summary = run_demo(cfg, log=lambda m: p.console.print(f"[cyan]demo[/cyan] {m}"), progress=bars, task=bars.task)
    names = {"adamw": "AdamW", "control": "control", "nexus": "Nexus"}
    for suite, s in summary["suites"].items():
        t = Table(title=f"{suite}: at equal training loss (mean ± std over {len(cfg.seeds)} seeds) and paired "
                        "differences (mean [95% CI], seeds +/-, minimum detectable effect at 80% power)")
        for c in ("metric", *names.values(), "Nexus - AdamW", "Nexus - control", "control - AdamW"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        pairs = {(p["metric"], p["arm"], p["baseline"]): p for p in s["paired"]}
        for key, label in METRIC_ROWS:
            t.add_row(label, *[_pm(s["aggregate"][a][key]) for a in names],
                      *[_ci(pairs[(key, a, b)]) for a, b in (("nexus", "adamw"), ("nexus", "control"),
                                                            ("control", "adamw"))])
        out.print(t)
        flagged = [f"seed {r['seed']}: {', '.join(r['flagged'])}" for r in s["per_seed"] if r["flagged"]]
        conv = s["closeness_converged"]
        console.print(f"{suite}: training losses matched within {max(g for r in s['per_seed'] for g in r['gaps'].values()):.2g}"
                      + (f" (above {s['match_tol']:g}: {'; '.join(flagged)})" if flagged else "")
                      + f"; closeness converged on {sum(conv.values())}/{len(conv)} checkpoints")
    t = summary.get("timings", {})
    console.print("time: " + ", ".join(f"{k} {v['cpu_s']:.0f} CPU-s" for k, v in t.items())
                  + f"; total {summary.get('cpu_seconds', 0):.0f} CPU-s, {summary['seconds']:.0f} s wall")
    console.print(f"report: {summary['report']}  (data: {out_dir}/summary.json, figures: {out_dir}/figures/)")


def _ci(p: dict) -> str:
    if p["ci_low"] is None:
        return "n/a"
    mde = p.get("mde")
    return (f"{p['mean']:+.3g} [{p['ci_low']:+.3g}, {p['ci_high']:+.3g}] {p['positive']}/{p['negative']}"
            + ("" if mde is None else f" MDE {mde:.2g}"))


def _pm(s: dict) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.4g} ± {s['std']:.2g}"
