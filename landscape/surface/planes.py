"""The plane of a surface and its grid: seeded random, through theta and two domain minima (found by descent
when not given), or through checkpoints; the grid's coordinates around the plane's named points."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError

from .. import directions as dirs
from ..objective import Objective
from ..params import get_flat

PLANES = ("random", "domains", "checkpoints", "trajectory", "eigen")


def flat_of(x, obj: Objective) -> torch.Tensor:
    """A flat float64 vector from an Objective, a tensor, an array or a list (checked against obj)."""
    if isinstance(x, Objective):
        other = x.params()
        mine = obj.params()
        if [(k, tuple(v.shape)) for k, v in other.items()] != [(k, tuple(v.shape)) for k, v in mine.items()]:
            raise UserError("the other checkpoint's parameters differ in names or shapes from the first; "
                            "a plane needs one architecture")
        v = get_flat(other, torch.float64)
    else:
        v = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64))
    n = obj.num_params()
    if v.numel() != n:
        raise UserError(f"a point has {v.numel()} values but the model has {n} parameters")
    return v.reshape(-1).to(device=obj.device, dtype=torch.float64)


def _minima(obj: Objective, names: Sequence[str], given, steps: int, seed: int,
            train_mode: bool = False) -> dict[str, torch.Tensor]:
    """Per-domain minima: the given ones (domain -> flat), the rest by `closeness.descend` from theta (in
    train mode: of the train-mode loss, masks fixed by seed)."""
    given = dict(given or {})
    todo = [d for d in names if d not in given]
    if todo and int(steps) < 1:
        raise UserError(f"descend_steps (--descent-steps) must be at least 1 to find the minimum of {todo} for the domains "
                        f"plane, got {steps}")
    out = {}
    for d in names:
        if d in given:
            out[d] = flat_of(given[d], obj)
        else:
            from ..closeness import descend
            out[d] = descend(obj, d, steps=steps, seed=seed, train_mode=train_mode).theta.to(obj.device)
    for d in given:
        if d not in out and d in obj.domains:
            out[d] = flat_of(given[d], obj)
    return out


def make_plane(obj: Objective, plane: str, *, seed: int = 0, norm: str = "filter", bias: str = "zero",
               others=None, minima=None, pair=None, domains: Sequence[str] = (), descend_steps: int = 300,
               labels: Sequence[str] | None = None, train_mode: bool = False, trajectories=None,
               trajectory_basis: str = "all", curvature: str = "hessian", eigen_domain: str | None = None,
               descend_others: bool = True) -> dirs.Plane:
    """The plane of a surface: seeded random, through theta and two domain minima, through checkpoints, a
    training trajectory's PCA plane (`trajectories`: run -> {name: checkpoint}) or the top two curvature
    eigenvectors of `eigen_domain` (landscape.surface.trajectory).
    descend_others=False: only the pair's missing minima are found by descent; the other domains' minima are
    marked where given (a descent on, e.g., an OOD cross-entropy can cost more than the whole grid)."""
    if plane not in PLANES:
        raise UserError(f"unknown plane '{plane}'; choose one of {list(PLANES)}")
    if plane == "random":
        return dirs.random_plane(obj, seed, norm, bias)
    if plane == "trajectory":
        from .trajectory import trajectory_plane
        if not trajectories:
            raise UserError("the trajectory plane needs the runs' checkpoints (trajectories={run: {name: point}})")
        runs = {r: {n: flat_of(p, obj) for n, p in pts.items()} for r, pts in dict(trajectories).items()}
        return trajectory_plane(runs, trajectory_basis)
    if plane == "eigen":
        from .trajectory import eigen_plane
        return eigen_plane(obj, domain=eigen_domain, curvature=curvature, seed=seed, train_mode=train_mode)
    theta = get_flat(obj.params(), torch.float64)
    if plane == "checkpoints":
        others = list(others or [])
        if len(others) not in (1, 2):
            raise UserError(f"the checkpoints plane needs 1 or 2 other checkpoints besides the first, got {len(others)}")
        pts = [theta] + [flat_of(o, obj) for o in others]
        names = list(labels) if labels else [f"ckpt{i}" for i in range(len(pts))]
        return dirs.checkpoint_plane(pts, names, params=obj.params(), seed=seed, norm=norm, bias=bias)
    if pair is None:
        cands = [d for d in obj.train_domains if d in domains] or list(obj.train_domains)
        with_min = [d for d in cands if d in (minima or {})]
        pair = (with_min if len(with_min) >= 2 else list(dict.fromkeys(cands + list(domains))))[:2]
    pair = list(pair)
    bad = [d for d in pair if d not in obj.domains]
    if bad or len(set(pair)) != 2:
        raise UserError(f"the domains plane needs two distinct domains of {list(obj.domains)}, got {pair}")
    marked = list(domains) if descend_others else [d for d in domains if d in (minima or {})]
    mins = _minima(obj, list(dict.fromkeys(list(pair) + marked)), minima, descend_steps, seed, train_mode)
    ordered = {d: mins[d] for d in list(pair) + [d for d in mins if d not in pair]}
    return dirs.domain_plane(theta, ordered, pair)


MAX_GRID = 1001  # points per side: a million loss evaluations (the CLI's --grid cap too)


def grid_axes(points: Mapping[str, Sequence[float]], span, grid) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """x, y coordinates and the box: span None -> +-1 if the origin is the only point, else a square around the
    points' bounding box, padded by a quarter of its larger side; a number s -> +-s; or (xmin, xmax, ymin, ymax)."""
    from nexus_opt.limits import check_int

    sides = [grid, grid] if np.isscalar(grid) else list(grid) if isinstance(grid, (list, tuple)) else None
    if sides is None or len(sides) != 2:
        raise UserError(f"grid must be points per side or (nx, ny), got {str(grid)[:100]}")
    nx, ny = (check_int(int(g) if isinstance(g, np.integer) else g, "grid", 2, MAX_GRID,
                        why="points per side (the surface costs nx * ny loss evaluations)") for g in sides)
    if span is None:
        P = np.array([[0.0, 0.0]] + [list(v) for v in points.values()], dtype=float)
        lo, hi = P.min(0), P.max(0)
        side = float(max(hi - lo))
        if side == 0:
            box = [-1.0, 1.0, -1.0, 1.0]
        else:
            c, h = (lo + hi) / 2, 0.75 * side
            box = [c[0] - h, c[0] + h, c[1] - h, c[1] + h]
    elif np.isscalar(span):
        s = float(span)
        if not (s > 0 and np.isfinite(s)):
            raise UserError(f"span must be a positive finite number, got {span}")
        box = [-s, s, -s, s]
    else:
        box = [float(v) for v in span]
        if len(box) != 4 or not (box[0] < box[1] and box[2] < box[3]) or not np.all(np.isfinite(box)):
            raise UserError(f"span must be a number or (xmin, xmax, ymin, ymax), finite, with min < max, got {span}")
    box = [float(v) for v in box]
    return np.linspace(box[0], box[1], nx), np.linspace(box[2], box[3], ny), box

