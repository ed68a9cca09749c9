"""`landscape flatness`: top/bottom Hessian eigenvalues, trace and spectral density of a checkpoint, per domain."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from .app import command
from .common import (MAX_LANCZOS_STEPS, check_output_file, check_range, console, figure_formats, merge_alias,
                     progress_bar, tables)
from .sources import source_options


def _g(v, digits: int = 5) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _pairs(r):
    """(eigenvalue, residual, error bound) of every reported eigenvalue, both ends."""
    top = zip(r.eigenvalues or [], r.residuals or [], r.errors or [None] * len(r.eigenvalues or []))
    bottom = zip(r.bottom_eigenvalues or [], r.bottom_residuals or [],
                 r.bottom_errors or [None] * len(r.bottom_eigenvalues or []))
    return [(v, res, err) for v, res, err in list(top) + list(bottom) if v is not None]


def _max_rel(r, which: int) -> str:
    """The largest residual ||Hv - lambda v|| (which=1) or eigenvalue error bound min(r, r^2/gap) (which=2) over
    the reported eigenvalues, relative to |lambda| floored at 1e-3 of the largest |lambda| (the convergence
    test's unit)."""
    pairs = _pairs(r)
    scale = max((abs(v) for v, _, _ in pairs), default=0.0)
    rel = [p[which] / max(abs(p[0]), 1e-3 * scale, 1e-300) for p in pairs if p[which] is not None]
    return f"{max(rel):.1e}" if rel else "n/a"


def summary_table(results: dict, title: str) -> Table:
    """One row per domain: loss, lambda_max, lambda_min, trace +- stderr, accuracy, convergence, HVPs and time
    (summary_notes says what the accuracy columns and any n/a mean)."""
    t = Table(title=title, title_style="bold")
    for col in ("domain", "loss", "λmax", "λmin", "trace ± stderr", "rel. error bound", "rel. residual",
                "converged", "HVPs", "time"):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for name, r in results.items():
        tr = "-" if r.trace is None else f"{r.trace:.5g} ± {_g(r.trace_stderr, 2)}" + (
            " (budget)" if getattr(r, "trace_stop", None) == "budget" else "")
        conv = "[green]yes[/green]" if r.converged else "[red]no[/red]"
        lmin = r.bottom_eigenvalues[0] if r.bottom_eigenvalues else None
        lmax = r.eigenvalues[0] if r.eigenvalues else None
        t.add_row(name, f"{r.loss:.4g}", _g(lmax), _g(lmin), tr, _max_rel(r, 2), _max_rel(r, 1), conv,
                  str(r.hvps["total"]), f"{r.seconds:.1f}s")
    return t


def summary_notes(results: dict, tol: float | None = None, matrix: str = "Hessian") -> list[str]:
    """The lines printed under the summary table: what the accuracy columns and any n/a mean."""
    tol_txt = f" (tol {tol:g})" if tol is not None else ""
    notes = [f"converged: every eigenvalue's error bound min(r, r²/gap) <= tol·|λ| and its residual r = ||Hv − λv||"
             f" <= √tol·|λ|{tol_txt}: an eigenvalue is accurate to tol while its eigenvector's residual may be "
             "larger (both columns: the largest over the eigenvalues shown, relative to |λ| floored at 1e-3 of "
             "the largest)."]
    if any(not r.bottom_eigenvalues for r in results.values()):
        notes.append("λmin n/a: the GGN is positive semi-definite (λmin >= 0, a cluster at zero), so only its top "
                     "end is computed (--which bottom asks for it)." if matrix == "GGN" else
                     "λmin n/a: the bottom end was not computed (--which top, or the pyhessian backend).")
    return notes


def eigen_table(results: dict, title: str = "Hessian eigenvalues") -> Table:
    """The eigenvalues, one column per domain: top 1..k (descending) then bottom 1..k (ascending)."""
    t = Table(title=title, title_style="bold")
    t.add_column("")
    for name in results:
        t.add_column(name, justify="right")
    rs = list(results.values())
    k = max([len(r.eigenvalues or []) for r in rs] + [len(r.bottom_eigenvalues or []) for r in rs])
    for end, label in (("eigenvalues", "top"), ("bottom_eigenvalues", "bottom")):
        if not any(getattr(r, end) for r in rs):
            continue
        for i in range(k):
            t.add_row(f"{label} {i + 1}", *[_g(getattr(r, end)[i], 8) if getattr(r, end) and i < len(getattr(r, end))
                                            else "" for r in rs])
    return t


class _Estimated(Exception):
    """--estimate: the estimate is printed; skip the work."""


@command("flatness")
@source_options  # [ownmodel]
def flatness_cmd(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoint directories (a run directory means its latest)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Eigenvalues at each end."),
    domains: str = typer.Option("train", "--domains", help="'train' (the training loss), 'each' (every domain) or "
                                                           "comma-separated domain names."),
    old_domains: Optional[str] = typer.Option(None, "--domain", hidden=True),  # the old spelling of --domains
    which: str = typer.Option("both", help="both, top or bottom (pyhessian: top only)."),
    trace: bool = typer.Option(True, "--trace/--no-trace", help="Estimate the Hessian trace (Hutch++)."),
    density: bool = typer.Option(False, "--density", help="Estimate the spectral density (stochastic Lanczos)."),
    density_probes: int = typer.Option(4, help="Probes of the spectral density (run as one block)."),
    density_steps: int = typer.Option(80, help="Lanczos steps per density probe."),
    backend: str = typer.Option("lanczos", help="lanczos, eigsh (scipy ARPACK), dense (exact, small models) or "
                                                "pyhessian (cross-check)."),
    tol: float = typer.Option(1e-4, help="Relative accuracy of the eigenvalues (e.g. 1e-8 for tight values)."),
    max_hvps: Optional[int] = typer.Option(None, help="Budget of Hessian-vector products for the eigenvalues."),
    trace_probes: Optional[int] = typer.Option(None, help="Fixed probe count of the trace (default: adaptive, "
                                                          "see --trace-target)."),
    trace_target: float = typer.Option(0.01, help="Adaptive trace: stop once stderr <= this x |trace| "
                                                  "(or after --trace-max-probes)."),
    trace_max_probes: int = typer.Option(200, help="Adaptive trace: most probes to spend."),
    seed: int = typer.Option(0, help="Seed of the start vector and the probes."),
    train_mode: bool = typer.Option(False, help="Differentiate in train mode (BatchNorm batch statistics, "
                                                "dropout with fixed masks); default eval mode."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all results as JSON to this file ('-': stdout)."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write all results as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    plot: Optional[str] = typer.Option(None, help="Write the spectrum figure (PNG/SVG/PDF, or .html: interactive); "
                                                  "implies --density. Several checkpoints: one file each, suffixed "
                                                  "_1, _2, ..."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
    curvature: str = typer.Option("hessian", help="hessian or ggn (Gauss-Newton: cross-entropy, squared error)."),  # [ownmodel]
    precision: str = typer.Option("auto", help="auto (float64 up to 100k parameters; "
                                               "float32 products on the model's own weights beyond), float64 "
                                               "or float32."),
    estimate: bool = typer.Option(False, "--estimate", "--dry-run", help="Print the memory and cost estimate "
                                                                          "and stop."),
):
    """Sharpness of the loss at each checkpoint: extreme Hessian eigenvalues (with multiplicities, to --tol), trace
    with error bars."""
    from pathlib import Path

    from landscape.flatness import flatness
    from nexus_opt.errors import UserError

    from .export import checkpoint_step, emit
    from .sources import load_target as load

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    domains = merge_alias(domains, old_domains, "domains", "--domains", "--domain")
    check_range(density_steps, "--density-steps", 1, MAX_LANCZOS_STEPS, "Lanczos steps")
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    check_output_file(plot, "--plot", figure_formats(html=True) if plot else None)
    if backend == "pyhessian" and which == "both":
        which = "top"  # power iteration finds the top end only
    matrix = "GGN" if curvature == "ggn" else "Hessian"
    show = tables(json_out, csv_out)  # stdout carries only the JSON/CSV when it is asked for there
    entries = []
    for i, checkpoint in enumerate(checkpoints):
        obj = load(checkpoint, device=device, trust_remote_code=trust_remote_code)
        steps = density_steps
        if (density or plot) and density_steps > obj.num_params():  # Lanczos is exact after n steps
            console.print(f"--density-steps {density_steps} capped at the model's {obj.num_params()} parameters")
            steps = obj.num_params()
        if estimate and (backend != "lanczos" or curvature != "hessian"):
            raise UserError("--estimate covers the lanczos backend on the Hessian")

        def announce(est, n_domains):  # the memory formula and cost, printed before the work starts
            for line in est.lines():
                console.print(line + (f" (x {n_domains} domains)" if n_domains > 1 and "per domain" in line
                                      else ""), highlight=False, soft_wrap=True)
            if estimate:
                raise _Estimated

        try:
            with progress_bar("HVPs") as bar:
                res = flatness(obj, k=top_k, domains=domains.strip(), trace=trace, density=density or bool(plot),
                               seed=seed, backend=backend, which=which, tol=tol, max_hvps=max_hvps,
                               trace_probes=trace_probes, density_probes=density_probes, density_steps=steps,
                               train_mode=train_mode, progress=bar, trace_target=trace_target,
                               trace_max_probes=trace_max_probes, curvature=curvature, precision=precision,
                               on_estimate=announce)
        except _Estimated:
            del obj
            continue
        results = res.results
        first = next(iter(results.values()))
        show.print(summary_table(results, f"flatness of {checkpoint} ({first.num_params} parameters, {backend}, "
                                          f"{matrix})"))
        for note in summary_notes(results, tol, matrix):
            show.print(f"[dim]{note}[/dim]", highlight=False)
        show.print(eigen_table(results, f"{matrix} eigenvalues"))
        entries.append((str(checkpoint), checkpoint_step(obj), res.to_dict()))
        if plot:
            from landscape.render.flatness import flatness_figure

            target = plot if len(checkpoints) == 1 else str(Path(plot).with_stem(f"{Path(plot).stem}_{i + 1}"))
            flatness_figure(res, target, title=f"{matrix} spectrum of {checkpoint}")
            console.print(f"wrote {target}")
        del obj
    if not estimate:
        emit("flatness", entries, json_out, csv_out)
