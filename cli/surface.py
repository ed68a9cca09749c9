"""`landscape plot-surface`: every domain's loss on a plane around checkpoints, as .npz + PNG/SVG + HTML."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .sources import source_options  # [ownmodel]
from .app import command
from .common import (MAX_GRID, check_output_dir, check_output_file, check_range, comparison_table, console,
                     merge_alias, parse_names, tables)

FIGURE_EXTS = ("png", "svg", "pdf", "html")


def surface_summary(r, level=None, files=()) -> dict:
    """The JSON/CSV record of a surface (the full grids stay in its .npz): plane, grid, span, points, their
    losses and distances from the plane, each domain's grid minimum, the common low-loss region, timing."""
    import numpy as np

    from landscape.render.surface import common_region, resolve_levels

    levels = resolve_levels(r, level)
    grid_min = {}
    for d in r.losses:
        z = np.asarray(r.losses[d], dtype=float)
        if np.isfinite(z).any():
            a, b, v = r.grid_minimum(d)
            grid_min[d] = {"d1": a, "d2": b, "loss": v}
    x, y = np.asarray(r.x, dtype=float), np.asarray(r.y, dtype=float)
    return {"plane": r.plane, "grid": [int(len(x)), int(len(y))],
            "span": [float(x.min()), float(x.max()), float(y.min()), float(y.max())],
            "domains": list(r.domains), "ood": list(r.ood), "points": r.points, "offplane": r.offplane,
            "point_losses": r.point_losses, "grid_minimum": grid_min, "level": levels,
            "common_region": common_region(r, levels), "timing": r.timing, "seed": r.seed,
            "train_mode": bool(r.settings.get("train_mode", False)), "files": [str(f) for f in files]}


def parse_span(text: Optional[str]):
    """'auto'/None -> None (automatic box), '1.5' -> 1.5 (+-1.5), 'x0,x1,y0,y1' -> a 4-tuple."""
    from nexus_opt.errors import UserError

    if text is None or text.strip().lower() == "auto":
        return None
    parts = [p for p in text.split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if not all(math.isfinite(v) for v in vals):
        vals = []
    if len(vals) == 1 and vals[0] > 0:
        return vals[0]
    if len(vals) == 4 and vals[0] < vals[1] and vals[2] < vals[3]:
        return tuple(vals)
    raise UserError(f"--span must be 'auto', a positive number or 'xmin,xmax,ymin,ymax' with min < max "
                    f"(finite numbers), got '{text[:200]}'")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "ckpt"


def _evaluation(r) -> str:
    """How a surface was evaluated: the mode, the device and, for --batch auto, the probe that chose it."""
    st = r.settings
    txt = f"{st.get('batch_used')} on {st.get('device')}" + (", train mode" if st.get("train_mode") else "")
    pr = st.get("batch_probe")
    if st.get("batch") == "auto" and isinstance(pr, dict) and pr.get("pick"):
        txt += f" (auto: probed vmap {pr.get('vmap', 0):.0f}, loop {pr.get('loop', 0):.0f} points/s)"
    elif st.get("batch") == "auto" and "cuda" in str(st.get("device")):
        txt += " (auto: vmap on CUDA)"
    return txt


def summary_table(results: list, labels: list[str], level, stored: bool = False) -> Table:
    """Per surface: plane, grid, how it was evaluated, losses at the origin point, the common low-loss region.
    `stored` (--from): the evaluation and its speed are the saved run's, said as such (nothing was evaluated)."""
    from landscape.render.surface import common_region, origin_name, resolve_levels

    t, row = comparison_table("loss surfaces" + (" (re-rendered from saved results)" if stored else ""),
                              results, labels, first="")
    was = " (stored)" if stored else ""

    def speed(r):
        if r.timing.get("reused"):
            return "reused"
        if not r.timing.get("points_per_s"):
            return "n/a"
        return f"{r.timing['points_per_s']:.1f}" + (" when computed (stored; nothing evaluated now)" if stored else "")

    row("plane", lambda r: r.plane)
    row("grid", lambda r: "x".join(map(str, r.settings.get("grid", []))))
    row("evaluation" + was, _evaluation)
    row("points/s" + was, speed)
    for d in list(dict.fromkeys(d for r in results for d in r.losses)):
        row(f"{d} at {origin_name(results[0])}",
            lambda r, d=d: f"{r.point_losses.get(origin_name(r), {}).get(d, float('nan')):.4g}" if d in r.losses else "-")
    row("common low-loss region", lambda r: f"{100 * common_region(r, resolve_levels(r, level)):.1f}% of grid")
    return t


@command("plot-surface")
@source_options  # [ownmodel]
def plot_surface_cmd(
    checkpoints: Optional[List[str]] = typer.Argument(None, help="Checkpoint directories (or run directories: latest checkpoint)."),
    plane: str = typer.Option("random", help="random (filter-normalised), domains (theta + two domain minima), checkpoints (through 2-3 CKPTs), "
                                             "trajectory (PCA plane of RUN directories' checkpoints, paths drawn) or eigen (top two Hessian/GGN eigenvectors)."),
    trajectory_basis: str = typer.Option("all", help="trajectory plane: all (PCA of every run's checkpoints: one common plane) or first (the first run's plane)."),
    curvature: str = typer.Option("hessian", help="eigen plane: hessian or ggn."),
    eigen_domain: Optional[str] = typer.Option(None, help="eigen plane: the domain whose curvature gives the axes (default: the training loss)."),
    grid: int = typer.Option(51, help="Grid points per side."),
    span: Optional[str] = typer.Option(None, help="'auto' (default: +-1 for random, the points' box otherwise), a number s (+-s) or 'xmin,xmax,ymin,ymax'."),
    seed: int = typer.Option(0, help="Seed of the random directions (seed and seed+1) and, in train mode, of each "
                                     "batch's dropout masks."),
    domains: Optional[str] = typer.Option(None, help="Domains to evaluate: 'each' (the default: every domain, OOD "
                                                         "included), 'train' (the trained domains) or comma-separated names."),
    pair: Optional[str] = typer.Option(None, help="The two domains whose minima span the domains plane (default: first two trained)."),
    level: Optional[str] = typer.Option(None, help="Low-loss level of the overlay: 'rel:E' (min_d + E*train(theta); default rel:0.1), a number X (min_d + X), 'theta:E' or 'range:E' (min_d + E x the domain's range on the grid)."),
    out_dir: str = typer.Option("surface", "--out", help="Output directory, or a figure file (.png/.svg/.pdf/.html): "
                                                         "then the main figure is written exactly there (several "
                                                         "checkpoints: NAME_1.png ..., NAME.png compares them)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="The main figure file (.png/.svg/.pdf/.html); same as "
                                                            "--out with a file name."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write a summary of every surface as JSON ('-': "
                                                                "stdout); the grids stay in the .npz files."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write the summaries as long-format CSV "
                                                              "(checkpoint,step,domain,metric,value; '-': stdout)."),
    train_mode: bool = typer.Option(False, help="Evaluate the train-mode loss (dropout with masks fixed per batch "
                                                "by --seed, BatchNorm batch statistics; the domains plane descends "
                                                "on it too); default eval mode."),
    from_: Optional[List[str]] = typer.Option(None, "--from", help="Re-render saved surface .npz file(s) without recomputing (repeatable)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch: str = typer.Option("auto", help="auto (vmap on CUDA, the measured faster mode elsewhere), vmap or loop."),
    norm: str = typer.Option("filter", help="Random-direction normalisation: filter, layer or none."),
    bias: str = typer.Option("zero", help="1-D parameters (biases, norms) in random directions: zero or filter."),
    steps: int = typer.Option(300, "--descent-steps", help="Descent steps per domain minimum (domains plane)."),
    old_steps: Optional[int] = typer.Option(None, "--steps", hidden=True),  # the old spelling of --descent-steps
    kind: str = typer.Option("filled", help="Panels: filled, contour or surface (3-D)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a checkpoint's user model factory to be imported."),
):
    """Loss of every domain and the training loss on a plane: small multiples, low-loss overlay, interactive HTML."""
    from landscape.render.surface import compare_figure, parse_level, write_figures, _save
    from landscape.surface import BATCH_MODES, PLANES, SurfaceResult, surface
    from nexus_opt.errors import UserError

    from .common import label, progress_bar

    if plane not in PLANES:
        raise UserError(f"unknown plane '{plane}'; choose one of {list(PLANES)}")
    if batch not in BATCH_MODES:
        raise UserError(f"unknown batch mode '{batch}'; choose one of {list(BATCH_MODES)}")
    if trajectory_basis not in ("all", "first") or curvature not in ("hessian", "ggn"):
        raise UserError(f"--trajectory-basis must be all or first and --curvature hessian or ggn, got "
                        f"{trajectory_basis!r} and {curvature!r}")
    if kind not in ("filled", "contour", "surface"):
        raise UserError(f"unknown --kind '{kind}'; choose filled, contour or surface")
    steps = merge_alias(steps, old_steps, "steps", "--descent-steps", "--steps")
    check_range(grid, "--grid", 2, MAX_GRID, "points per side (the surface costs grid^2 loss evaluations)")
    check_range(steps, "--descent-steps", 0, 10 ** 6, "descent steps per domain minimum")
    box = parse_span(span)
    parse_level(level)  # a bad --level is refused now, not after the surface was computed
    if plot is None and Path(out_dir).suffix.lower().lstrip(".") in FIGURE_EXTS:
        plot = out_dir  # --out x.png: that file, not a directory named x.png
    if plot is not None:
        check_output_file(plot, "--plot", list(FIGURE_EXTS))
        out_dir = str(Path(plot).parent)
    check_output_dir(out_dir, "--out")
    check_output_file(json_out, "--json")
    check_output_file(csv_out, "--csv")
    from nexus_opt.files import check_outputs

    check_outputs({"--plot": plot, "--json": json_out, "--csv": csv_out}, dirs={"--out": out_dir})
    outd = Path(out_dir)
    base = Path(plot).stem if plot else "surface"
    formats = ([Path(plot).suffix.lower().lstrip(".")] if plot else ["png", "svg"])
    formats = [f for f in formats if f != "html"]
    written: list[Path] = []
    results, labels, stems, sources, steps_at = [], [], [], [], []
    from .export import checkpoint_step, emit
    if from_:
        if checkpoints:
            raise UserError("give checkpoints or --from result files, not both")
        for f in from_:
            results.append(SurfaceResult.load(f))
            labels.append(label(f))
            stems.append(outd / (Path(f).stem if not plot else
                                 (base if len(from_) == 1 else f"{base}_{len(stems) + 1}")))
            sources.append(str(results[-1].meta.get("path") or f))
            steps_at.append(results[-1].meta.get("step"))
    else:
        if not checkpoints:
            raise UserError("give at least one checkpoint (or --from RESULT.npz to re-render)")
        from .sources import load_target as load  # [ownmodel]

        common = dict(grid=grid, span=box, seed=seed, domains=parse_names(domains, "--domains"), norm=norm, bias=bias,
                      batch=batch, pair=parse_names(pair, "--pair"), descend_steps=steps, train_mode=train_mode)
        if plane == "eigen":
            common.update(curvature=curvature, eigen_domain=eigen_domain)
        if plane == "trajectory":
            from landscape.surface.trajectory import run_checkpoints

            from .common import unique_labels
            obj = load(checkpoints[0], device=device, trust_remote_code=trust_remote_code)
            runs = {lab: run_checkpoints(obj, p, lab) for p, lab in zip(checkpoints, unique_labels(checkpoints))}
            npz = outd / f"{base}.npz"
            with progress_bar() as bar:
                results.append(surface(obj, plane="trajectory", trajectories=runs, trajectory_basis=trajectory_basis,
                                       out=npz, progress=bar, **common))
            labels.append(" + ".join(runs))
            stems.append(outd / base)
            sources.append(" ".join(str(p) for p in checkpoints))
            steps_at.append(checkpoint_step(obj))
            written.append(npz)
        elif plane == "checkpoints":
            if len(checkpoints) not in (2, 3):
                raise UserError(f"--plane checkpoints needs 2 or 3 checkpoints, got {len(checkpoints)}")
            objs = [load(p, device=device, trust_remote_code=trust_remote_code) for p in checkpoints]
            labs = [label(p) for p in checkpoints]
            npz = outd / f"{base}.npz"
            with progress_bar() as bar:
                results.append(surface(objs[0], plane="checkpoints", others=objs[1:], labels=labs, out=npz,
                                       progress=bar, **common))
            labels.append(" vs ".join(labs))
            stems.append(outd / base)
            sources.append(" ".join(str(p) for p in checkpoints))
            steps_at.append(checkpoint_step(objs[0]))
            written.append(npz)
        else:
            single = len(checkpoints) == 1
            for i, p in enumerate(checkpoints):
                obj = load(p, device=device, trust_remote_code=trust_remote_code)
                stem = outd / (base if single else (f"{base}_{i + 1}" if plot else
                                                    f"{base}_{i + 1}_{_slug(label(p))}"))
                npz = stem.with_name(stem.name + ".npz")
                with progress_bar() as bar:
                    results.append(surface(obj, plane=plane, out=npz, progress=bar, **common))
                labels.append(label(p))
                sources.append(str(p))
                steps_at.append(checkpoint_step(obj))
                stems.append(stem)
                written.append(npz)
                del obj
    from landscape.render.surface import mask_nonfinite, nonfinite_cells

    bad = [(lab, n) for lab, r in zip(labels, results) for n in [sum(nonfinite_cells(r).values())] if n]
    results = [mask_nonfinite(r) for r in results]  # a diverging corner is drawn masked; an all-NaN surface refused
    for lab, n in bad:
        console.print(f"[yellow]{lab}: {n} non-finite grid cell(s) drawn masked[/yellow]")
    per_result = []
    for r, stem in zip(results, stems):
        files = write_figures(r, stem, formats=formats, level=level, kind=kind)
        per_result.append(files)
        written += files
    if len(results) > 1:
        fig = compare_figure(results, labels, level=level)
        for ext in formats:
            p = Path(plot) if plot else outd / f"surface_compare.{ext}"
            _save(fig, p)
            written.append(p)
    tables(json_out, csv_out).print(summary_table(results, labels, level, stored=bool(from_)))
    for p in written:
        console.print(f"wrote {p}")
    emit("plot-surface", [(src, s, surface_summary(r, level, files)) for src, s, r, files
                          in zip(sources, steps_at, results, per_result)], json_out, csv_out)
