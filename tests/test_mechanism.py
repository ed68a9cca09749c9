"""The mechanism toy: its landscape against closed forms and autograd, the gamma trend of Nexus minus the
control, and the exact expected outer step against the second-order expansion at points on the recorded paths."""
from __future__ import annotations


import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, invoke_cli
from landscape.app.mechanism import (SEPARATED, SHARED, MechanismResult, expansion_terms, expected_displacement,
                                 landscape_from_dict, make_landscape, mechanism_toy, ridge_starts, run_arm)

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMAS = (0.1, 0.2, 0.4)


@pytest.fixture(scope="module")
def land():
    return make_landscape()


@pytest.fixture(scope="module")
def small(one_thread) -> MechanismResult:
    """The default toy on a smaller grid (8 starts x 2 orders = 16 paired runs per arm and gamma)."""
    return mechanism_toy(GAMMAS, seed=0, n_along=4, n_orders=2)


# -- the landscape ---------------------------------------------------------------------------------------------
def test_gradient_and_hessian_equal_autograd(land):
    rng = np.random.default_rng(0)
    for x in rng.uniform([-2.5, -1.5], [2.5, 1.5], size=(6, 2)):
        for d in land.train_domains + [land.downstream]:
            t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
            (g,) = torch.autograd.grad(land.torch_loss(d, t), t)
            H = torch.autograd.functional.hessian(lambda z: land.torch_loss(d, z), t.detach())
            assert land.loss(d, x) == pytest.approx(float(land.torch_loss(d, t.detach())), abs=1e-12)
            np.testing.assert_allclose(land.grad(d, x), g.numpy(), atol=1e-12)
            np.testing.assert_allclose(land.hessian(d, x), H.numpy(), atol=1e-10)


def test_two_basins_of_equal_training_loss_and_only_one_is_a_common_minimum(land):
    s, p, d = np.array(land.shared_min), np.array(land.separated_centre), land.spread
    sh, sp = land.minimize("train", s), land.minimize("train", p)
    assert land.loss("train", sh) == pytest.approx(land.loss("train", sp), abs=1e-12)  # equal training loss
    for x in (sh, sp):  # both are minima: zero gradient, positive-definite Hessian
        assert np.linalg.norm(land.grad("train", x)) < 1e-10
        assert np.linalg.eigvalsh(land.hessian("train", x)).min() > 0
    mins = {dom: land.minimize(dom, s) for dom in land.train_domains}  # per-domain minima near s coincide ...
    assert max(np.linalg.norm(m - sh) for m in mins.values()) < 1e-6
    mins = [land.minimize(dom, land.separated_minima[dom]) for dom in land.train_domains]  # ... near p they do not
    assert np.linalg.norm(mins[0] - mins[1]) == pytest.approx(2 * d, rel=1e-4)
    # the downstream domain is low only at the intersection (a d^2/2 + c vs c + a (1.5)^2 / 2)
    assert land.loss(land.downstream, sp) - land.loss(land.downstream, sh) > 2.0
    # cross-domain gradient cosine: 1 in the shared basin, -1 between the separated minima
    assert land.mean_cosine(s + [0.3, 0.2]) == pytest.approx(1.0, abs=1e-6)
    assert land.mean_cosine(p + [0.0, 0.1]) == pytest.approx(-1.0, abs=1e-6)


def test_starts_lie_either_side_of_the_training_ridge(land):
    st = ridge_starts(land, 5, (-0.2, 0.2))
    assert st.shape == (10, 2)
    for left, right in zip(st[0::2], st[1::2]):
        mid = (left + right) / 2  # the ridge: training loss maximal along x there
        assert land.grad("train", mid)[0] == pytest.approx(0.0, abs=0.02)
        assert land.loss("train", mid) > max(land.loss("train", left), land.loss("train", right)) - 1e-9


# -- the arms ----------------------------------------------------------------------------------------------------
def test_arms_use_the_real_optimizers(land):
    """AdamW equals a hand-written AdamW; the control's one outer step is AdamW on gamma * sum of normalised
    anchor gradients (the parallel mode); Nexus's first inner steps walk gamma * g/||g||."""
    order = np.array([[0, 1, 1, 0]])
    x0 = np.array([0.3, 0.4])
    path = run_arm(land, "control", x0, order, gamma=0.2, lr=0.1)
    names = land.train_domains
    pg = 0.2 * sum(land.grad(names[i], x0) / np.linalg.norm(land.grad(names[i], x0)) for i in order[0])
    # AdamW's first step with bias correction: lr * m_hat / (sqrt(v_hat) + eps) = lr * sign(pg) (eps = 1e-10)
    np.testing.assert_allclose(path[1], x0 - 0.1 * pg / (np.abs(pg) + 1e-10), atol=1e-12)
    walk = x0.copy()
    for i in order[0]:
        g = land.grad(names[i], walk)
        walk = walk - 0.2 * g / np.linalg.norm(g)
    pg = x0 - walk
    np.testing.assert_allclose(run_arm(land, "nexus", x0, order, gamma=0.2, lr=0.1)[1],
                               x0 - 0.1 * pg / (np.abs(pg) + 1e-10), atol=1e-12)
    g = sum(land.grad(names[i], x0) for i in order[0]) / 4
    np.testing.assert_allclose(run_arm(land, "adamw", x0, order, gamma=0.2, lr=0.1)[1],
                               x0 - 0.1 * g / (np.abs(g) + 1e-10), atol=1e-12)


# -- (a) the gamma trend ---------------------------------------------------------------------------------------
def test_nexus_minus_control_shift_grows_with_gamma_as_the_expansion_predicts(small):
    """The second-order term is gamma^2 against the first-order gamma: its share of the outer step, and so the
    Nexus-minus-control shift, grows with gamma. Its direction at the starts is towards the shared basin
    (computed from the expansion, not assumed), and it raises the cross-domain cosine (Theorem 3.2)."""
    assert small.settings["predicted_drift_per_gamma2"] > 0  # the expansion: towards the shared basin
    sh = small.shifts
    cos = [s["d_end_cosine"] for s in sh]
    assert all(c > 0 for c in cos) and all(b > a for a, b in zip(cos, cos[1:])), cos
    frac = [s["d_frac_shared"] for s in sh]
    assert all(b >= a for a, b in zip(frac, frac[1:])) and frac[-1] > 0, frac
    assert all(s["n_less_shared"] == 0 for s in sh), sh  # no paired run leaves the shared basin
    drift = [s["d_drift"] for s in sh]
    assert drift[-1] > drift[0] and drift[-1] > 0, drift
    # the control is the same optimizer at every gamma (the outer AdamW does not see the displacement's scale)
    ctl = [small.row("control", g) for g in GAMMAS]
    assert all(c["frac_shared"] == ctl[0]["frac_shared"] for c in ctl)
    assert all(c["drift_mean"] == pytest.approx(ctl[0]["drift_mean"], abs=1e-9) for c in ctl)


def test_result_round_trips_and_reads_the_same_way_either_way(small, tmp_path):
    small.to_json(tmp_path / "m.json")
    r2 = MechanismResult.from_json(tmp_path / "m.json")
    assert r2.table == small.to_dict()["table"] and r2.reading() == small.reading()
    bl = small.basin_losses
    assert bl[SHARED]["train"] == pytest.approx(bl[SEPARATED]["train"], abs=1e-12)
    assert sum(small.row("adamw")[k] for k in ("frac_shared", "frac_separated", "frac_undecided")) == pytest.approx(1)
    text = small.reading()
    assert "rises with gamma" in text or "falls with gamma" in text or "is not monotone" in text
    # the same sentence template whichever way the numbers fall
    flipped = MechanismResult.from_dict(small.to_dict())
    flipped.shifts = [dict(s, d_frac_shared=-s["d_frac_shared"], d_drift=-s["d_drift"]) for s in flipped.shifts]
    assert flipped.reading().count("gamma=") == text.count("gamma=")


# -- (b) the expansion at points on the recorded paths ------------------------------------------------------------
def test_expected_outer_step_matches_second_order_expansion_on_the_paths(small):
    land = landscape_from_dict(small.landscape)
    K = 4
    pts = [np.asarray(p)[t] for arm in ("nexus", "control") for p in small.sample_paths[arm][:3] for t in (0, 4, 9)]
    checked = 0
    for x in pts:
        g = [np.linalg.norm(land.grad(d, x)) for d in land.train_domains]
        first, second = expansion_terms(land, x, 0.01, K)
        if min(g) < 0.3 or np.linalg.norm(second) < 1e-3 * np.linalg.norm(first):
            continue  # near a minimum (J ~ 1/||g||) or where the second-order term vanishes by symmetry
        errs, rel = [], []
        for gamma in (0.01, 0.005):
            E = expected_displacement(land, x, gamma, K)  # exact mean over all N^K orders, real Nexus
            first, second = expansion_terms(land, x, gamma, K)
            errs.append(np.linalg.norm(E - first - second))
            rel.append(errs[-1] / np.linalg.norm(second))
            c = (E - first) @ second / (np.linalg.norm(E - first) * np.linalg.norm(second))
            assert c > 0.99, (x, gamma, c)
        assert 5.5 < errs[0] / errs[1] < 11.0, (x, errs)  # the residual is O(gamma^3) ...
        assert rel[1] < 0.15 and 1.6 < rel[0] / rel[1] < 2.5, (x, rel)  # ... O(gamma) of the second-order part
        # (up to 0.12 at gamma = 0.005 near the ridge, where the soft minimum bends the wells on a scale tau = 0.25)
        checked += 1
    assert checked >= 6, checked


# -- the CLI -----------------------------------------------------------------------------------------------------
def test_cli_writes_json_and_png(tmp_path):
    r = invoke_cli("mechanism", "--out", tmp_path / "m", "--gammas", "0.1,0.4", "--starts", "1", "--orders", "1",
                   "--steps", "12", "--start-distance", "0.1", "--distances", "0.05")
    assert r.exit_code == 0, r.output
    res = MechanismResult.from_json(tmp_path / "m" / "mechanism.json")
    assert res.gammas == [0.1, 0.4] and res.settings["runs_per_arm"] == 2
    assert res.settings["start_distance"] == 0.1
    assert (tmp_path / "m" / "mechanism.png").stat().st_size > 10_000
    flat = " ".join(r.stdout.split())
    assert "ends in the shared basin: AdamW" in flat and "starts 0.05 from the ridge" in flat
    sweep = json.loads((tmp_path / "m" / "mechanism-distance.json").read_text())["start_distance_sweep"]
    assert [e["distance"] for e in sweep] == [0.05, 0.1]


@pytest.mark.parametrize("args,contains", [(["--gammas", "0.1,-1"], "--gammas"), (["--gammas", "a,b"], "--gammas"),
                                           (["--gammas", "0.1,0.1"], "distinct"), (["--orders", "0"], "orders"),
                                           (["--steps", "0"], "steps")])
def test_cli_bad_input_is_one_line(tmp_path, args, contains):
    r = invoke_cli("mechanism", "--out", tmp_path / "m", *args)
    assert_one_line_error(r.exit_code, r.stderr, contains=contains)
    assert not (tmp_path / "m" / "mechanism.json").exists()


# -- honest statistics: clustered by start, AdamW beside the arms, signs as measured ---------------------------
def test_clustered_interval_is_the_t_interval_over_start_means():
    from scipy import stats as st

    from landscape.app.mechanism import clustered

    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(6), 3)
    v = rng.normal(size=18) + np.repeat(rng.normal(size=6), 3)
    c = clustered(v, clusters)
    means = v.reshape(6, 3).mean(1)
    ci = st.ttest_1samp(means, 0.0).confidence_interval(0.95)
    assert c["n_starts"] == 6 and c["mean"] == pytest.approx(v.mean())
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert c["stderr"] == pytest.approx(st.sem(means))


def test_toy_intervals_are_over_starts_and_the_reading_names_adamw_and_the_measured_signs(small):
    S = small.settings["n_starts"]
    assert S == len(small.starts) == 8 and small.settings["runs_per_arm"] == 16
    for sh in small.shifts:
        assert sh["n_starts"] == S and sh["starts_more_shared"] <= sh["n_more_shared"]
        lo, hi = sh["d_drift_ci"]
        assert lo <= sh["d_drift"] <= hi
        from scipy import stats as st
        assert (hi - lo) / 2 == pytest.approx(st.t.ppf(0.975, S - 1) * sh["d_drift_stderr"])
    lines = [ln for ln in small.reading().splitlines() if ln.startswith("gamma=")]
    assert len(lines) == len(small.gammas) and all("AdamW" in ln for ln in lines)
    for ln, sh in zip(lines, small.shifts):
        assert ("(towards the shared basin)" in ln) == (sh["d_drift"] > 0)
        assert ("(away from the shared basin)" in ln) == (sh["d_drift"] < 0)


def test_expansion_claim_only_where_checked_and_small(small):
    chk = {e["gamma"]: e["median_residual_over_second"] for e in small.expansion_check}
    assert set(chk) == {0.005, 0.01, *small.gammas}
    assert chk[0.005] < chk[0.01] < chk[max(small.gammas)]
    text = small.reading().splitlines()[-1]
    ok = [g for g, v in chk.items() if v < 0.25]
    assert f"only at gamma {', '.join(f'{g:g}' for g in sorted(ok))}." in text


def test_start_distance_is_an_option_and_the_sweep_reports_every_arm():
    from landscape.app.mechanism import start_distance_sweep, sweep_reading

    sw = start_distance_sweep((0.05, 0.2), (0.4,), n_along=2, n_orders=1, steps=20)
    assert [e["distance"] for e in sw] == [0.05, 0.2] and all(e["n_starts"] == 4 for e in sw)
    r = mechanism_toy((0.4,), n_along=2, n_orders=1, steps=20, start_distance=0.05)
    assert r.settings["offsets"] == [-0.05, 0.05] and r.row("adamw")["frac_shared"] == sw[0]["adamw"]
    text = sweep_reading(sw)
    assert text.count("AdamW") == 2 and "control" in text and "Nexus" in text
    from nexus_opt.errors import UserError
    with pytest.raises(UserError):
        mechanism_toy((0.4,), start_distance=2.0)
