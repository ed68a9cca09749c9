"""The two researcher planes (issue 21): a training trajectory's PCA plane (Li et al. 2018) and the plane of the
top two curvature eigenvectors.

Trajectory: the plane through the final weights of the first run spanned by the first two principal directions
of its checkpoints' displacements theta_i - theta_final (an uncentred PCA, i.e. the SVD of the displacement
matrix, so the plane passes through the final weights); with several runs (same initialisation) `basis='all'`
takes the PCA of every run's checkpoints relative to that one origin (one common plane), `basis='first'` the
first run's plane. Directions are orthonormal: plane coordinates are distances in weight space, each checkpoint
is projected (a, b) = ((theta - o).d1, (theta - o).d2) and its distance from the plane reported. The explained
variance of each direction is sigma_k^2 / sum sigma^2 of the PCA's own displacements.

Eigen: unit eigenvectors of the two largest eigenvalues of the Hessian (or the GGN) of a domain's loss or the
training loss, by the Lanczos already used by `flatness`; along them L(theta + a v1 + b v2) ~ L + (l1 a^2 + l2 b^2)/2.
Signs are fixed (the largest-magnitude entry positive) so the plane is deterministic.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from nexus_opt.errors import UserError

from .. import directions as dirs
from ..objective import TRAIN, Objective

BASES = ("all", "first")


def _orient(v: torch.Tensor) -> torch.Tensor:
    i = int(v.abs().argmax())
    return -v if float(v[i]) < 0 else v


def trajectory_plane(runs: Mapping[str, Mapping[str, torch.Tensor]], basis: str = "all") -> dirs.Plane:
    """The PCA plane of checkpoints: `runs` maps a run label to {checkpoint name: flat weights} in training order
    (names unique over all runs); the origin is the first run's last checkpoint. See the module docstring."""
    if basis not in BASES:
        raise UserError(f"unknown trajectory basis '{basis}'; choose one of {list(BASES)}")
    runs = {str(k): dict(v) for k, v in runs.items()}
    if not runs or any(len(v) == 0 for v in runs.values()):
        raise UserError("a trajectory plane needs at least one run with checkpoints")
    first = next(iter(runs))
    names = [n for v in runs.values() for n in v]
    if len(set(names)) != len(names):
        raise UserError(f"checkpoint names must be unique over the runs, got {names}")
    sizes = {int(p.numel()) for v in runs.values() for p in v.values()}
    if len(sizes) != 1:
        raise UserError(f"checkpoints have different parameter counts {sorted(sizes)}; a plane needs one architecture")
    origin_name = list(runs[first])[-1]
    o = runs[first][origin_name].detach().double()
    pca_runs = runs if basis == "all" else {first: runs[first]}
    rows = [p.detach().double().to(o.device) - o for v in pca_runs.values() for n, p in v.items() if n != origin_name]
    if len(rows) < 2:
        raise UserError("a trajectory plane needs at least 3 checkpoints (2 besides the final one); save "
                        "checkpoints more often (--ckpt-every) or add runs")
    M = torch.stack(rows)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if S.numel() < 2 or float(S[1]) <= 1e-12 * max(float(S[0]), 1e-300):
        raise UserError("the checkpoints lie on a line through the final weights: their PCA has one direction, "
                        "not a plane; use `landscape connect` or more checkpoints")
    d1, d2 = Vh[0].clone(), Vh[1].clone()
    start = M[0]  # orient the axes so that the first run's first checkpoint has positive coordinates
    if float(start @ d1) < 0:
        d1 = -d1
    if float(start @ d2) < 0:
        d2 = -d2
    ev = (S ** 2 / (S ** 2).sum()).tolist()
    pts, off = {}, {}
    for v in runs.values():
        for n, p in v.items():
            r = p.detach().double().to(o.device) - o
            a, b = float(r @ d1), float(r @ d2)
            pts[n], off[n] = [a, b], float((r - a * d1 - b * d2).norm())
    which = "every run's checkpoints" if basis == "all" and len(runs) > 1 else f"the checkpoints of {first}"
    info = {"norm": "none (orthonormal principal directions)", "basis": basis,
            "pca": f"uncentred PCA (SVD) of {which} minus {origin_name} (the first run's final weights)",
            "explained_variance": [float(ev[0]), float(ev[1])], "singular_values": [float(s) for s in S[:4]],
            "paths": {k: list(v) for k, v in runs.items()}, "spanned_by": [origin_name, "PC1", "PC2"],
            "axis_labels": [f"PC1 ({100 * ev[0]:.1f}% of variance)", f"PC2 ({100 * ev[1]:.1f}% of variance)"],
            "title": f"trajectory plane: PCA of {which} (origin {origin_name})", **dirs.basis_stats(d1, d2)}
    return dirs.Plane("trajectory", o, d1, d2, pts, off, info)


def eigen_plane(obj: Objective, *, domain: str | None = None, curvature: str = "hessian", seed: int = 0,
                train_mode: bool = False, tol: float = 1e-6, max_hvps: int | None = None) -> dirs.Plane:
    """The plane of the top two eigenvectors of a domain's (None/'train': the training loss) Hessian or GGN at
    the objective's weights (float64 copy); eigenvalues, residuals and convergence in `info`."""
    from ..ggn import make_operator
    from ..lanczos import lanczos
    from ..params import get_flat

    name = obj.resolve(domain)
    if len(name) != 1:
        raise UserError("the eigen plane takes one domain (a name or 'train'), not several")
    if obj.num_params() < 2:
        raise UserError(f"a 2-D surface needs at least 2 parameters, the model has {obj.num_params()}")
    work = obj.to(dtype=torch.float64)
    op = make_operator(work, name[0], curvature, dtype=None, train_mode=train_mode, copy=False, seed=seed)
    try:
        res = lanczos(op, 2, "top", tol=tol, max_hvps=max_hvps, seed=seed, return_vectors=True)
    finally:
        op.release()
    V = res.vectors.to(dtype=torch.float64)
    theta = get_flat(obj.params(), torch.float64)
    d1, d2 = _orient(V[:, 0]).to(theta.device), _orient(V[:, 1]).to(theta.device)
    lam = [float(v) for v in res.eigenvalues[:2]]
    label = "training loss" if name[0] == TRAIN else name[0]
    kind = "GGN" if curvature == "ggn" else "Hessian"
    info = {"norm": "none (unit eigenvectors)", "curvature": curvature, "domain": name[0], "eigenvalues": lam,
            "residuals": [float(v) for v in res.residuals[:2]], "converged": bool(all(res.converged[:2])),
            "hvps": int(res.hvps), "tol": float(tol), "spanned_by": ["theta", "v1", "v2"],
            "axis_labels": [f"v1 ({kind} λ1 = {lam[0]:.4g})", f"v2 ({kind} λ2 = {lam[1]:.4g})"],
            "title": f"top {kind} eigenvectors of the {label}" + ("" if all(res.converged[:2]) else
                                                                  " (Lanczos NOT converged)"),
            **dirs.basis_stats(d1, d2)}
    return dirs.Plane("eigen", theta, d1, d2, {"theta": [0.0, 0.0]}, {"theta": 0.0}, info)


def run_checkpoints(obj: Objective, run_dir, label: str | None = None) -> dict[str, torch.Tensor]:
    """Every checkpoint of a training run as flat weights in obj.params() order, by step: {'<label>@<step>': w}.
    Only the weights are read (validated, never unpickled); they must fit obj's parameters."""
    from pathlib import Path

    from nexus_opt import checkpoint as ck

    paths = ck.list_checkpoints(run_dir)
    if not paths:
        raise UserError(f"'{run_dir}' has no checkpoints (ckpt-* directories): the trajectory plane needs a run "
                        "directory written by `landscape train`")
    label = label or Path(run_dir).name
    mine = obj.params()
    out = {}
    for p in paths:
        c = ck.read_checkpoint(p)
        state = c.model_state()
        bad = [n for n, v in mine.items() if n not in state or tuple(state[n].shape) != tuple(v.shape)]
        if bad:
            raise UserError(f"checkpoint {p} does not fit the model of the first run (parameters {bad[:3]}); the "
                            "runs of one trajectory plane need one architecture")
        out[f"{label}@{c.step}"] = torch.cat([state[n].detach().reshape(-1).double() for n in mine])
    return out
