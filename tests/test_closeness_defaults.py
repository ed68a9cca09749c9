"""closeness with DEFAULT settings reaches the analytic nearest minima (issue 10): convex quadratics and
over-parameterised least squares, where the nearest minimiser is the projection theta + X^+(y - X theta)."""
from __future__ import annotations

import pytest
import torch

from landscape import Objective, closeness, descend


class Vec(torch.nn.Module):
    """theta itself: the model of a quadratic."""

    def __init__(self, init):
        super().__init__()
        self.theta = torch.nn.Parameter(init.clone())

    def forward(self):
        return self.theta


class Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return x @ self.w


def quadratic_case(dtype=torch.float64):
    """Three 8-parameter convex quadratics 1/2 (t - m_k)^T A_k (t - m_k), condition number ~200."""
    g = torch.Generator().manual_seed(10)
    doms, minima = {}, {}
    for k in range(3):
        Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
        A = Q @ torch.diag(torch.logspace(-1, 1.3, 8, dtype=torch.float64)) @ Q.T
        m = torch.randn(8, generator=g, dtype=torch.float64) * 1.2
        doms[f"q{k}"] = [{"A": A.to(dtype)[None], "m": m.to(dtype)[None]}]
        minima[f"q{k}"] = m.to(dtype).double()

    def loss(model, b):
        d = model() - b["m"][0]
        return 0.5 * d @ (b["A"][0] @ d)
    theta = torch.zeros(8, dtype=dtype)
    return Objective(Vec(theta), doms, loss), minima


def least_squares_case(dtype=torch.float64):
    """40 weights, 12 examples per domain (3 domains): each domain's minimisers form a 28-dim affine set."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(40, generator=g, dtype=torch.float64) * 0.3
    doms = {f"d{k}": [{"x": torch.randn(12, 40, generator=g, dtype=torch.float64).to(dtype),
                       "y": (torch.randn(12, generator=g, dtype=torch.float64) * 3).to(dtype)}] for k in range(3)}

    def loss(model, b):
        return ((model(b["x"]) - b["y"]) ** 2).mean()
    return Objective(Linear(w0.to(dtype)), doms, loss), w0


def test_default_closeness_on_convex_quadratics_matches_analytic_minima():
    obj, minima = quadratic_case()
    theta = obj.params()["theta"].detach().clone()
    r = closeness(obj, keep_minima=True)
    assert r.all_converged and r.settings["optimizer"] == "newton-cg"
    for d, m in minima.items():
        assert r.stop[d] == "gradient" and r.grad_norm_min[d] <= 1e-8 * r.grad_norm_start[d] + 1e-12
        torch.testing.assert_close(torch.tensor(r.minima[d], dtype=torch.float64), m, atol=1e-6, rtol=0)
        assert r.distance[d]["raw"] == pytest.approx(float((m - theta).norm()), abs=1e-6)
    stack = torch.stack(list(minima.values()))
    assert r.spread == pytest.approx(float(((stack - stack.mean(0)) ** 2).sum(1).mean()), abs=1e-6)
    assert r.mean_sq_distance == pytest.approx(float(((stack - theta) ** 2).sum(1).mean()), abs=1e-6)
    # the old default (Adam, lr 1e-3, 300 steps) walks ~0.5 of the ~3-4 units and says so
    adam = descend(obj, "q0", optimizer="adamw", steps=300)
    assert not adam.converged and adam.stop == "steps"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_default_closeness_on_overparameterised_least_squares_is_the_projection(dtype):
    obj, w0 = least_squares_case(dtype)
    r = closeness(obj, keep_minima=True, curvature=False)
    assert r.all_converged
    w = obj.params()["w"].detach().double()
    for d, (b,) in obj.domains.items():
        X, y = b["x"].double(), b["y"].double()
        proj = w + torch.linalg.pinv(X) @ (y - X @ w)  # the closest minimiser to the checkpoint
        torch.testing.assert_close(torch.tensor(r.minima[d], dtype=torch.float64), proj, atol=1e-6, rtol=0)
        assert r.distance[d]["raw"] == pytest.approx(float((proj - w).norm()), abs=1e-6)
        assert r.loss_min[d] < 1e-10  # interpolation


def test_default_descent_converges_on_bowls_and_train_loss():
    from tests.test_closeness import bowls
    obj, s, *_ = bowls(seed=1, dim=4)
    for d in [*obj.train_domains, None]:
        r = descend(obj, d)
        assert r.converged and r.stop == "gradient" and r.evals <= 100
        torch.testing.assert_close(r.theta, s.minimum(d), atol=1e-6, rtol=0)


def test_budget_counts_evaluations_and_unconverged_is_marked():
    obj, _ = least_squares_case()
    r = descend(obj, "d0", max_evals=4)
    assert not r.converged and r.stop == "budget" and r.evals <= 4
