"""descend/closeness against the analytic bowls (minima, distances, spread, cross-losses, Theorem 3.1) and hygiene."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from landscape import ClosenessResult, Objective, UserError, closeness, descend
from landscape.params import set_flat
from nexus_opt.models import build_model
from nexus_opt.suites import make_suite


def bowls(seed: int = 0, dim: int = 3, n_domains: int = 3, at_train_min: bool = False):
    """A float64 bowls Objective and its suite; the batches hold A, m rounded to float32 (used as the truth)."""
    s = make_suite("bowls", seed=seed, options={"dim": dim, "n_domains": n_domains})
    name, cfg = s.default_model()
    obj = Objective(build_model(name, cfg), {d: s.eval_batches(d) for d in s.domains}, s.loss_fn,
                    ood=s.ood_domains, weights=s.weights).to(dtype=torch.float64)
    A = {d: s.A[d].float().double() for d in s.domains}
    m = {d: s.m[d].float().double() for d in s.domains}
    if at_train_min:
        Abar = sum(A[d] for d in s.train_domains) / len(s.train_domains)
        b = sum(A[d] @ m[d] for d in s.train_domains) / len(s.train_domains)
        set_flat(obj.params(), torch.linalg.solve(Abar, b))
    return obj, s, A, m


def quad(A, m, d, x):
    return float(0.5 * (x - m[d]) @ A[d] @ (x - m[d]))


def test_descend_finds_analytic_minima():
    obj, s, A, m = bowls(seed=1, dim=4)
    theta0 = obj.params()["theta"].detach().clone()
    for opt, lr, tol in [("lbfgs", None, 1e-6), ("sgd", 0.09, 1e-14)]:
        for d in obj.train_domains:
            r = descend(obj, d, optimizer=opt, lr=lr, steps=600, tol=tol)
            assert r.converged, (opt, d)
            assert r.theta.dtype == torch.float64 and r.theta.device.type == "cpu"
            torch.testing.assert_close(r.theta, s.minimum(d), atol=1e-6, rtol=0)
            assert r.loss_start == pytest.approx(quad(A, m, d, theta0))
            assert r.loss_min == pytest.approx(0.0, abs=1e-10) and r.loss_min == min(r.losses)
            assert len(r.losses) == r.steps + 1 and r.losses[r.best_step] == r.loss_min
    train = descend(obj, None, optimizer="lbfgs")
    torch.testing.assert_close(train.theta, s.minimum(None), atol=1e-6, rtol=0)
    assert train.domain == "train"
    adam = descend(obj, "bowl0", optimizer="adamw", lr=0.05, steps=60)
    assert adam.loss_min < 0.05 * adam.loss_start
    assert torch.equal(obj.params()["theta"].detach(), theta0)  # the caller's model never moves


def test_closeness_matches_formulas():
    obj, s, A, m = bowls(seed=2, dim=3, n_domains=3)
    theta = obj.params()["theta"].detach().clone()
    r = closeness(obj, optimizer="lbfgs", keep_minima=True)
    doms = s.train_domains
    assert r.domains == doms and r.columns == s.domains and r.ood == ["ood"]
    for d in doms:
        torch.testing.assert_close(torch.tensor(r.minima[d], dtype=torch.float64), s.minimum(d), atol=1e-6, rtol=0)
        dist = float((theta - m[d]).norm())
        assert r.distance[d]["raw"] == pytest.approx(dist, rel=1e-6)
        assert r.distance[d]["relative"] == pytest.approx(dist / float(theta.norm()), rel=1e-6)
        assert r.distance[d]["per_layer"]["theta"] == pytest.approx(dist, rel=1e-6)
        assert r.loss_start[d] == pytest.approx(quad(A, m, d, theta), rel=1e-10)
        assert r.loss_min[d] == pytest.approx(0.0, abs=1e-10)
        assert r.loss_drop[d] == pytest.approx(r.loss_start[d] - r.loss_min[d])
        assert r.barrier[d] <= 1e-9  # convex: the loss never rises above the chord
        assert len(r.barrier_profile[d]) == 11
        u = m[d] - theta
        assert r.curvature_along[d] == pytest.approx(float(u @ A[d] @ u / (u @ u)), rel=1e-8)
        assert r.converged_by_domain[d]
    M = torch.stack([m[d] for d in doms])
    np.testing.assert_allclose(np.array(r.pairwise), torch.cdist(M, M).numpy(), atol=1e-6)
    center = M.mean(0)
    assert r.spread == pytest.approx(float(((M - center) ** 2).sum(1).mean()), rel=1e-6)
    assert r.mean_sq_distance == pytest.approx(float(((M - theta) ** 2).sum(1).mean()), rel=1e-6)
    assert r.center_distance == pytest.approx(float((theta - center).norm()), rel=1e-6)
    for i, a in enumerate(doms):
        for j, b in enumerate(s.domains):
            assert r.cross_loss[i][j] == pytest.approx(quad(A, m, b, m[a]), rel=1e-6, abs=1e-10)
        assert r.cross_train[a] == pytest.approx(np.mean([quad(A, m, b, m[a]) for b in doms]), rel=1e-6)
    assert r.train_loss == pytest.approx(np.mean([quad(A, m, b, theta) for b in doms]), rel=1e-10)
    data = json.loads(r.to_json())
    assert ClosenessResult.from_dict(data).spread == r.spread
    assert torch.equal(obj.params()["theta"].detach(), theta)


@pytest.mark.parametrize("seed,dim,n", [(0, 2, 2), (1, 3, 3), (2, 5, 4), (3, 8, 3), (4, 1, 3)])
def test_theorem31_bound_holds_at_stationary_points(seed, dim, n):
    obj, s, A, m = bowls(seed=seed, dim=dim, n_domains=n, at_train_min=True)
    theta = obj.params()["theta"].detach().clone()
    r = closeness(obj, optimizer="lbfgs", barrier_points=3)
    b = r.bound
    # the theorem's quantities, by hand from the quadratics
    g = {d: A[d] @ (theta - m[d]) for d in s.train_domains}
    G = max(float(v.norm()) for v in g.values())
    lam = min(float((m[d] - theta) @ A[d] @ (m[d] - theta) / ((m[d] - theta) @ (m[d] - theta))) for d in g)
    dissim = sum(1 - float(g[i] @ g[j] / g[i].norm() / g[j].norm()) for i in g for j in g if i != j)
    measured = np.mean([float((theta - m[d]) @ (theta - m[d])) for d in g])
    assert b["N"] == n and b["G"] == pytest.approx(G, rel=1e-8) and b["lambda_min"] == pytest.approx(lam, rel=1e-8)
    assert b["cos_dissimilarity"] == pytest.approx(dissim, rel=1e-8, abs=1e-10)
    assert b["value"] == pytest.approx(G ** 2 / (n * lam ** 2) * dissim, rel=1e-7)
    assert b["measured"] == pytest.approx(measured, rel=1e-6)
    assert b["measured"] <= b["value"] and b["holds"] is True
    assert b["stationarity"] < 1e-6 * G  # theta is the training minimum
    fb = b["force_balance"]
    assert fb["sum_sq_norms"] == pytest.approx(fb["minus_sum_cross"], rel=1e-6)


def test_bound_not_applicable_without_curvature():
    obj, *_ = bowls(seed=0, dim=2, n_domains=2)
    r = closeness(obj, optimizer="lbfgs", curvature=False, domains=["bowl1", "ood"])
    assert r.domains == ["bowl1", "ood"] and r.minima is None
    assert r.bound["value"] is None and r.bound["holds"] is None and "curvature" in r.bound["note"]
    assert all(v is None for v in r.curvature_along.values())
    json.loads(r.to_json())


def test_mlp_closeness_leaves_model_untouched_and_unconverged_summaries_are_null():
    s = make_suite("mix", seed=0, options={"eval_batches": 2, "eval_batch_size": 32})
    name, cfg = s.default_model()
    torch.manual_seed(0)
    model = build_model(name, {**cfg, "hidden": 16})
    obj = Objective(model, {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    r = closeness(obj, steps=25, lr=1e-2, optimizer="adamw", seed=0,
                  progress=lambda done, total, what: calls.append((done, total)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(r.loss_drop[d] > 0 for d in r.domains)
    assert calls and calls[-1][0] == calls[-1][1]  # progress reaches its total
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))  # and never goes back
    # 25 Adam steps reach no minimum: said so, and nothing comparing minima is reported
    assert not r.all_converged and not any(r.converged_by_domain.values())
    assert all(r.stop[d] == "steps" and r.reached[d] > 0 for d in r.domains)
    assert r.spread is None and r.mean_sq_distance is None and r.center_distance is None
    assert all(r.distance[d]["raw"] is None and r.barrier[d] is None and r.curvature_along[d] is None
               for d in r.domains)
    assert all(v is None for row in r.pairwise for v in row) and all(row is None for row in r.cross_loss)
    assert r.bound["value"] is None and r.bound["holds"] is None and "did not converge" in r.bound["note"]
    back = ClosenessResult.from_dict(json.loads(r.to_json()))
    assert back.spread is None and not back.all_converged


def test_bad_input():
    obj, *_ = bowls(dim=2, n_domains=2)
    with pytest.raises(UserError, match="unknown domain"):
        descend(obj, "nope")
    with pytest.raises(UserError, match="unknown domain"):
        closeness(obj, domains=["bowl0", "nope"])
    with pytest.raises(UserError, match="optimizer"):
        descend(obj, "bowl0", optimizer="rmsprop")
    with pytest.raises(UserError, match="optimizer"):
        closeness(obj, optimizer="rmsprop")
    with pytest.raises(UserError, match="lr"):
        descend(obj, "bowl0", lr=-1.0)
    with pytest.raises(UserError, match="steps"):
        descend(obj, "bowl0", steps=-3)
    with pytest.raises(UserError, match="learning rate"):
        closeness(obj, lr=0.1)  # newton-cg has none
    with pytest.raises(UserError, match="max_evals"):
        closeness(obj, max_evals=0)
    with pytest.raises(UserError, match="barrier_points"):
        closeness(obj, barrier_points=1)
    with pytest.raises(UserError, match="diverged"):
        descend(obj, "bowl0", optimizer="sgd", lr=50.0, steps=400)
    with pytest.raises(UserError):
        descend(obj, "each")


def test_figure_and_cli(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from landscape.render.geometry import closeness_figure
    from nexus_opt.train import TrainConfig, train

    obj, *_ = bowls(dim=2, n_domains=2)
    r = closeness(obj, optimizer="lbfgs", curvature=False)
    fig = closeness_figure([r, json.loads(r.to_json())], ["a", "b"], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and len(fig.axes) >= 6

    run = tmp_path / "run"
    train(TrainConfig(suite="bowls", suite_options={"dim": 2, "n_domains": 2}, steps=2, eval_every=1, ckpt_every=1,
                      device="cpu", out=str(run), warmup=0))
    ckpts = sorted(str(p) for p in run.glob("ckpt-*"))
    res = CliRunner().invoke(app, ["closeness", ckpts[0], ckpts[-1], "--optimizer", "lbfgs", "--max-steps", "50",
                                   "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c2.png"),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert len(data["results"]) == 2 and data["results"][0]["result"]["domains"] == ["bowl0", "bowl1"]
    b0 = data["results"][0]["result"]["bound"]  # step 0: not a stationary point, so Theorem 3.1 does not apply
    assert b0["applicable"] is False and b0["holds"] is None and b0["evaluated"] is not None
    assert (tmp_path / "c2.png").exists()
    bad = CliRunner().invoke(app, ["closeness", ckpts[0], "--optimizer", "rmsprop"])
    assert bad.exit_code == 2 and "optimizer" in bad.output and "Traceback" not in bad.output
