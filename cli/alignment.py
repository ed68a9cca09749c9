"""`landscape alignment`: Nexus's expected displacement at each checkpoint per gamma, its expansion terms and the
rate at which it raises the cross-domain gradient cosine compared with the control."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from .sources import source_options  # [ownmodel]
from .app import command
from .common import analyse_each, check_output_file, check_range, console, figure_formats, parse_names, tables
from .mechanism import parse_gammas


def _g(v, fmt="+.4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def alignment_table(r, label: str) -> Table:
    mode = "exact over all orders" if r.exact else f"{r.orders} sampled orders (± stderr)"
    t = Table(title=f"{label}: K={r.K}, {mode}; mean cosine {_g(r.mean_cosine)}", title_style="bold")
    for c in ("gamma", "|first|", "|second|", "|remainder|", "rem/second", "dcos nexus", "dcos control",
              "difference", "predicted"):
        t.add_column(c, justify="right")
    for row in r.per_gamma:
        rc, se = row["rate_cosine"], row.get("stderr") or {}
        diff = _g(rc["difference"]) + (f" ±{se['rate_cosine.difference']:.2g}"
                                       if se.get("rate_cosine.difference") is not None else "")
        t.add_row(f"{row['gamma']:g}", _g(row["norm_first"], ".4g"), _g(row["norm_second"], ".4g"),
                  _g(row["norm_remainder"], ".3g"), _g(row["remainder_over_second"], ".3g"), _g(rc["nexus"]),
                  _g(rc["control"]), diff, _g(rc["predicted_difference"]))
    t.caption = ("dcos: rate of the mean cross-domain gradient cosine per unit outer step along Nexus's expected "
                 "direction and along the control's; predicted: the same difference from first + second order")
    return t


@command("alignment")
@source_options  # [ownmodel]
def alignment_cmd(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoint directories (a run directory means its latest)."),
    gammas: str = typer.Option("0.001,0.01,0.03,0.1", help="Comma-separated inner learning rates gamma."),
    k: Optional[int] = typer.Option(None, "--K", "-K", help="Inner steps per outer step (default: the number of "
                                                             "walked domains)."),
    max_orders: int = typer.Option(1024, help="Exact expectation when N^K orders are at most this many."),
    samples: int = typer.Option(256, help="Sampled orders otherwise (a jackknife standard error per number)."),
    domains: Optional[str] = typer.Option(None, help="Comma-separated domains the walk draws from (default: "
                                                     "the trained ones)."),
    seed: int = typer.Option(0, help="Seed of the sampled orders."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all results as JSON to this file ('-': stdout)."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write all results as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    plot: Optional[str] = typer.Option(None, help="Write the figure (PNG, SVG or PDF) to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
):
    """Exact expected Nexus displacement at each checkpoint (first-order = the control's, second-order alignment
    term, remainder) and the rate of the mean gradient cosine along Nexus's vs the control's direction, per gamma."""
    from landscape.alignment import alignment

    gs = parse_gammas(gammas)
    check_range(k, "--K", 1, 64, "inner steps of one outer step")
    check_range(max_orders, "--max-orders", 2, 1_000_000)
    check_range(samples, "--samples", 2, 1_000_000)
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    check_output_file(plot, "--plot", figure_formats() if plot else None)
    doms = parse_names(domains, "--domains")
    results, labels, steps = analyse_each(
        checkpoints, lambda obj, bar: alignment(obj, gammas=gs, K=k, domains=doms, seed=seed,
                                                max_orders=max_orders, samples=samples, progress=bar),
        device, trust_remote_code)
    show = tables(json_out, csv_out)
    for r, lab in zip(results, labels):
        show.print(alignment_table(r, lab))
        show.print(r.reading())
    from .export import emit

    emit("alignment", [(str(p), s, r.to_dict()) for p, s, r in zip(checkpoints, steps, results)], json_out, csv_out)
    if plot:
        from landscape.render.alignment import alignment_figure
        alignment_figure(results, labels, plot)
        console.print(f"wrote {plot}")
