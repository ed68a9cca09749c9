"""Loss surfaces: every domain's loss (and the training loss) on a 2-D grid of a plane, or along a line.

Each grid point's weights are built as theta + a*d1 + b*d2 from device-resident directions and handed to
`functional_call` (the evaluation of `obj.functional_loss`, all domains in one call); the model is never
walked in place, so nothing drifts and the caller's model is unchanged (in train mode too: buffers, flags and
the RNG are restored, and each batch's dropout masks come from the seed; see `engine`). Evaluation is batched with
`torch.func.vmap` over chunks of grid points, or a plain per-point loop. `batch="auto"`: vmap on CUDA
(measured 9-19x faster than the loop on an H200); elsewhere a short interleaved probe of both modes on
the objective picks the faster (on 2 shared CPU cores vmap was 6-9x faster for the mix MLP and 0.45-0.7x
for the tiny GPT; `bench/bench_surface.py` re-measures). If vmap fails for a model (an op without a
batching rule) the grid falls back to the loop and records why; out of memory halves the vmap chunk.

With `out=PATH.npz` every finished block of rows is appended to a sidecar (`PATH.npz.part<rank>.jsonl`,
flushed per block): an interrupted grid resumes where it stopped and gives the same numbers as an
uninterrupted one; a finished file with the same fingerprint (weights, directions, grid, data) is reused.
Under torchrun (torch.distributed initialised) each rank evaluates its share of the remaining rows and the
rows are gathered once at the end (all_gather_object); rank 0 writes the file.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from .. import directions as dirs
from ..objective import TRAIN, Objective
from ..params import get_flat
from .engine import Evaluator, choose_batch, point_losses, probe, train_loss
from .planes import flat_of, grid_axes, make_plane
from .resume import Sidecar, all_gather, broadcast, dist_info, fingerprint, read_sidecars, shard_rows, sidecars
from .results import LineResult, SurfaceResult, jsonable, versions

Progress = Callable[[int, int, str], None]  # progress(done, total, what), as every analyzer


def resolve_domains(obj: Objective, domains) -> tuple[list[str], list[str]]:
    """(domains to report, domains to evaluate): `domains` parsed by Objective.resolve_domains (default every
    domain, OOD included; 'train' = the trained domains); the training domains are always evaluated ('train')."""
    want = [d for d in obj.resolve_domains(domains, default="each", train="expand") if d != TRAIN]
    evaluated = want + [d for d in obj.train_domains if d not in want]
    return want, evaluated


def _ticker(progress: Progress | None, total: int, what: str) -> Callable[[int], None]:
    """`tick(done)` reporting progress(done, total, what), or a no-op without a callback."""
    if not progress:
        return lambda done: None
    if not callable(progress):
        raise UserError(f"progress must be None or a callable progress(done, total, what), got {progress!r}")
    return lambda done: progress(done, total, what)


def _train_mode_dtype(obj: Objective, train_mode: bool) -> Objective:
    """Train mode on an accelerator: a float64 copy, because a dropout mask drawn from one seed there may depend on
    the dtype, and the descents (domains plane, line to a minimum) run in float64: one loss for both. CPU masks do
    not depend on the dtype (tested), so the CPU keeps the model's dtype."""
    if train_mode and obj.device.type != "cpu" and obj.dtype != torch.float64:
        return obj.to(dtype=torch.float64)
    return obj


def surface(obj: Objective, *, plane: str = "random", grid=51, span=None, domains=None, params: str | None = None,
            seed: int = 0, progress: Progress | None = None, others=None, minima=None, norm: str = "filter",
            bias: str = "zero", batch: str = "auto", chunk: int | None = None, out: str | Path | None = None,
            pair: Sequence[str] | None = None, descend_steps: int = 300,
            labels: Sequence[str] | None = None, train_mode: bool = False, trajectories=None,
            trajectory_basis: str = "all", curvature: str = "hessian", eigen_domain: str | None = None,
            descend_others: bool = True) -> SurfaceResult:
    """Every domain's loss and the training loss on a grid of a plane around the objective's weights.

    plane: 'random' (seeded filter-normalised orthogonal directions, seeds seed and seed+1), 'domains'
    (through theta and the minima of two trained domains, `pair`, default the first two; `minima` maps
    domain -> flat weights, missing ones are found by `closeness.descend`), 'checkpoints' (through the
    objective's weights and 1 or 2 `others`: Objectives or flat vectors; with 1 the second direction is
    random), 'trajectory' (the PCA plane of training checkpoints, Li et al.: `trajectories` maps a run label to
    {checkpoint name: Objective or flat vector} in training order, origin the first run's last checkpoint;
    `trajectory_basis` 'all' (PCA of every run's checkpoints: one common plane) or 'first'), 'eigen' (the top two
    eigenvectors of the Hessian, or `curvature='ggn'`, of `eigen_domain`, default the training loss; unit
    vectors). See landscape.surface.trajectory. grid: points per side or (nx, ny). span: None (auto: +-1 for random, else the points' padded
    bounding box), a number s (+-s) or (xmin, xmax, ymin, ymax). domains: names or 'a,b' (default all, OOD
    included; training domains are always evaluated for 'train'). batch: 'auto' | 'vmap' | 'loop'. out:
    an .npz path written at the end; finished rows go to a sidecar so an interrupted grid resumes.
    progress: None or a callable progress(done_points, total_points, what) (the CLI passes its rich bar).
    descend_others: False finds by descent only the pair's missing minima (others are marked where given).
    params: a regex restricting the moved parameters (Objective.select; the others stay at theta).
    Eval mode, or `train_mode=True`: dropout on and BatchNorm batch statistics, batch k's dropout masks drawn
    from objective.batch_seed(seed, k) at every point (a point's value does not depend on chunk, batch or order;
    the domains plane descends on the same train-mode loss). The model, its buffers, flags and the RNG are
    unchanged.
    """
    seed = check_seed(seed, "seed")
    obj = _train_mode_dtype(obj.select(params), train_mode)
    grid_axes({}, span, grid)  # refuse a bad grid or span before any descent or evaluation
    want, names = resolve_domains(obj, domains)
    rank, world = dist_info()
    _ticker(progress, 0, "")  # a bad callback is refused before any work
    device, dtype = obj.device, obj.dtype
    train_mode = bool(train_mode)
    pl = make_plane(obj, plane, seed=seed, norm=norm, bias=bias, others=others, minima=minima, pair=pair,
                    domains=want, descend_steps=descend_steps, labels=labels, train_mode=train_mode,
                    trajectories=trajectories, trajectory_basis=trajectory_basis, curvature=curvature,
                    eigen_domain=eigen_domain, descend_others=descend_others)
    origin = pl.origin.to(device=device, dtype=dtype)
    D = torch.stack([pl.d1, pl.d2]).to(device=device, dtype=dtype)
    if world > 1:  # one plane for all ranks (descent on GPUs need not be bit-identical)
        origin, D, pl.points, pl.offplane = broadcast([origin, D, pl.points, pl.offplane], device)
    x, y, box = grid_axes(pl.points, span, grid)
    fp = fingerprint(obj, origin, D, x, y, names, seed if train_mode else None)
    out = Path(out) if out is not None else None
    if out is not None and out.is_file():
        try:
            old = SurfaceResult.load(out)
            if old.fingerprint == fp:
                old.timing = dict(old.timing, reused=True)
                return old
        except UserError:
            pass
    probed = probe(obj, names, chunk, train_mode=train_mode) if batch == "auto" and device.type != "cuda" else None
    mode = probed["pick"] if probed else choose_batch(batch, device)
    ev = Evaluator(obj, names, mode, chunk, train_mode=train_mode, seed=seed)
    nx, ny = len(x), len(y)
    rows_per_block = 1 if mode == "loop" else max(1, ev.chunk // nx)
    Z = {d: np.full((ny, nx), np.nan) for d in names}
    t0 = time.perf_counter()
    done = read_sidecars(out, fp, ny=ny, nx=nx, names=names) if out is not None and rank == 0 else {}
    if world > 1:
        done = broadcast([done], "cpu")[0]
    resumed = len(done)
    mine = shard_rows([i for i in range(ny) if i not in done], world, rank)
    computed: dict[int, dict[str, list[float]]] = {}
    xs = torch.as_tensor(x, dtype=dtype, device=device)
    side = Sidecar(out, rank, fp) if out is not None and mine else None
    tick = _ticker(progress if rank == 0 else None, nx * ny, f"surface {plane}")
    try:
        with obj.preserved(train_mode, seed):
            tick(len(done) * nx)
            for s in range(0, len(mine), rows_per_block):
                rows = mine[s:s + rows_per_block]
                ab = torch.stack([xs.repeat(len(rows)),
                                  torch.as_tensor(np.repeat(y[rows], nx), dtype=dtype, device=device)], 1)
                vals = ev(origin, D, ab)
                block = {d: vals[d].reshape(len(rows), nx) for d in names}
                for k, i in enumerate(rows):
                    computed[i] = {d: block[d][k].tolist() for d in names}
                if side is not None:
                    side.write(rows, block)
                tick((len(done) + len(computed)) * nx)
            at_points = point_losses(ev, origin, D, pl.points, names, obj)
    finally:
        if side is not None:
            side.close()
    elapsed = time.perf_counter() - t0
    if world > 1:
        for part in all_gather(computed):
            done.update(part)
    done.update(computed)
    for i, row in done.items():
        for d in names:
            Z[d][i] = row[d]
    Z[TRAIN] = train_loss(Z, obj)
    res = SurfaceResult(
        plane=plane, x=x, y=y, losses={**{d: Z[d] for d in want}, **{d: Z[d] for d in names if d not in want},
                                       TRAIN: Z[TRAIN]},
        origin=dirs.to_numpy(origin), directions=D.double().cpu().numpy(), points=pl.points, offplane=pl.offplane,
        point_losses=at_points, domains=want, train_domains=list(obj.train_domains), ood=list(obj.ood),
        weights=dict(obj.weights), seed=int(seed),
        normalization={**pl.info, **dirs.basis_stats(D[0], D[1])} if plane == "random" else
        {"norm": "none (directions between points)", **pl.info, **dirs.basis_stats(D[0], D[1])},
        settings={"grid": [nx, ny], "span": box, "batch": batch, "batch_used": ev.mode, "batch_note": ev.note,
                  "batch_probe": probed, "chunk": ev.chunk if ev.mode == "vmap" else None, "device": str(device), "dtype": str(dtype),
                  "pair": pl.info.get("pair"), "descend_steps": descend_steps if plane == "domains" else None,
                  "labels": list(labels) if labels else None, "world_size": world, "params": params,
                  **({"trajectory_basis": trajectory_basis} if plane == "trajectory" else {}),
                  **({"curvature": curvature, "eigen_domain": pl.info.get("domain")} if plane == "eigen" else {}),
                  "train_mode": train_mode},
        versions=versions(),
        seconds=elapsed, timing={"points": len(computed) * nx, "resumed_rows": resumed,
                "points_per_s": len(computed) * nx / elapsed if elapsed > 0 and computed else None},
        meta=jsonable(obj.meta), fingerprint=fp)
    if out is not None and rank == 0:
        res.save(out)
        for p in sidecars(out):
            p.unlink()
    if world > 1:
        torch.distributed.barrier()
    return res



def line(obj: Objective, start=None, end=None, *, points: int = 51, span=(0.0, 1.0), domains=None,
         params: str | None = None, seed: int = 0, progress: Progress | None = None, batch: str = "auto",
         chunk: int | None = None, descend_steps: int = 300, train_mode: bool = False) -> LineResult:
    """Every domain's loss along start + t*(end - start) for `points` values of t in `span`.

    start/end: None (the objective's weights), an Objective (another checkpoint), a flat vector, or a
    domain name (that domain's nearest minimum, by `closeness.descend` from the weights): e.g.
    `line(obj, None, 'code')` walks from theta toward the code minimum; span=(-0.5, 1.5) extends it.
    progress: None or progress(done_points, total_points, what), called when the points are evaluated.
    domains, params, train_mode: as in `surface`.
    """
    seed = check_seed(seed, "seed")
    obj = _train_mode_dtype(obj.select(params), train_mode)
    tick = _ticker(progress, int(points), "line")
    if int(points) < 2:
        raise UserError(f"a line needs at least 2 points, got {points}")
    want, names = resolve_domains(obj, domains)

    def resolve(p, what):
        if p is None:
            return get_flat(obj.params(), torch.float64), "theta"
        if isinstance(p, str):
            if p not in obj.domains and p != TRAIN:
                raise UserError(f"line {what} '{p}' is neither a point nor a domain; domains are {list(obj.domains)}")
            from ..closeness import descend
            m = descend(obj, None if p == TRAIN else p, steps=descend_steps, seed=seed, train_mode=train_mode).theta
            return m.to(obj.device), f"min:{p}"
        return flat_of(p, obj), what

    if end is None:
        raise UserError("line needs an end: a checkpoint, a flat vector or a domain name")
    s, s_name = resolve(start, "start")
    e, e_name = resolve(end, "end")
    o, d = dirs.segment(s, e)
    if not (len(span) == 2 and span[0] < span[1]):
        raise UserError(f"span must be (tmin, tmax) with tmin < tmax, got {span}")
    t = np.linspace(float(span[0]), float(span[1]), int(points))
    dev, dt = obj.device, obj.dtype
    O, Dd = o.to(device=dev, dtype=dt), d.to(device=dev, dtype=dt)
    train_mode = bool(train_mode)
    ev = Evaluator(obj, names, choose_batch(batch, dev, obj, names, chunk, train_mode), chunk, train_mode=train_mode,
                   seed=seed)
    t0 = time.perf_counter()
    with obj.preserved(train_mode, seed):
        tt = torch.as_tensor(t, dtype=dt, device=dev)
        vals = ev(O, torch.stack([Dd, torch.zeros_like(Dd)]), torch.stack([tt, torch.zeros_like(tt)], 1))
    vals[TRAIN] = train_loss(vals, obj)
    el = time.perf_counter() - t0
    tick(len(t))
    labels = {s_name: 0.0, e_name: 1.0} if s_name != e_name else {"start": 0.0, "end": 1.0}
    return LineResult(t=t, losses={**{k: vals[k] for k in want}, **{k: vals[k] for k in names if k not in want},
                                   TRAIN: vals[TRAIN]},
                      origin=dirs.to_numpy(O), direction=dirs.to_numpy(Dd), points=labels,
                      distance=float(Dd.double().norm()), domains=want, train_domains=list(obj.train_domains),
                      ood=list(obj.ood), weights=dict(obj.weights),
                      settings={"points": int(points), "span": [float(span[0]), float(span[1])], "batch": batch,
                                "batch_used": ev.mode, "batch_note": ev.note, "device": str(dev), "dtype": str(dt),
                                "descend_steps": descend_steps, "params": params, "train_mode": train_mode},
                      versions=versions(), timing={"points_per_s": len(t) / el if el > 0 else None},
                      seconds=el, seed=int(seed),
                      meta=jsonable(obj.meta))

