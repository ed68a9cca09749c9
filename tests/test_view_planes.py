"""Trajectory (PCA) and eigenvector planes (issue 21): a path in a known plane is recovered exactly and its
projections reconstruct each checkpoint; the surface along a quadratic's eigenvectors is the known one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape import Objective, UserError, surface
from landscape.surface.trajectory import trajectory_plane


class Vec(torch.nn.Module):
    def __init__(self, init):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(init, dtype=torch.float64).clone())

    def forward(self):
        return self.theta


def planar_runs(n=12, seed=0):
    """Two runs whose checkpoints all lie in the plane final + span(u, w) of R^n."""
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(n, generator=g, dtype=torch.float64)
    u, w = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    s = np.linspace(0, 1, 6)
    run1 = {f"a{i}": final + (1 - t) * 2.0 * u + np.sin(3 * t) * (1 - t) * w for i, t in enumerate(s)}
    run2 = {f"b{i}": final + (1 - t) * 2.0 * u - 0.7 * t * w + 0.3 * t * u for i, t in enumerate(s)}
    return final, u, w, {"r1": run1, "r2": run2}


def test_a_planar_path_is_recovered_and_reconstructed_exactly():
    final, u, w, runs = planar_runs()
    pl = trajectory_plane(runs, "all")
    B = torch.stack([u, w], 1)
    P = B @ torch.linalg.pinv(B)  # projector on span(u, w)
    D = torch.stack([pl.d1, pl.d2], 1)
    assert torch.allclose(D @ D.T, P, atol=1e-10)  # the plane is span(u, w)
    assert torch.allclose(D.T @ D, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.equal(pl.origin, runs["r1"]["a5"])  # origin: the first run's final weights
    for r in runs.values():
        for name, p in r.items():
            a, b = pl.points[name]
            assert torch.allclose(pl.origin + a * pl.d1 + b * pl.d2, p, atol=1e-10)
            assert pl.offplane[name] < 1e-10
    assert sum(pl.info["explained_variance"]) == pytest.approx(1.0, abs=1e-12)
    assert pl.info["paths"] == {"r1": list(runs["r1"]), "r2": list(runs["r2"])}


def test_first_basis_and_off_plane_points():
    final, u, w, runs = planar_runs()
    g = torch.Generator().manual_seed(9)
    runs["r2"] = {k: v + 0.1 * torch.randn(v.numel(), generator=g, dtype=torch.float64) for k, v in runs["r2"].items()}
    pl = trajectory_plane(runs, "first")
    for name, p in runs["r1"].items():
        assert pl.offplane[name] < 1e-10
    for name, p in runs["r2"].items():  # off the first run's plane: projected, distance reported
        a, b = pl.points[name]
        r = p - pl.origin
        assert pl.offplane[name] == pytest.approx(float((r - a * pl.d1 - b * pl.d2).norm()), rel=1e-9)
        assert pl.offplane[name] > 1e-3
    with pytest.raises(UserError):
        trajectory_plane({"r": {"x": final, "y": final + u, "z": final + 2 * u}})  # collinear
    with pytest.raises(UserError):
        trajectory_plane(runs, "nope")


def quadratic(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T
    m = torch.randn(n, generator=g, dtype=torch.float64)

    def loss(model, b):
        d = model() - m
        return 0.5 * d @ (b["A"][0] @ d)
    return Objective(Vec(m), {"q": [{"A": A[None]}], "h": [{"A": (2 * A)[None]}]}, loss), Q


def test_trajectory_surface_draws_the_path_and_losses_match():
    obj, Q = quadratic([3.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    m = obj.model.theta.detach().clone()
    runs = {"run": {f"s{i}": m + (1 - t) * (Q[:, 0] + t * Q[:, 1]) for i, t in enumerate(np.linspace(0, 1, 5))}}
    r = surface(obj, plane="trajectory", trajectories=runs, grid=7, batch="loop")
    assert r.plane == "trajectory" and r.normalization["paths"] == {"run": list(runs["run"])}
    assert "PC1" in r.normalization["axis_labels"][0] and "%" in r.normalization["axis_labels"][0]
    for name, p in runs["run"].items():  # each checkpoint's loss at its plane coordinates is its own loss
        d = p - m
        assert r.point_losses[name]["q"] == pytest.approx(float(0.5 * d @ (obj.domains["q"][0]["A"][0] @ d)), abs=1e-12)


def test_eigen_plane_surface_is_the_known_quadratic():
    eigs = [3.0, 1.5, 0.5, 0.2, 0.1, 0.05]
    obj, Q = quadratic(eigs)  # domains A and 2A: the training loss is 1.5 A
    r = surface(obj, plane="eigen", grid=5, span=0.5, batch="loop")
    info = r.normalization
    assert info["converged"] and info["eigenvalues"] == pytest.approx([4.5, 2.25], rel=1e-6)
    D = np.asarray(r.directions)
    assert abs(abs(D[0] @ Q[:, 0].numpy()) - 1) < 1e-6 and abs(abs(D[1] @ Q[:, 1].numpy()) - 1) < 1e-6
    X, Y = np.meshgrid(r.x, r.y)
    for d, k in (("q", 1.0), ("h", 2.0)):
        assert np.allclose(r.losses[d], k * 0.5 * (eigs[0] * X ** 2 + eigs[1] * Y ** 2), atol=1e-8)
    assert "λ1 = 4.5" in info["axis_labels"][0]
    r2 = surface(obj, plane="eigen", grid=3, span=0.5, eigen_domain="h", batch="loop")
    assert r2.normalization["eigenvalues"] == pytest.approx([6.0, 3.0], rel=1e-6)
    assert r2.settings["eigen_domain"] == "h"


def test_ggn_eigen_plane_of_least_squares():
    """Least squares at an exact fit: GGN = Hessian = 2/M X^T X, the surface is exactly (l1 a^2 + l2 b^2)/2."""
    from landscape.losses import MeanSquaredError

    g = torch.Generator().manual_seed(2)
    Xd = torch.randn(20, 7, generator=g, dtype=torch.float64)
    w0 = torch.randn(1, 7, generator=g, dtype=torch.float64)
    net = torch.nn.Linear(7, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(w0)
    obj = Objective(net, {"d": [{"x": Xd, "y": (Xd @ w0.T).squeeze(-1)}]}, MeanSquaredError())
    H = 2 / 20 * Xd.T @ Xd
    ev, V = torch.linalg.eigh(H)
    r = surface(obj, plane="eigen", curvature="ggn", grid=5, span=0.3, batch="loop")
    assert r.normalization["eigenvalues"] == pytest.approx([float(ev[-1]), float(ev[-2])], rel=1e-6)
    assert r.settings["curvature"] == "ggn"
    A, B = np.meshgrid(r.x, r.y)
    assert np.allclose(r.losses["d"], 0.5 * (float(ev[-1]) * A ** 2 + float(ev[-2]) * B ** 2), atol=1e-10)
