"""`landscape mechanism`: the 2-D two-basin toy, AdamW vs the first-order control vs Nexus at several gamma."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import command
from .common import check_output_dir, console, out, write_json


def parse_gammas(text: str, option: str = "--gammas") -> list[float]:
    """'0.1,0.2,0.4' -> [0.1, 0.2, 0.4]; a UserError naming the bad part otherwise."""
    from nexus_opt.errors import UserError

    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts:
        raise UserError(f"{option} '{text}' names no value; give comma-separated positive numbers, e.g. 0.1,0.2,0.4")
    try:
        return [float(t) for t in parts]
    except ValueError:
        raise UserError(f"{option} '{text}' is not a comma-separated list of numbers, e.g. 0.1,0.2,0.4") from None


def _table(r) -> Table:
    t = Table(title="where the runs end (two basins of equal training loss)", title_style="bold")
    for c in ("arm", "gamma", "runs", "shared", "separated", "train loss", "downstream", "cos end",
              f"drift@{r.settings['drift_steps']}"):
        t.add_column(c, justify="left" if c == "arm" else "right")
    for row in r.table:
        t.add_row(row["arm"], "-" if row["gamma"] is None else f"{row['gamma']:g}", str(row["n"]),
                  f"{row['frac_shared']:.0%}", f"{row['frac_separated']:.0%}", f"{row['train_mean']:.3f}",
                  f"{row['downstream_mean']:.3f}", f"{row['end_cosine_mean']:+.2f}", f"{row['drift_mean']:+.3f}")
    t.caption = ("shared/separated: fraction of runs ending in each basin; downstream: mean held-out loss at the end; "
                 "cos end: mean cross-domain gradient cosine at the end; drift: movement towards the shared basin")
    return t


@command("mechanism")
def mechanism_cmd(
    out_dir: str = typer.Option("runs/mechanism", "--out", help="Directory for mechanism.json and mechanism.png."),
    gammas: str = typer.Option("0.1,0.2,0.4", help="Comma-separated Nexus inner learning rates gamma."),
    seed: int = typer.Option(0, help="Seed of the domain orders (micro-batch sequences)."),
    orders: int = typer.Option(3, help="Domain orders per start."),
    starts: int = typer.Option(7, help="Start heights along the ridge (two starts each, either side of it)."),
    steps: int = typer.Option(40, help="Outer (optimizer) steps per run."),
    start_distance: float = typer.Option(0.2, help="How far from the ridge the starts sit (either side)."),
    distances: Optional[str] = typer.Option(None, help="Also rerun at these comma-separated start distances and "
                                                       "print the shared-basin fractions against distance "
                                                       "(mechanism-distance.json)."),
):
    """The paper's mechanism isolated: AdamW, Nexus without the walk (the control) and Nexus on a 2-D toy with
    a shared and a separated basin of equal training loss; fractions ending in each, downstream loss, per gamma."""
    from landscape.app.mechanism import mechanism_toy
    from landscape.render.mechanism import write_mechanism_figure

    check_output_dir(out_dir, "--out")
    from landscape.app.mechanism import start_distance_sweep, sweep_entry, sweep_reading

    extra = [] if distances is None else parse_gammas(distances, "--distances")
    r = mechanism_toy(parse_gammas(gammas), seed=seed, n_orders=orders, n_along=starts, steps=steps,
                      start_distance=start_distance)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    r.to_json(d / "mechanism.json")
    write_mechanism_figure(r, d / "mechanism.png")
    out.print(_table(r))
    out.print(r.reading())
    if extra:
        others = [x for x in extra if x != r.settings["start_distance"]]
        sweep = sorted(start_distance_sweep(others, r.gammas, seed=seed, n_orders=orders, n_along=starts, steps=steps)
                       + [sweep_entry(r)], key=lambda e: e["distance"])
        write_json({"command": "mechanism", "start_distance_sweep": sweep}, d / "mechanism-distance.json")
        out.print(sweep_reading(sweep))
    console.print(f"wrote {d / 'mechanism.json'} and {d / 'mechanism.png'} ({r.seconds:.1f} s)")
