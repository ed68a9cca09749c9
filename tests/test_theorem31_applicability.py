"""Theorem 3.1 is reported only where it applies: at a stationary point of the average loss (stated criterion:
||(1/N) sum_k g_k|| <= 0.05 (1/N) sum_k ||g_k||). After the default bowls training the point is not stationary
(not applicable, in the JSON, the table and the figure); at the training-loss minimum it is (bound reported)."""
from __future__ import annotations

import torch
import pytest

from landscape import Objective, closeness, load
from landscape.closeness import STATIONARY_RTOL, stationarity_check
from nexus_opt.models import Point
from nexus_opt.suites import make_suite


def test_criterion_is_the_stated_ratio():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.04])
    st = stationarity_check([g1, g2])
    assert st["stationarity"] == pytest.approx(0.02)
    assert st["relative_stationarity"] == pytest.approx(0.02 / ((1 + (1 + 0.04 ** 2) ** 0.5) / 2))
    assert st["applicable"] and str(STATIONARY_RTOL) in st["criterion"]
    assert not stationarity_check([g1, torch.tensor([0.0, 1.0])])["applicable"]
    assert stationarity_check([torch.zeros(2), torch.zeros(2)])["applicable"]  # every gradient zero


def test_default_bowls_run_is_not_stationary_so_not_applicable(tmp_path):
    from nexus_opt.train import TrainConfig, train

    from conftest import invoke_cli

    train(TrainConfig(suite="bowls", device="cpu", out=str(tmp_path / "run")))  # the `landscape train` defaults
    r = closeness(load(tmp_path / "run"))
    b = r.bound
    assert r.converged and b["applicable"] is False and b["relative_stationarity"] > STATIONARY_RTOL
    assert b["value"] is None and b["holds"] is None and b["evaluated"] is not None
    assert "not applicable" in b["note"]
    out = invoke_cli("closeness", str(tmp_path / "run"), "--device", "cpu", "--plot", str(tmp_path / "c.png"))
    assert out.exit_code == 0, out.stderr
    flat = " ".join(out.stdout.split())
    assert "not applicable" in flat and "bound holds" in flat and "yes" not in flat.split("bound holds")[1][:20]
    from landscape.render.geometry import closeness_figure
    fig = closeness_figure([r], ["default bowls"])
    assert any("not applicable" in ax.get_title() for ax in fig.axes)


def test_training_minimum_is_stationary_so_the_bound_is_reported():
    s = make_suite("bowls", seed=0, options={"dim": 2, "n_domains": 2})
    obj = Objective(Point(2).double(), {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains)
    # the exact minimiser of the uniform average of the (float32-stored) bowls
    A = {d: obj.domains[d][0]["A"][0].double() for d in s.train_domains}
    m = {d: obj.domains[d][0]["m"][0].double() for d in s.train_domains}
    x = torch.linalg.solve(sum(A.values()), sum(A[d] @ m[d] for d in s.train_domains))
    with torch.no_grad():
        obj.model.theta.copy_(x)
    b = closeness(obj).bound
    assert b["applicable"] is True and b["relative_stationarity"] < 1e-8
    assert b["value"] == b["evaluated"] and isinstance(b["holds"], bool)
