"""Minimum detectable effects of the paired t-test against scipy's own power computation and a simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from landscape.app.stats import mde, paired, power_t, seeds_for


@pytest.mark.parametrize("n,sd", [(5, 0.02), (15, 1.0), (3, 0.3)])
def test_mde_has_80_percent_power_by_scipy_power_and_by_simulation(n, sd):
    e = mde(sd, n)
    assert power_t(e, sd, n) == pytest.approx(0.8, abs=1e-9)
    rng = np.random.default_rng(0)

    def test(x, axis=-1):
        return stats.ttest_1samp(x, 0.0, axis=axis).pvalue

    res = stats.power(test, lambda size: rng.normal(e, sd, size=size), (n,), significance=0.05, n_resamples=20000,
                      vectorized=True)
    assert float(np.squeeze(res.power)) == pytest.approx(0.8, abs=0.015)
    x = np.random.default_rng(1).normal(e, sd, size=(20000, n))  # plain Monte Carlo, the other way round
    assert float((stats.ttest_1samp(x, 0.0, axis=1).pvalue < 0.05).mean()) == pytest.approx(0.8, abs=0.015)


def test_mde_scales_and_edge_cases():
    assert mde(2.0, 7) == pytest.approx(2 * mde(1.0, 7))
    assert mde(1.0, 30) < mde(1.0, 10) < mde(1.0, 3)
    assert mde(None, 5) is None and mde(1.0, 1) is None and mde(0.0, 5) == 0.0


def test_seeds_for_is_the_fewest_with_the_power():
    n = seeds_for(-0.012, 0.02)
    assert power_t(0.012, 0.02, n) >= 0.8 > power_t(0.012, 0.02, n - 1)


def test_reading_states_the_power_of_a_null():
    p = paired("ood_loss", "nexus", "control", [0, 1, 2, 3, 4], [0.01, -0.02, 0.015, 0.0, -0.005], [0.0] * 5)
    assert p.verdict == "includes zero" and p.mde == pytest.approx(mde(p.sd, 5))
    assert f"not detectable at this power (MDE {p.mde:.3g}" in p.reading
    z = paired("ood_loss", "nexus", "control", [0, 1, 2], [0.5, 0.25, 0.125], [0.5, 0.25, 0.125])
    assert z.mean == 0 and z.mde == 0 and "exactly zero" in z.reading
    s = paired("m", "a", "b", [0, 1, 2, 3], [1.0, 1.1, 0.9, 1.05], [0.0] * 4)
    assert s.verdict == "above zero" and "(MDE" in s.reading
    assert p.to_dict()["mde"] == p.mde


def test_mde_with_two_seeds_is_finite():
    e = mde(1.0, 2)  # one degree of freedom: scipy's far tail is NaN there, the power is not
    assert math.isfinite(e) and power_t(e, 1.0, 2) == pytest.approx(0.8, abs=1e-9)
