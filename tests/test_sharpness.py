"""Sharpness (issue 21) against closed forms on quadratics, a plain reference loop, and the invariance of the
adaptive ball under a function-preserving ReLU rescaling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape import Objective, UserError
from landscape.sharpness import SharpnessResult, scaling, sharpness


class Vec(torch.nn.Module):
    def __init__(self, init):
        super().__init__()
        self.theta = torch.nn.Parameter(init.clone())

    def forward(self):
        return self.theta


def quadratic(eigs, n_dom=2, seed=0, at_min=True):
    """Domains 1/2 (t - m)^T A_k (t - m) with known spectra; theta at their common minimum m (or off it)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    m = torch.randn(n, generator=g, dtype=torch.float64)
    doms, As = {}, {}
    for k in range(n_dom):
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        A = Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64) * (k + 1)) @ Q.T
        doms[f"q{k}"] = [{"A": A[None]}]
        As[f"q{k}"] = A

    def loss(model, b):
        d = model() - m
        return 0.5 * d @ (b["A"][0] @ d)
    start = m if at_min else m + 0.3
    return Objective(Vec(start), doms, loss), As


EIGS = [4.0, 2.0, 1.0, 0.5, 0.25, 0.1]


def test_defaults_match_closed_forms_at_a_quadratic_minimum():
    obj, As = quadratic(EIGS)
    before = obj.model.theta.detach().clone()
    r = sharpness(obj)  # defaults: rho 0.05 absolute, 20 ascent steps, 50 antithetic pairs
    rho, n = r.rho, len(EIGS)
    As["train"] = 0.5 * (As["q0"] + As["q1"])
    assert r.domains == ["q0", "q1", "train"]
    for d, A in As.items():
        ev = torch.linalg.eigvalsh(A)
        s = r[d]
        assert s.worst_converged
        assert s.worst == pytest.approx(rho ** 2 * float(ev[-1]) / 2, rel=1e-3)
        want = rho ** 2 * float(ev.sum()) / (2 * n)
        assert s.average_stderr > 0 and abs(s.average - want) < 4 * s.average_stderr
        assert s.average_stderr < 0.3 * want
        assert s.worst_radius == pytest.approx(rho, rel=1e-9)
    assert torch.equal(obj.model.theta.detach(), before)


def test_worst_case_off_the_minimum_matches_a_dense_reference():
    """Off the minimum the maximiser of g.u + 1/2 u^T A u on ||u|| = rho solves (A - mu I) u = -g (trust-region
    secular equation): computed independently by bisection on mu > lambda_max."""
    obj, As = quadratic(EIGS, n_dom=1, at_min=False)
    rho = 0.2
    r = sharpness(obj, domains="q0", rho=rho, steps=60, average=False)
    A = As["q0"].numpy()
    gvec = A @ np.full(len(EIGS), 0.3)
    lam = np.linalg.eigvalsh(A)[-1]
    lo, hi = lam + 1e-12, lam + 1e3
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        u = np.linalg.solve(A - mu * np.eye(len(EIGS)), -gvec)
        lo, hi = (mu, hi) if np.linalg.norm(u) > rho else (lo, mu)
    u *= rho / np.linalg.norm(u)
    want = gvec @ u + 0.5 * u @ A @ u
    assert r["q0"].worst == pytest.approx(want, rel=1e-6)
    assert r["q0"].worst_converged


def test_average_case_matches_a_plain_reference_loop():
    obj, As = quadratic(EIGS, n_dom=1)
    r = sharpness(obj, domains="q0", worst=False, samples=8, seed=3, batch="loop")
    rv = sharpness(obj, domains="q0", worst=False, samples=8, seed=3, batch="vmap")
    theta = obj.model.theta.detach().double()
    gen = torch.Generator().manual_seed(3 + 1)
    sigma = r.rho / math.sqrt(len(EIGS))
    Z = torch.randn(8, len(EIGS), generator=gen, dtype=torch.float64) * sigma
    A = As["q0"]
    vals = [float(0.5 * z @ A @ z) for z in Z]  # (L(t+z) + L(t-z))/2 - L(t) at the minimum
    assert r["q0"].average == pytest.approx(np.mean(vals), rel=1e-10)
    assert rv["q0"].average == pytest.approx(np.mean(vals), rel=1e-10)
    assert r["q0"].average_stderr == pytest.approx(np.std(vals, ddof=1) / math.sqrt(8), rel=1e-8)
    assert torch.equal(obj.model.theta.detach().double(), theta)


class ReLUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(3, 5)
        self.l2 = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def relu_objective(scale=None):
    torch.manual_seed(0)
    net = ReLUNet().double()
    if scale is not None:  # function-preserving: hidden unit i scaled by a_i in, 1/a_i out
        with torch.no_grad():
            net.l1.weight.mul_(scale[:, None])
            net.l1.bias.mul_(scale)
            net.l2.weight.div_(scale[None, :])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)

    def loss(model, b):
        return ((model(b[0]) - b[1]) ** 2).mean()
    return Objective(net, {"a": [(x, y)]}, loss)


@pytest.mark.parametrize("adaptive,scale", [("elementwise", torch.tensor([0.2, 3.0, 1.0, 7.0, 0.5], dtype=torch.float64)),
                                            ("filter", torch.full((5,), 4.0, dtype=torch.float64))])
def test_adaptive_sharpness_is_invariant_under_relu_rescaling(adaptive, scale):
    a, b = relu_objective(), relu_objective(scale)
    assert a.loss("a") == pytest.approx(b.loss("a"), rel=1e-12)  # the same function
    kw = dict(domains="a", rho=0.1, adaptive=adaptive, samples=6, seed=2, steps=10)
    ra, rb = sharpness(a, **kw), sharpness(b, **kw)
    assert ra["a"].worst == pytest.approx(rb["a"].worst, rel=1e-8)
    assert ra["a"].average == pytest.approx(rb["a"].average, rel=1e-8)
    # the absolute ball is not invariant: the rescaled net has a different sharpness
    ka, kb = sharpness(a, domains="a", rho=0.1, average=False), sharpness(b, domains="a", rho=0.1, average=False)
    assert abs(ka["a"].worst - kb["a"].worst) > 1e-3 * abs(ka["a"].worst)


def test_scaling_vectors():
    obj = relu_objective()
    p = obj.params()
    assert torch.equal(scaling(p, "none"), torch.ones(obj.num_params(), dtype=torch.float64))
    assert torch.equal(scaling(p, "elementwise")[:15], p["l1.weight"].detach().abs().reshape(-1))
    f = scaling(p, "filter")
    assert torch.allclose(f[:3], p["l1.weight"].detach()[0].norm().expand(3))
    assert torch.allclose(f[15:20], p["l1.bias"].detach().norm().expand(5))


def test_budget_stop_is_reported_and_bad_settings_refused():
    obj, _ = quadratic([1.0, 0.999, 0.998, 0.5], n_dom=1)  # a tiny gap: 2 steps cannot settle the direction
    r = sharpness(obj, domains="q0", steps=2, average=False)
    assert r["q0"].worst_steps == 2 and r["q0"].worst_converged is False
    for kw in (dict(rho=0), dict(rho=float("nan")), dict(adaptive="x"), dict(samples=1), dict(steps=0),
               dict(worst=False, average=False), dict(tol=2)):
        with pytest.raises(UserError):
            sharpness(obj, **kw)


def test_train_mode_and_json_roundtrip():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    obj = Objective(net, {"a": [(x, y)], "b": [(x + 1, y)]}, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    r1 = sharpness(obj, train_mode=True, seed=5, samples=4, steps=3)
    r2 = sharpness(obj, train_mode=True, seed=5, samples=4, steps=3)
    assert r1["train"].worst == r2["train"].worst and r1["a"].average == r2["a"].average  # masks fixed by seed
    r3 = sharpness(obj, train_mode=False, seed=5, samples=4, steps=3)
    assert r3["a"].loss != r1["a"].loss
    back = SharpnessResult.from_dict(__import__("json").loads(r1.to_json()))
    assert back["a"].worst == r1["a"].worst and back.settings["train_mode"] is True
