"""Mode connectivity (issue 21): analytic barriers on a double well, a Bezier curve that goes round a curved
valley, and BatchNorm statistics re-estimated along a path whose points are all the same function."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from landscape import Objective, UserError
from landscape.connect import ConnectResult, barrier, connect


class Vec(torch.nn.Module):
    def __init__(self, init):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(init, dtype=torch.float64).clone())

    def forward(self):
        return self.theta


def wells(start):
    """Domains k (x^2 - 1)^2 + y^2 (k = 1, 3): minima at (+-1, 0), the linear path between them rises to k."""
    def loss(model, b):
        x, y = model()
        return b["k"][0] * (x ** 2 - 1) ** 2 + y ** 2
    doms = {"w1": [{"k": torch.tensor([1.0], dtype=torch.float64)}],
            "w3": [{"k": torch.tensor([3.0], dtype=torch.float64)}]}
    return Objective(Vec(start), doms, loss)


@pytest.mark.parametrize("batch", ["loop", "vmap"])
def test_linear_path_on_a_double_well_has_the_analytic_barrier(batch):
    a, b = wells([-1.0, 0.0]), wells([1.0, 0.0])
    r = connect(a, b, points=21, batch=batch)
    t = np.asarray(r.t)
    x = -1 + 2 * t
    for d, k in (("w1", 1.0), ("w3", 3.0)):
        assert np.allclose(r.linear[d], k * (x ** 2 - 1) ** 2, atol=1e-12)
        assert r.barrier[d] == pytest.approx(k, abs=1e-12) and r.barrier_t[d] == pytest.approx(0.5)
    assert r.barrier["train"] == pytest.approx(2.0, abs=1e-12)  # the uniform mix of the two
    assert r.endpoints == ["theta", "end"] and r.distance == pytest.approx(2.0)
    assert r.settings["bn_reestimated"] is False and r.bezier is None


def test_barrier_is_the_excess_over_the_chord():
    t = np.linspace(0, 1, 5)
    assert barrier([1.0, 2.0, 2.0, 2.0, 3.0], t) == (pytest.approx(0.5), 0.25)
    assert barrier([0.0, -1.0, -2.0, -3.0, -4.0], t)[0] == 0.0  # never above the chord
    assert barrier([0.0, float("nan"), 0.0, 0.0, 0.0], t) == (None, None)


def test_endpoint_at_a_domain_minimum():
    obj = wells([-0.8, 0.3])
    r = connect(obj, "min:w1", points=5)
    assert r.endpoints == ["theta", "min:w1"]
    assert r.linear["w1"][-1] == pytest.approx(0.0, abs=1e-10)


def ring():
    """5 (x^2 + y^2 - 1)^2 - 0.2 y: a curved valley (the unit circle), tilted so that its upper half is lower."""
    def loss(model, b):
        x, y = model()
        return 5 * (x ** 2 + y ** 2 - 1) ** 2 - 0.2 * y
    return loss


def test_bezier_curve_goes_round_a_curved_valley():
    loss = ring()
    a = Objective(Vec([-1.0, 0.0]), {"v": [{"k": torch.ones(1)}]}, loss)
    b = Objective(Vec([1.0, 0.0]), {"v": [{"k": torch.ones(1)}]}, loss)
    r = connect(a, b, bezier=True, points=41, seed=0)
    assert r.barrier["v"] == pytest.approx(5.0, abs=1e-9)  # the segment passes through the centre
    assert r.bezier_barrier["v"] < 0.1 * r.barrier["v"]
    assert r.bezier["v"][0] == pytest.approx(r.linear["v"][0]) and r.bezier["v"][-1] == pytest.approx(r.linear["v"][-1])
    assert r.bezier_training["steps"] == 200
    back = ConnectResult.from_dict(__import__("json").loads(r.to_json()))
    assert back.bezier_barrier == r.bezier_barrier


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6, eps=1e-12)  # eps would break the scale invariance
        self.l2 = torch.nn.Linear(6, 1)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(self.l1(x))))


def bn_pair():
    """A BN net with correct statistics and a copy whose first layer is scaled by 5: the same function once its
    statistics are recomputed (BatchNorm normalises the scale away), but not with the first point's statistics."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randn(32, 1, generator=g, dtype=torch.float64)
    net = BNNet().double()
    net.train()
    with torch.no_grad():
        net.bn.momentum = None
        net.bn.reset_running_stats()
        net(x)
        net.bn.momentum = 0.1
    net.eval()
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.l1.weight.mul_(5)
        other.l1.bias.mul_(5)

    def loss(model, b):
        return ((model(b[0]) - b[1]) ** 2).mean()
    doms = {"a": [(x, y)], "b": [(x[:16] * 2, y[:16])]}
    return Objective(net, doms, loss, train_domains=["a"]), Objective(other, doms, loss, train_domains=["a"])


def test_batchnorm_statistics_are_reestimated_at_every_point():
    A, B = bn_pair()
    before = {k: v.clone() for k, v in A.model.state_dict().items()}
    on = connect(A, B, points=9)  # default: re-estimated (the model has BatchNorm)
    off = connect(A, B, points=9, bn=False)
    assert on.settings["bn_reestimated"] and not off.settings["bn_reestimated"]
    la = A.loss("a")
    # every point is the same function as A once its statistics are recomputed on the training batch 'a'
    assert np.allclose(on.linear["a"], la, rtol=1e-8) and on.barrier["a"] == pytest.approx(0.0, abs=1e-8)
    # with A's statistics the scaled points are other functions: the loss moves along the path
    assert off.linear["a"][0] == pytest.approx(la) and abs(off.linear["a"][-1] - la) > 1e-2
    # the independent truth at the midpoint: statistics computed by hand from the pre-BN activations
    mid = copy.deepcopy(A.model)
    with torch.no_grad():
        mid.l1.weight.mul_(3)
        mid.l1.bias.mul_(3)
        h = mid.l1(A.domains["a"][0][0])
        mid.bn.running_mean.copy_(h.mean(0))
        mid.bn.running_var.copy_(h.var(0, unbiased=True))
    mid.eval()
    xb, yb = A.domains["b"][0]
    with torch.no_grad():
        want = float(((mid(xb) - yb) ** 2).mean())
    assert on.linear["b"][4] == pytest.approx(want, rel=1e-9)
    assert all(torch.equal(v, before[k]) for k, v in A.model.state_dict().items())  # the caller's model unchanged


def test_bad_settings_are_refused():
    a, b = wells([-1.0, 0.0]), wells([1.0, 0.0])
    for kw in (dict(points=2), dict(bn=True), dict(bezier=True, bezier_steps=0)):
        with pytest.raises(UserError):
            connect(a, b, **kw)
    with pytest.raises(UserError):
        connect(a, a)
    with pytest.raises(UserError):
        connect(a, "nope")
