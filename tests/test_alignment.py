"""landscape.alignment against closed forms: quadratic bowls (an independent numpy walk over every order, the
cosine's directional derivative by central differences), the 2-D mechanism toy (the real nexus_opt.Nexus over
every order, the expansion's residual shrinking as gamma^3), K = 1 (no second-order term), sampled orders."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from landscape import Objective
from landscape.alignment import alignment
from nexus_opt.models import Point
from nexus_opt.suites import make_suite


def bowls_objective(dim=3, n=3, seed=0, at=None):
    s = make_suite("bowls", seed=seed, options={"dim": dim, "n_domains": n})
    model = Point(dim, init=at if at is not None else [1.0] * dim).double()
    obj = Objective(model, {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains)
    # the batches hold A and m in float32: the closed forms use exactly those values
    A = {d: obj.domains[d][0]["A"][0].double().numpy() for d in s.domains}
    m = {d: obj.domains[d][0]["m"][0].double().numpy() for d in s.domains}
    return obj, A, m, s


def np_walk_mean(A, m, names, x0, gamma, K):
    """E[x0 - x_K] over every order, plain numpy: g_i = A_i (x - m_i)."""
    tot = np.zeros_like(x0)
    for seq in itertools.product(names, repeat=K):
        x = x0.copy()
        for d in seq:
            g = A[d] @ (x - m[d])
            x = x - gamma * g / np.linalg.norm(g)
        tot += x0 - x
    return tot / len(names) ** K


def np_mean_cos(A, m, names, x):
    gs = [A[d] @ (x - m[d]) for d in names]
    return np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(gs, 2)])


def test_bowls_exact_displacement_terms_and_rates_match_closed_forms():
    obj, A, m, s = bowls_objective()
    names = s.train_domains
    x0 = np.ones(3)
    r = alignment(obj, gammas=[0.05, 0.2], K=3, keep_vectors=True)
    assert r.exact and r.orders == 27 and r.K == 3 and r.domains == names
    gs = {d: A[d] @ (x0 - m[d]) for d in names}
    us = {d: g / np.linalg.norm(g) for d, g in gs.items()}
    for row in r.per_gamma:
        gm = row["gamma"]
        D = np_walk_mean(A, m, names, x0, gm, 3)
        np.testing.assert_allclose(row["vectors"]["exact"], D, rtol=1e-10, atol=1e-13)
        first = gm * 3 * np.mean([us[d] for d in names], axis=0)
        np.testing.assert_allclose(row["vectors"]["first"], first, rtol=1e-12)
        J = {d: (np.eye(3) - np.outer(us[d], us[d])) @ A[d] / np.linalg.norm(gs[d]) for d in names}
        second = -gm ** 2 * 3 * 2 / (2 * 9) * sum(J[i] @ us[j] for i in names for j in names)
        np.testing.assert_allclose(row["vectors"]["second"], second, rtol=1e-10)
        assert row["norm_remainder"] == pytest.approx(np.linalg.norm(D - first - second), rel=1e-8)
        # rates: central differences of the closed-form mean cosine and losses along the unit step directions
        for key, vec in (("nexus", D), ("control", first)):
            u = -vec / np.linalg.norm(vec)
            h = 1e-5
            fd = (np_mean_cos(A, m, names, x0 + h * u) - np_mean_cos(A, m, names, x0 - h * u)) / (2 * h)
            assert row["rate_cosine"][key] == pytest.approx(fd, rel=1e-6, abs=1e-9)
            for d in s.domains:
                assert row["rate_loss"][d][key] == pytest.approx(float(A[d] @ (x0 - m[d]) @ u), rel=1e-10)
        assert row["rate_cosine"]["difference"] == pytest.approx(
            row["rate_cosine"]["nexus"] - row["rate_cosine"]["control"], abs=1e-14)
    assert r.mean_cosine == pytest.approx(np_mean_cos(A, m, names, x0), rel=1e-12)


def test_k1_has_no_second_order_term_and_no_rate_difference():
    obj, *_ = bowls_objective()
    r = alignment(obj, gammas=[0.01, 0.1], K=1)
    for row in r.per_gamma:
        assert row["norm_second"] == 0.0
        assert row["norm_remainder"] == pytest.approx(0.0, abs=1e-15)
        assert row["rate_cosine"]["difference"] == pytest.approx(0.0, abs=1e-12)


def toy_objective(land, theta):
    """The mechanism toy's training domains as an Objective over a 2-parameter Point (one batch per domain,
    carrying the domain's index)."""
    names = land.train_domains
    model = Point(2, init=[float(t) for t in theta]).double()
    doms = {d: [{"i": torch.tensor([i])}] for i, d in enumerate(names)}

    def loss(mdl, b):
        return land.torch_loss(names[int(b["i"][0])], mdl())

    return Objective(model, doms, loss)


def test_toy_exact_matches_real_nexus_and_residual_shrinks_as_gamma_cubed():
    from landscape.app.mechanism_landscape import expected_displacement, make_landscape

    land = make_landscape()
    theta = np.array([0.25, 0.375])  # exact in float32 (Point keeps its init in float32)
    obj = toy_objective(land, theta)
    gammas = [0.0025, 0.005, 0.01, 0.05]
    r = alignment(obj, gammas=gammas, K=4, keep_vectors=True)
    for row in r.per_gamma:  # the real optimizer over all 16 orders
        np.testing.assert_allclose(row["vectors"]["exact"], expected_displacement(land, theta, row["gamma"], 4),
                                   rtol=1e-9, atol=1e-14)
    rem = [r.at(g)["norm_remainder"] for g in gammas[:3]]
    for a, b in zip(rem, rem[1:]):  # halving gamma divides the residual by ~8
        assert b / a == pytest.approx(8.0, rel=0.15)
    ratio = [r.at(g)["remainder_over_second"] for g in gammas]  # |rem| / |second| ~ gamma: falls as gamma does
    assert ratio == sorted(ratio) and ratio[0] < 0.1


def test_sampled_orders_agree_with_exact_within_stderr():
    obj, *_ = bowls_objective(dim=3, n=3)
    ex = alignment(obj, gammas=[0.2], K=3)
    sm = alignment(obj, gammas=[0.2], K=3, max_orders=8, samples=400, seed=1)
    assert ex.exact and not sm.exact and sm.orders == 400
    a, b = ex.per_gamma[0], sm.per_gamma[0]
    se = b["stderr"]["rate_cosine.difference"]
    assert se > 0
    assert abs(a["rate_cosine"]["difference"] - b["rate_cosine"]["difference"]) < 5 * se
    assert abs(a["norm_exact"] - b["norm_exact"]) < 5 * b["stderr"]["norm_exact"] + 1e-12
    again = alignment(obj, gammas=[0.2], K=3, max_orders=8, samples=400, seed=1)
    assert again.per_gamma[0]["rate_cosine"] == b["rate_cosine"]  # seeded


def test_bad_input_is_a_user_error():
    from nexus_opt.errors import UserError

    obj, *_ = bowls_objective()
    for kw in ({"gammas": []}, {"gammas": [0.0]}, {"gammas": [0.1, 0.1]}, {"K": 0}, {"K": 1.5},
               {"samples": 1}, {"domains": "nope"}):
        with pytest.raises(UserError):
            alignment(obj, **kw)


def test_json_roundtrip():
    from landscape.alignment import AlignmentResult

    obj, *_ = bowls_objective()
    r = alignment(obj, gammas=[0.1], K=2)
    back = AlignmentResult.from_dict(__import__("json").loads(r.to_json()))
    assert back.per_gamma[0]["rate_cosine"]["difference"] == pytest.approx(r.per_gamma[0]["rate_cosine"]["difference"])
    assert math.isfinite(r.seconds)


def test_cli_tables_json_plot_and_bad_input(bowls_run, tmp_path):
    import json as _json

    from conftest import assert_one_line_error, invoke_cli

    js, png = tmp_path / "a.json", tmp_path / "a.png"
    r = invoke_cli("alignment", str(bowls_run), "--device", "cpu", "--gammas", "0.01,0.1", "--K", "2",
                   "--json", str(js), "--plot", str(png))
    assert r.exit_code == 0, r.stderr
    res = _json.loads(js.read_text())["results"][0]["result"]
    assert res["K"] == 2 and [row["gamma"] for row in res["per_gamma"]] == [0.01, 0.1]
    assert png.stat().st_size > 0 and "rate is" in r.stdout
    for bad, what in ((["--K", "0"], "--K"), (["--gammas", "x"], "--gammas"), (["--domains", "nope"], "nope")):
        r = invoke_cli("alignment", str(bowls_run), "--device", "cpu", *bad)
        assert_one_line_error(r.exit_code, r.stderr, contains=what)
