"""Flatness against independent truth: dense eigvalsh, analytic bowls, exact traces, PyHessian; plus the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape import FlatnessResult, Objective, UserError, flatness
from landscape.density import spectral_density
from landscape.hvp import HessianOperator
from landscape.lanczos import lanczos
from landscape.trace import hutchinson, hutchpp
from nexus_opt.models import build_model
from nexus_opt.suites import make_suite

from test_hvp import (assert_unchanged, bn_objective, classification_objective, dense_hessian, snapshot,
                     tiny_gpt_objective)


pytestmark = pytest.mark.usefixtures("one_thread")


def mix_objective(hidden: int = 32, seed: int = 0) -> Objective:
    """The mix suite's MLP (default config: 1,377 parameters) on 2 fixed batches of 32 per domain."""
    s = make_suite("mix", seed=seed, options={"eval_batches": 2, "eval_batch_size": 32})
    name, cfg = s.default_model()
    cfg = dict(cfg, hidden=hidden)
    torch.manual_seed(seed)
    model = build_model(name, cfg)
    return Objective(model, {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains,
                     weights=s.weights)


@pytest.fixture(scope="module")
def mix_case():
    obj = mix_objective()
    H = dense_hessian(obj)
    return obj, eigvalsh(H.numpy())


@pytest.fixture(scope="module")
def small_case():
    """A 195-parameter MLP (8-16-1 shaped mix model) for the stochastic estimators."""
    obj = mix_objective(hidden=8)
    H = dense_hessian(obj)
    return obj, eigvalsh(H.numpy())


def eigvalsh(H) -> np.ndarray:
    """Dense eigenvalues, ascending (torch: one thread; numpy's LAPACK oversubscribes the shared cores)."""
    return torch.linalg.eigvalsh(torch.as_tensor(H)).numpy()


def rel_err(got, want, scale):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-3 * scale)))


# -- eigenvalues -----------------------------------------------------------------------------------
def test_top_and_bottom_eigenvalues_match_dense_to_1e8(mix_case):
    obj, ev = mix_case
    scale = float(np.max(np.abs(ev)))
    snap = snapshot(obj.model)
    r = flatness(obj, k=5, trace=False, tol=1e-8)  # tight on request
    assert isinstance(r, FlatnessResult) and r.domain == "train" and r.num_params == obj.num_params() == 1377
    assert r.converged
    assert rel_err(r.eigenvalues, ev[::-1][:5], scale) < 1e-8
    assert rel_err(r.bottom_eigenvalues, ev[:5], scale) < 1e-8
    assert r.eigenvalues == sorted(r.eigenvalues, reverse=True)
    assert r.bottom_eigenvalues == sorted(r.bottom_eigenvalues)
    assert max(r.residuals) < 1e-4 * scale
    # fewer products than PyHessian's ~70 for top-5 at ~1e-3 (anchors.md)
    top = flatness(obj, k=5, which="top", trace=False, tol=1e-8)
    print(top.hvps)
    assert top.hvps["eigenvalues"] <= 50 and rel_err(top.eigenvalues, ev[::-1][:5], scale) < 1e-8
    assert top.bottom_eigenvalues is None
    bottom = flatness(obj, k=3, which="bottom", trace=False, tol=1e-8)
    assert bottom.eigenvalues is None and rel_err(bottom.bottom_eigenvalues, ev[:3], scale) < 1e-8
    cheap = flatness(obj, k=5, trace=False)  # the default tolerance: 1e-4 relative, fewer products
    assert cheap.converged and cheap.settings["tol"] == 1e-4
    assert np.max(np.abs(np.array(cheap.eigenvalues) - ev[::-1][:5]) / np.abs(ev[::-1][:5])) < 1e-4
    assert np.max(np.abs(np.array(cheap.bottom_eigenvalues) - ev[:5]) / np.abs(ev[:5])) < 1e-4
    assert cheap.hvps["eigenvalues"] < r.hvps["eigenvalues"]
    assert_unchanged(obj.model, snap)


def test_eigsh_backend_and_restarts_agree(mix_case):
    obj, ev = mix_case
    scale = float(np.max(np.abs(ev)))
    r = flatness(obj, k=3, backend="eigsh", trace=False, tol=1e-8)
    assert r.converged and r.backend == "eigsh"
    assert rel_err(r.eigenvalues, ev[::-1][:3], scale) < 1e-8
    assert rel_err(r.bottom_eigenvalues, ev[:3], scale) < 1e-8
    op = HessianOperator(obj)
    small = lanczos(op, 3, "both", max_basis=20, seed=3)  # thick restarts with a bounded basis
    assert small.restarts > 0 and small.all_converged
    assert rel_err(small.eigenvalues, ev[::-1][:3], scale) < 1e-8
    assert rel_err(small.bottom_eigenvalues, ev[:3], scale) < 1e-8
    mag = lanczos(op, 2, "magnitude", return_vectors=True)
    want = sorted(ev, key=abs, reverse=True)[:2]
    assert rel_err(mag.eigenvalues, want, scale) < 1e-8
    V = mag.vectors
    R = op.matmat(V) - V * torch.tensor(mag.eigenvalues, dtype=torch.float64)
    assert np.allclose(R.norm(dim=0).numpy(), mag.residuals, atol=1e-9 * scale)


def test_hand_made_mlp_with_unused_params_each_domain():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3))
    model.spare = nn.Linear(3, 3)  # never reaches the loss: zero rows/columns, eigenvalue 0
    obj = classification_objective(model, seed=1)
    calls = []
    rep = flatness(obj, k=4, domains="each", trace=True, trace_probes=12, tol=1e-8,
                   progress=lambda done, total, what: calls.append((done, total, what)))
    assert {w for _, _, w in calls} == {"p: eigenvalues", "p: trace", "q: eigenvalues", "q: trace"}
    assert isinstance(rep, FlatnessResult) and list(rep.results) == ["p", "q"]
    for d in ("p", "q"):
        ev = eigvalsh(dense_hessian(obj, d).numpy())
        scale = float(np.max(np.abs(ev)))
        assert rep[d].converged
        assert rel_err(rep[d].eigenvalues, ev[::-1][:4], scale) < 1e-8
        assert rel_err(rep[d].bottom_eigenvalues, ev[:4], scale) < 1e-8
    assert rep.hvps["total"] == sum(r.hvps["total"] for r in rep.results.values()) and rep.converged
    back = FlatnessResult.from_dict(json.loads(rep.to_json()))
    assert back.results["q"].eigenvalues == rep.results["q"].eigenvalues


def test_bowls_per_domain_equal_analytic_curvatures():
    s = make_suite("bowls", seed=0, options={"dim": 6, "n_domains": 3})
    name, cfg = s.default_model()
    obj = Objective(build_model(name, cfg), {d: s.eval_batches(d) for d in s.domains}, s.loss_fn,
                    ood=s.ood_domains, weights=s.weights)
    rep = flatness(obj, k=3, domains="each", tol=1e-8)
    default = flatness(obj, k=3, domains="each")  # default tolerance 1e-4: relative to each |eigenvalue|
    for d in s.domains:
        exact = eigvalsh(s.hessian(d).float().double().numpy())
        assert default[d].converged
        assert np.max(np.abs(np.array(default[d].eigenvalues) - exact[::-1][:3]) / exact[::-1][:3]) < 1e-4
        assert np.max(np.abs(np.array(default[d].bottom_eigenvalues) - exact[:3]) / exact[:3]) < 1e-4
    for d in s.domains:
        A = s.hessian(d)
        exact = eigvalsh(A.float().double().numpy())  # the batches store A in float32
        r = rep[d]
        assert rel_err(r.eigenvalues, exact[::-1][:3], 1.0) < 1e-10
        assert rel_err(r.bottom_eigenvalues, exact[:3], 1.0) < 1e-10
        assert rel_err(r.eigenvalues, eigvalsh(A.numpy())[::-1][:3], 1.0) < 1e-6
        assert r.trace == pytest.approx(float(np.trace(A.float().double().numpy())), rel=1e-10)
    train = flatness(obj, k=6, domains=None, tol=1e-8)
    exact = eigvalsh(sum(s.weights[d] * s.hessian(d).float().double() for d in s.train_domains).numpy())
    assert rel_err(train.eigenvalues, exact[::-1], 1.0) < 1e-10
    assert rel_err(train.eigenvalues, eigvalsh(s.hessian(None).numpy())[::-1], 1.0) < 1e-6
    assert flatness(obj, k=2, domains="train", tol=1e-8).eigenvalues == pytest.approx(train.eigenvalues[:2], rel=1e-12)


# -- trace and density -----------------------------------------------------------------------------
def test_trace_estimates_within_three_stderr(small_case):
    obj, ev = small_case
    exact = float(ev.sum())
    op = HessianOperator(obj)
    z_h, z_pp = [], []
    for seed in range(4):
        h = hutchinson(op, 40, seed=seed)
        pp = hutchpp(op, 42, seed=seed)
        assert h.hvps == 40 and pp.hvps == 42 and pp.stderr < h.stderr * 1.5
        z_h.append((h.estimate - exact) / h.stderr)
        z_pp.append((pp.estimate - exact) / pp.stderr)
    assert max(abs(z) for z in z_h + z_pp) < 3.0, (z_h, z_pp)
    r = flatness(obj, k=1, which="top", trace_method="hutchinson", trace_probes=30, seed=1)
    assert abs(r.trace - exact) < 3 * r.trace_stderr and r.hvps["trace"] == 30
    # a sketch as large as the space: Hutch++ is exact
    tiny = hutchpp(op, 3 * op.n + 3, seed=0)
    assert tiny.stderr == 0.0 and tiny.estimate == pytest.approx(exact, rel=1e-10)


def test_density_integrates_to_one_and_matches_dense_spectrum(small_case):
    obj, ev = small_case
    op = HessianOperator(obj)
    d = spectral_density(op, probes=6, steps=40, seed=0)
    assert d.hvps == 6 * 40
    grid, vals = np.asarray(d.grid), np.asarray(d.values)
    assert np.trapezoid(vals, grid) == pytest.approx(1.0, abs=1e-9)
    assert grid[0] < ev.min() and grid[-1] > ev.max()
    for w in d.weights:
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
    # Gauss quadrature is exact for low moments per probe: only probe noise remains
    for p in (1, 2):
        exact = float(np.mean(ev ** p))
        assert d.moment(p) == pytest.approx(exact, abs=0.15 * float(np.mean(np.abs(ev) ** p)))
    # mass per region (avoiding the spike at zero) matches the dense eigenvalue histogram
    scale = float(np.max(np.abs(ev)))
    for x in (-0.3 * scale, -0.05 * scale, 0.05 * scale, 0.3 * scale):
        assert d.mass_below(x) == pytest.approx(float(np.mean(ev <= x)), abs=0.08)


# -- cross-check and other models ------------------------------------------------------------------
def test_pyhessian_backend_agrees_within_its_tolerance(small_case):
    pytest.importorskip("pyhessian")
    obj, ev = small_case
    snap = snapshot(obj.model)
    r = flatness(obj, k=2, backend="pyhessian", which="top", trace=True, trace_probes=30)
    top = ev[::-1][:2]
    assert r.backend == "pyhessian" and r.hvps["eigenvalues"] > 0 and r.hvps["trace"] == 30
    assert abs(r.eigenvalues[0] - top[0]) / top[0] < 1e-2  # its power iteration stops at 1e-3 change
    assert abs(r.trace - ev.sum()) < 3 * r.trace_stderr
    assert_unchanged(obj.model, snap)
    with pytest.raises(UserError):
        flatness(obj, backend="pyhessian", which="both")
    # one batch: PyHessian's single-batch path on exactly our batch and loss
    one = Objective(obj.model, {"a": obj.domains["a"][:1]}, obj.loss_fn)
    ev1 = eigvalsh(dense_hessian(one).numpy())
    r1 = flatness(one, k=1, backend="pyhessian", which="top", trace=False)
    assert abs(r1.eigenvalues[0] - ev1[-1]) / ev1[-1] < 1e-2


@pytest.mark.parametrize("train_mode", [False, True])
def test_batchnorm_model_flatness(train_mode):
    obj = bn_objective()
    obj.model.train()
    snap = snapshot(obj.model)
    ev = eigvalsh(dense_hessian(obj, train_mode=train_mode, vectorize=False).numpy())
    r = flatness(obj, k=2, train_mode=train_mode, trace_probes=12, tol=1e-8)
    scale = float(np.max(np.abs(ev)))
    assert r.converged and rel_err(r.eigenvalues, ev[::-1][:2], scale) < 1e-8
    assert rel_err(r.bottom_eigenvalues, ev[:2], scale) < 1e-8
    assert r.settings["train_mode"] is train_mode
    assert_unchanged(obj.model, snap)


def test_tiny_gpt_flatness():
    obj = tiny_gpt_objective()
    snap = snapshot(obj.model)
    r = flatness(obj, k=2, which="top", trace=False, density=True, density_probes=2, density_steps=10, tol=1e-8)
    assert r.converged and r.eigenvalues[0] > 0
    assert max(r.residuals) < 1e-4 * r.eigenvalues[0]
    assert r.density is not None and r.hvps["density"] == 20
    assert_unchanged(obj.model, snap)


def test_bad_settings_raise_user_errors(small_case):
    obj, _ = small_case
    for kw in ({"backend": "nope"}, {"which": "middle"}, {"k": 0}, {"trace_method": "xtrace"}, {"domains": "zzz"}):
        with pytest.raises(UserError):
            flatness(obj, **kw)


def test_result_json_roundtrip_and_figures(tmp_path, small_case):
    obj, _ = small_case
    rep = flatness(obj, k=2, domains="each", trace_probes=6, density=True, density_probes=2, density_steps=12)
    path = tmp_path / "f.json"
    rep.to_json(path)
    back = FlatnessResult.from_json(path)
    assert back.results["a"].density.grid == rep.results["a"].density.grid
    assert back.to_dict() == json.loads(path.read_text())
    from landscape.render.flatness import flatness_figure, flatness_html
    flatness_figure(rep, tmp_path / "f.png")
    flatness_figure(back.results["b"].to_dict(), tmp_path / "one.svg")
    flatness_figure(flatness(obj, k=2, trace=False), tmp_path / "nodens.png")
    flatness_html(rep, tmp_path / "f.html")
    for f in ("f.png", "one.svg", "nodens.png", "f.html"):
        assert (tmp_path / f).stat().st_size > 1000


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_flatness(tmp_path, tiny_mix_run):
    from conftest import assert_one_line_error, invoke_cli

    out = tmp_path / "flat.json"
    res = invoke_cli("flatness", tiny_mix_run.path, "--top-k", "2", "--domains", "each", "--trace-probes", "6",
                     "--json", out, "--plot", tmp_path / "flat.png", "--density-probes", "2", "--density-steps", "8")
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["command"] == "flatness"
    assert data["results"][0]["checkpoint"] == str(tiny_mix_run.path) and data["results"][0]["step"] is not None
    rep = FlatnessResult.from_dict(data["results"][0]["result"])
    assert set(rep.results) == {"a", "b", "c", "ood"} and all(r.converged for r in rep.results.values())
    assert rep.results["a"].density is not None and (tmp_path / "flat.png").stat().st_size > 1000
    res = invoke_cli("flatness", tiny_mix_run.path, "-k", "1", "--no-trace", "--backend", "pyhessian", "--json", "-")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)["results"][0]  # with --json -, stdout is only the JSON
    one = payload["result"]["results"]["train"]
    assert one["backend"] == "pyhessian" and one["bottom_eigenvalues"] is None
    res = invoke_cli("flatness", tiny_mix_run.path, "--domains", "nope")
    assert_one_line_error(res.exit_code, res.stderr, contains="unknown domain")


def test_one_return_type_and_deprecated_domain_keyword(small_case):
    """flatness always returns a FlatnessResult; one domain reads through; domain= still works, with a warning."""
    obj, _ = small_case
    one = flatness(obj, k=2, trace=False, tol=1e-8)
    assert isinstance(one, FlatnessResult) and one.domains == ["train"] and one.only is one["train"]
    assert one.lambda_max == one["train"].eigenvalues[0] and one.converged_by_domain == {"train": one.converged}
    with pytest.warns(DeprecationWarning):
        old = flatness(obj, k=2, trace=False, tol=1e-8, domain="train")
    assert old.eigenvalues == one.eigenvalues
    two = flatness(obj, k=2, trace=False, tol=1e-8, domains=["a", "train"])
    assert two.domains == ["a", "train"] and two["train"].eigenvalues == pytest.approx(one.eigenvalues, rel=1e-10)
    with pytest.raises(AttributeError, match="2 domains"):
        two.lambda_max
    with pytest.raises(TypeError):
        flatness(obj, 2)  # options are keyword-only
