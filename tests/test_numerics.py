"""Issue 10: eigenvalues with multiplicities on every backend, bad losses refused before work, noise floors for
any batch nesting, adaptive trace."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape import Objective, UserError, closeness, flatness, gradient_similarity
from landscape.lanczos import dense, eigsh, lanczos, verify_extremes
from landscape.trace import estimate_trace


class Quadratic(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self):
        return self.theta


def spectrum_objective(ev: torch.Tensor, seed: int = 0) -> Objective:
    """A quadratic whose Hessian has exactly the eigenvalues `ev` in a random basis."""
    n = ev.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(ev) @ Q.T
    H = 0.5 * (H + H.T)
    return Objective(Quadratic(n), {"d": [{"H": H[None]}]}, lambda m, b: 0.5 * m() @ (b["H"][0] @ m()))


def degenerate_spectrum(n: int = 120) -> torch.Tensor:
    ev = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    ev[:3] = -2.0                                          # multiplicity 3 at the bottom
    ev[3:5] = torch.tensor([-1.5, -1.5 + 1e-9])            # a tight cluster just above it
    ev[-4:] = torch.tensor([5.0, 5.0, 5.0, 5.0 + 1e-10])    # a (near-)repeated top
    ev[40:84] = 0.0                                        # 44 exact zeros (an unused head)
    return ev


@pytest.mark.parametrize("backend", ["lanczos", "eigsh", "dense"])
@pytest.mark.parametrize("which", ["both", "top", "bottom"])
def test_every_backend_finds_repeated_clustered_zero_and_negative_eigenvalues(backend, which):
    ev = degenerate_spectrum()
    truth = np.sort(ev.numpy())
    obj = spectrum_objective(ev)
    r = flatness(obj, k=6, which=which, backend=backend, trace=False)
    assert r.converged
    if which in ("both", "top"):
        np.testing.assert_allclose(r.eigenvalues, truth[::-1][:6], atol=1e-4 * 5)
    if which in ("both", "bottom"):
        np.testing.assert_allclose(r.bottom_eigenvalues, truth[:6], atol=1e-4 * 5)


def test_psd_spectrum_with_44_zeros_at_the_bottom():
    ev = degenerate_spectrum().abs() + 0.1
    ev[40:84] = 0.0
    obj = spectrum_objective(ev, seed=1)
    for backend in ("lanczos", "eigsh", "dense"):
        r = flatness(obj, k=5, which="bottom", backend=backend, trace=False)
        assert r.converged and np.max(np.abs(r.bottom_eigenvalues)) < 1e-6, (backend, r.bottom_eigenvalues)


class Op:
    def __init__(self, H):
        self.H, self.n, self.hvps = H, H.shape[0], 0

    def matvec(self, v):
        self.hvps += 1
        return self.H @ v

    def matmat(self, V):
        self.hvps += V.shape[1]
        return self.H @ V


def test_without_the_check_one_krylov_space_misses_copies_and_the_check_catches_it():
    ev = degenerate_spectrum()
    obj = spectrum_objective(ev)
    H = obj.domains["d"][0]["H"][0]
    plain = lanczos(Op(H), 4, "bottom", verify=False, return_vectors=True)
    missed = not np.allclose(plain.eigenvalues[:3], -2.0, atol=1e-6)  # the defect (rounding may hide it)
    flagged = verify_extremes(Op(H), plain, 4, "bottom", tol=1e-8, repair=False)
    assert flagged.all_converged != missed  # a cross-check that cannot repair says so, and only then
    # a plain run that surely misses: the start vector has no component along two of the three copies
    ev = degenerate_spectrum()
    Hd = torch.diag(ev)
    v0 = torch.ones(ev.numel(), dtype=torch.float64)
    v0[:2] = 0.0
    blind = lanczos(Op(Hd), 4, "bottom", verify=False, return_vectors=True, v0=v0)
    assert not np.allclose(blind.eigenvalues[:3], -2.0, atol=1e-6)
    assert not verify_extremes(Op(Hd), blind, 4, "bottom", tol=1e-8, repair=False).all_converged
    for check_tol in (None, 1e-2):  # full-tolerance rounds, or the cheap first pass
        repaired = verify_extremes(Op(Hd), blind, 4, "bottom", tol=1e-8, check_tol=check_tol)
        assert repaired.all_converged
        np.testing.assert_allclose(repaired.eigenvalues, [-2, -2, -2, -1.5], atol=1e-6)
    fixed = lanczos(Op(H), 4, "bottom")
    np.testing.assert_allclose(fixed.eigenvalues, [-2, -2, -2, -1.5], atol=1e-6)
    assert fixed.all_converged
    np.testing.assert_allclose(dense(Op(H), 4, "bottom").eigenvalues, np.sort(ev.numpy())[:4], atol=1e-12)


def test_dense_refuses_large_models():
    class Big:
        n, hvps = 10 ** 6, 0
    with pytest.raises(UserError, match="dense"):
        dense(Big(), 3)


def test_pyhessian_cannot_claim_a_missed_multiplicity():
    pytest.importorskip("pyhessian.hessian")
    ev = torch.linspace(0.1, 1.0, 40, dtype=torch.float64)
    ev[-1] = -6.0  # the largest |eigenvalue| is negative: power iteration returns it as a "top" value
    obj = spectrum_objective(ev, seed=2)
    r = flatness(obj, k=2, which="top", backend="pyhessian", trace=False)
    top = np.sort(ev.numpy())[::-1][:2]
    assert not (np.allclose(r.eigenvalues, top, atol=1e-2)) or r.converged
    assert not r.converged  # its answer includes -6, and the check says it is not the top


# -- bad objectives are refused at once ----------------------------------------------------------------
def tiny(loss_fn):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    doms = {"a": [{"x": torch.randn(8, 3), "y": torch.randn(8, 1)}] * 2, "b": [{"x": torch.randn(8, 3),
                                                                                "y": torch.randn(8, 1)}]}
    return Objective(model, doms, loss_fn)


BAD = {
    "nan": (lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean() * float("nan"), "nan"),
    "vector": (lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"], reduction="none"), "shape"),
    "constant": (lambda m, b: torch.tensor(0.5), "does not depend"),
    "detached": (lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean().detach().requires_grad_(), "does not depend"),
}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("analyzer", ["flatness", "gradsim", "closeness"])
def test_bad_losses_refused_in_under_a_second(kind, analyzer):
    fn, words = BAD[kind]
    obj = tiny(fn)
    call = {"flatness": lambda: flatness(obj, k=1), "gradsim": lambda: gradient_similarity(obj),
            "closeness": lambda: closeness(obj)}[analyzer]
    t = time.perf_counter()
    with pytest.raises(UserError, match=words) as e:
        call()
    assert time.perf_counter() - t < 1.0
    assert "domain 'a', batch 0" in str(e.value) and "\n" not in str(e.value)


def test_validate_names_the_failing_batch():
    def loss(m, b):
        out = ((m(b["x"]) - b["y"]) ** 2).mean()
        return out * float("inf") if b["x"].shape[0] == 5 else out
    obj = tiny(lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean())
    obj.domains["b"].append({"x": torch.randn(5, 3), "y": torch.randn(5, 1)})
    obj.loss_fn = loss
    obj._wrapped.loss_fn = loss
    obj.validate(["a"])
    with pytest.raises(UserError, match="domain 'b', batch 1"):
        obj.validate()


# -- noise floor for any batch nesting -----------------------------------------------------------------
def test_tuple_and_dict_batches_give_identical_noise_floors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    data = {d: (torch.randn(24, 3), torch.randn(24, 1)) for d in ("a", "b", "c")}
    as_dict = Objective(model, {d: [{"x": x, "y": y}] for d, (x, y) in data.items()},
                        lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean())
    as_tuple = Objective(model, {d: [(x, y)] for d, (x, y) in data.items()},
                         lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    nested = Objective(model, {d: [[{"inp": x}, (y,)]] for d, (x, y) in data.items()},
                       lambda m, b: ((m(b[0]["inp"]) - b[1][0]) ** 2).mean())
    rd, rt, rn = (gradient_similarity(o, resamples=50) for o in (as_dict, as_tuple, nested))
    for r in (rt, rn):
        assert all(r.split_half[d] is not None for d in r.domains)
        assert r.split_half == pytest.approx(rd.split_half, abs=1e-12)
        assert np.allclose(np.array(r.cosine_stderr, dtype=float), np.array(rd.cosine_stderr, dtype=float),
                           atol=1e-12)
        assert np.allclose(np.array(r.cosine, dtype=float), np.array(rd.cosine, dtype=float), atol=1e-12)


# -- adaptive trace -------------------------------------------------------------------------------------
def test_adaptive_trace_stops_at_its_target_and_is_right():
    ev = torch.linspace(0.5, 2.0, 300, dtype=torch.float64)
    obj = spectrum_objective(ev, seed=3)
    r = flatness(obj, k=1, which="top")
    assert r.trace_stop == "target" and r.trace_stderr <= 0.01 * abs(r.trace)
    assert abs(r.trace - float(ev.sum())) <= 4 * r.trace_stderr
    H = obj.domains["d"][0]["H"][0]
    t = estimate_trace(Op(H), "hutchinson", None, target=1e-6, max_probes=30)
    assert t.stop == "budget" and t.probes == 30
