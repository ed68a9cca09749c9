"""Directions for loss surfaces: filter-normalised random planes and planes/lines through given points.

Filter normalisation (Li et al. 2018): a Gaussian direction is rescaled filter by filter so that each
output filter (row of a weight matrix, output channel of a conv, row of an embedding) has the norm of
the matching weight filter; a plot's unit step then means "as large as the weights" in every layer.
1-D parameters (biases, LayerNorm/BatchNorm scales and shifts) follow an explicit `bias` policy:
"zero" (default; Li et al.'s `ignore='biasbn'`: the direction does not move them) or "filter" (the
whole 1-D parameter is one filter, scaled to its norm). A model with no parameter of 2 or more
dimensions (the bowls `Point`) has no biases to ignore: its 1-D parameters are its weights and are
treated as filters whatever the policy (recorded as `bias_used`).

Orthogonality *and* normalisation, both exactly: the second direction is Gram-Schmidt orthogonalised
against the first *within every filter* and then rescaled filter by filter. Each filter of d2 is then
orthogonal to the matching filter of d1, so the whole vectors are orthogonal (the dot product is the
sum of per-filter dot products), and rescaling a filter keeps it orthogonal. A filter of one element
cannot be both orthogonal and of non-zero norm; such filters of d2 are zeroed and counted
(`d2_zeroed_filters`). Norms, cosine and the largest per-filter norm error are reported in `info`.

Planes through points (theta and two per-domain minima, or three checkpoints) use an orthogonal,
isometric basis: e1 = p1 - origin, e2 = the part of p2 - origin orthogonal to e1, rescaled to |e1|.
Equal steps along x and y are equal distances in weight space, so the plot is undistorted; every
point's plane coordinates (and its distance from the plane) are reported.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError

from .params import get_flat

NORMS = ("filter", "layer", "none")
BIAS_POLICIES = ("zero", "filter")


@dataclasses.dataclass
class Plane:
    """A 2-D affine slice of weight space: origin + a*d1 + b*d2, with named points in (a, b) coordinates."""

    kind: str
    origin: torch.Tensor  # flat float64
    d1: torch.Tensor
    d2: torch.Tensor
    points: dict  # name -> [a, b]
    offplane: dict  # name -> distance of the point from the plane (0 for points that span it)
    info: dict  # normalisation, seed, norms, cosine, basis

    def at(self, a: float, b: float) -> torch.Tensor:
        """The flat weights at plane coordinates (a, b)."""
        return self.origin + a * self.d1 + b * self.d2


def _as_params(params_or_obj) -> Mapping[str, torch.Tensor]:
    return params_or_obj.params() if hasattr(params_or_obj, "params") else params_or_obj


def _layout(params: Mapping[str, torch.Tensor], norm: str, bias: str) -> tuple[list[tuple[slice, int, str]], str]:
    """Per parameter: (flat slice, number of filters, 'scale' or 'zero'), and the bias policy in force."""
    if norm not in NORMS:
        raise UserError(f"unknown direction normalisation '{norm}'; choose one of {list(NORMS)}")
    if bias not in BIAS_POLICIES:
        raise UserError(f"unknown bias policy '{bias}'; choose one of {list(BIAS_POLICIES)}")
    has_matrix = any(p.dim() >= 2 for p in params.values())
    bias_used = bias if has_matrix else "filter"
    out, i = [], 0
    for p in params.values():
        k = p.numel()
        sl = slice(i, i + k)
        i += k
        if p.dim() <= 1:
            out.append((sl, 1, "zero" if bias_used == "zero" else "scale"))
        elif norm == "filter":
            out.append((sl, int(p.shape[0]), "scale"))
        else:
            out.append((sl, 1, "scale"))
    return out, bias_used


def _rownorm(m: torch.Tensor) -> torch.Tensor:
    return m.norm(dim=1, keepdim=True)


def _rescale(d: torch.Tensor, w: torch.Tensor, layout, norm: str) -> None:
    """In place: each filter of d scaled to the norm of w's filter ('none': only the zero policy applies)."""
    for sl, rows, how in layout:
        if how == "zero":
            d[sl] = 0
        elif norm != "none":
            D, W = d[sl].view(rows, -1), w[sl].view(rows, -1)
            dn = _rownorm(D)
            D.mul_(torch.where(dn > 0, _rownorm(W) / dn.clamp_min(1e-300), torch.zeros_like(dn)))


def _orthogonalise(d2: torch.Tensor, d1: torch.Tensor, layout, norm: str) -> int:
    """In place: d2 made orthogonal to d1 filter by filter (whole vector for 'none'); returns zeroed filters."""
    if norm == "none":
        before = d2.norm()
        d2.sub_((d2 @ d1) / (d1 @ d1).clamp_min(1e-300) * d1)
        d2.mul_(before / d2.norm().clamp_min(1e-300))
        return 0
    zeroed = 0
    for sl, rows, how in layout:
        if how == "zero":
            continue
        D2, D1 = d2[sl].view(rows, -1), d1[sl].view(rows, -1)
        before = _rownorm(D2)
        n11 = (D1 * D1).sum(1, keepdim=True)
        D2.sub_(torch.where(n11 > 0, (D2 * D1).sum(1, keepdim=True) / n11.clamp_min(1e-300), 0.0) * D1)
        degenerate = (_rownorm(D2) <= 1e-6 * before) & (before > 0)
        if D2.shape[1] == 1:
            degenerate = before > 0
        zeroed += int(degenerate.sum())
        D2.mul_((~degenerate).to(D2.dtype))
    return zeroed


def _filter_error(d: torch.Tensor, w: torch.Tensor, layout, norm: str) -> float:
    """Largest relative gap between a direction's filter norms and the weights' (0 where zeroed)."""
    if norm == "none":
        return 0.0
    worst = 0.0
    for sl, rows, how in layout:
        if how == "zero":
            continue
        dn, wn = _rownorm(d[sl].view(rows, -1)), _rownorm(w[sl].view(rows, -1))
        live = dn > 0
        if live.any():
            worst = max(worst, float(((dn - wn).abs() / wn.clamp_min(1e-300))[live].max()))
    return worst


def gaussian(n: int, seed: int, device=None) -> torch.Tensor:
    """A seeded standard normal vector in float64, drawn on the CPU (identical on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=g, dtype=torch.float64).to(device)


def normalize(direction: torch.Tensor, params_or_obj, norm: str = "filter", bias: str = "zero") -> torch.Tensor:
    """A copy of a flat direction, filter- (or layer-) normalised to the weights of `params`."""
    params = _as_params(params_or_obj)
    layout, _ = _layout(params, norm, bias)
    w = get_flat(params, torch.float64)
    d = direction.detach().to(device=w.device, dtype=torch.float64).clone()
    _rescale(d, w, layout, norm)
    return d


def random_direction(params_or_obj, seed: int = 0, norm: str = "filter", bias: str = "zero") -> torch.Tensor:
    """One seeded Gaussian direction, normalised (float64, on the parameters' device)."""
    params = _as_params(params_or_obj)
    w = get_flat(params, torch.float64)
    return normalize(gaussian(w.numel(), seed, w.device), params, norm, bias)


def random_plane(params_or_obj, seed: int = 0, norm: str = "filter", bias: str = "zero") -> Plane:
    """Two seeded, normalised, exactly orthogonal directions around the current weights (seeds seed, seed+1)."""
    params = _as_params(params_or_obj)
    layout, bias_used = _layout(params, norm, bias)
    w = get_flat(params, torch.float64)
    if w.numel() < 2:
        raise UserError(f"a 2-D surface needs at least 2 parameters, the model has {w.numel()}; use `line` instead")
    d1 = gaussian(w.numel(), seed, w.device)
    d2 = gaussian(w.numel(), seed + 1, w.device)
    _rescale(d1, w, layout, norm)
    _rescale(d2, w, layout, norm)
    zeroed = _orthogonalise(d2, d1, layout, norm)
    _rescale(d2, w, layout, norm)
    if float(d1.norm()) == 0 or float(d2.norm()) == 0:
        raise UserError("a random direction came out zero (every filter of the model is a single number or has "
                        "zero weights); use norm='layer' or norm='none', or bias='filter'")
    info = {"seeds": [int(seed), int(seed) + 1], "norm": norm, "bias": bias, "bias_used": bias_used,
            "d2_zeroed_filters": zeroed, "n_filters": sum(r for _, r, h in layout if h == "scale"),
            "filter_norm_error": max(_filter_error(d1, w, layout, norm), _filter_error(d2, w, layout, norm)),
            **basis_stats(d1, d2)}
    return Plane("random", w, d1, d2, {"theta": [0.0, 0.0]}, {"theta": 0.0}, info)


def basis_stats(d1: torch.Tensor, d2: torch.Tensor) -> dict:
    """Norms of the two directions and the cosine between them (computed in float64)."""
    a, b = d1.double(), d2.double()
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    return {"d1_norm": na, "d2_norm": nb, "cos": cos}


def coordinates(plane_origin: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, p: torch.Tensor) -> tuple[float, float, float]:
    """(a, b, distance from the plane) of a flat point: least squares in the (d1, d2) basis."""
    r = p.double().to(plane_origin.device) - plane_origin.double()
    B = torch.stack([d1.double(), d2.double()], 1)
    G = B.T @ B
    ab = torch.linalg.solve(G, B.T @ r)
    off = float((r - B @ ab).norm())
    return float(ab[0]), float(ab[1]), off


def plane_through(origin: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, kind: str,
                  names: Sequence[str] = ("origin", "p1", "p2"), extra: Mapping[str, torch.Tensor] | None = None) -> Plane:
    """The plane through three flat points in an orthogonal isometric basis (origin at the first)."""
    o = origin.detach().double()
    u = p1.detach().double().to(o.device) - o
    v = p2.detach().double().to(o.device) - o
    nu = float(u.norm())
    if nu == 0:
        raise UserError(f"'{names[1]}' coincides with '{names[0]}': no plane passes through them; pick distinct points")
    vp = v - (v @ u) / (u @ u) * u
    nvp = float(vp.norm())
    if nvp <= 1e-9 * max(float(v.norm()), nu):
        raise UserError(f"'{names[0]}', '{names[1]}' and '{names[2]}' are collinear: they span a line, not a plane; "
                        "use `line` or another point")
    d2 = vp * (nu / nvp)
    pts = {names[0]: [0.0, 0.0], names[1]: [1.0, 0.0], names[2]: [float(v @ u) / (nu * nu), nvp / nu]}
    off = {n: 0.0 for n in names}
    for n, p in (extra or {}).items():
        a, b, dist = coordinates(o, u, d2, p)
        pts[n], off[n] = [a, b], dist
    info = {"basis": "orthogonal, |d1| = |d2| = |p1 - origin|", "spanned_by": list(names), **basis_stats(u, d2)}
    return Plane(kind, o, u, d2, pts, off, info)


def domain_plane(theta: torch.Tensor, minima: Mapping[str, torch.Tensor], pair: Sequence[str] | None = None) -> Plane:
    """The plane through theta and two domains' minima; every other given minimum is projected onto it."""
    names = list(minima)
    pair = list(pair) if pair else names[:2]
    if len(pair) != 2 or len(set(pair)) != 2:
        raise UserError(f"the domains plane needs two distinct domains, got {pair}")
    for d in pair:
        if d not in minima:
            raise UserError(f"no minimum for domain '{d}'; minima are known for {names}")
    keys = {d: f"min:{d}" for d in names}
    extra = {keys[d]: minima[d] for d in names if d not in pair}
    pl = plane_through(theta, minima[pair[0]], minima[pair[1]], "domains",
                       names=("theta", keys[pair[0]], keys[pair[1]]), extra=extra)
    pl.info["pair"] = pair
    return pl


def checkpoint_plane(points: Sequence[torch.Tensor], names: Sequence[str] | None = None, *, params=None,
                     seed: int = 0, norm: str = "filter", bias: str = "zero") -> Plane:
    """The plane through 3 checkpoints (origin = first), or through 2 and a seeded random direction."""
    names = list(names or [f"ckpt{i}" for i in range(len(points))])
    n = {int(p.numel()) for p in points}
    if len(n) != 1:
        raise UserError(f"checkpoints have different parameter counts {sorted(n)}; a plane needs one architecture")
    if len(points) == 3:
        return plane_through(points[0], points[1], points[2], "checkpoints", names=names)
    if len(points) != 2:
        raise UserError(f"the checkpoints plane needs 2 or 3 checkpoints, got {len(points)}")
    if params is None:
        raise UserError("a plane through 2 checkpoints needs the parameters (for its random second direction)")
    o = points[0].detach().double()
    u = points[1].detach().double().to(o.device) - o
    r = random_direction(params, seed, norm, bias).to(o.device)
    pl = plane_through(o, o + u, o + u.norm() / r.norm().clamp_min(1e-300) * r, "checkpoints",
                       names=(names[0], names[1], "random"))
    del pl.points["random"], pl.offplane["random"]
    pl.info.update({"spanned_by": [names[0], names[1]], "second_direction": "random", "seeds": [int(seed)],
                    "norm": norm, "bias": bias})
    return pl


def segment(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(origin, direction) of the line start + t*(end - start): t = 0 at start, 1 at end."""
    s = start.detach().double()
    e = end.detach().double().to(s.device)
    if float((e - s).norm()) == 0:
        raise UserError("the line's two ends are the same point; pick distinct points")
    return s, e - s


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()
