"""Issue 22: the precision policy. Float32 products on the model's own weights against float64 on a copy (same
eigenvalues, trace and cosines within the recorded error estimates), 'auto' by parameter count, the errors
recorded, the model untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape import flatness, gradient_similarity
from landscape import precision as prec
from landscape.objective import Objective
from nexus_opt.errors import UserError

from test_hvp import assert_unchanged, snapshot, tiny_gpt_objective

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt_pair():
    obj = tiny_gpt_objective()  # float32, 3,000 parameters
    kw = dict(k=3, which="both", trace_probes=24, trace_method="hutchinson", tol=1e-6)
    r64 = flatness(obj, precision="float64", **kw)
    snap = snapshot(obj.model)
    r32 = flatness(obj, precision="float32", **kw)
    assert_unchanged(obj.model, snap)
    return obj, r32, r64


def test_float32_eigenvalues_within_the_recorded_errors_of_float64(gpt_pair):
    _, r32, r64 = gpt_pair
    assert r32.precision == "float32" and r64.precision == "float64"
    assert r32.settings["own_weights"] and not r64.settings["own_weights"]  # no private copy in float32
    assert r32.converged and r64.converged
    assert r32.precision_error > 0 and r32.hvps["precision"] == 4  # 2 products for the eigenvalues, 2 the trace
    for a, b, ea, eb in ((r32.eigenvalues, r64.eigenvalues, r32.errors, r64.errors),
                         (r32.bottom_eigenvalues, r64.bottom_eigenvalues, r32.bottom_errors, r64.bottom_errors)):
        a, b = np.array(a), np.array(b)
        diff = np.abs(a - b)
        assert np.all(diff <= np.array(ea) + np.array(eb) + 1e-6 * abs(r64.lambda_max)), (a, b, ea)
        assert np.all(diff <= 1e-4 * abs(r64.lambda_max))  # and float32 is close in absolute terms
    assert all(e >= r32.precision_error for e in r32.errors)  # the rounding bound is part of each error


def test_float32_trace_within_its_precision_error(gpt_pair):
    _, r32, r64 = gpt_pair
    # the same probes: the only difference is rounding, which the recorded bound covers
    assert abs(r32.trace - r64.trace) <= r32.trace_precision_error + 1e-9 * abs(r64.trace)
    assert abs(r32.trace - r64.trace) <= 1e-3 * r64.trace_stderr * 10 + 1e-5 * abs(r64.trace)


def test_float32_cosines_within_their_precision_error():
    obj = tiny_gpt_objective()
    text = obj.domains["text"][0]
    two = Objective(obj.model, {"a": [{"tokens": text["tokens"][:3]}], "b": [{"tokens": text["tokens"][3:]}]},
                    obj.loss_fn)
    r64 = gradient_similarity(two, precision="float64", resamples=0)
    r32 = gradient_similarity(two, precision="float32", resamples=0)
    assert r32.settings["precision"] == "float32" and r32.settings["dtype"] == "float32"
    assert r64.settings["dtype"] == "float64"
    assert 0 < r32.cosine_precision_error < 1e-4
    c32, c64 = np.array(r32.cosine, dtype=float), np.array(r64.cosine, dtype=float)
    assert np.nanmax(np.abs(c32 - c64)) <= r32.cosine_precision_error + r64.cosine_precision_error
    assert abs(r32.split_half["a"] - r64.split_half["a"]) <= 2 * r32.cosine_precision_error


def test_auto_picks_float64_where_cheap_and_float32_beyond(monkeypatch):
    assert prec.resolve("auto", 1000) == torch.float64
    assert prec.resolve("auto", 2_000_000) == torch.float32
    assert prec.resolve("auto", 200_000, device="cuda") == torch.float32
    assert prec.resolve("float32", 10, dtype=torch.float64) == torch.float64  # the explicit dtype wins
    obj = tiny_gpt_objective()
    assert flatness(obj, k=1, which="top", trace=False).precision == "float64"  # 3,000 parameters: cheap
    monkeypatch.setattr(prec, "AUTO_FLOAT64_MAX_CPU", 1000)
    r = flatness(obj, k=1, which="top", trace=False)
    assert r.precision == "float32" and r.settings["precision"] == "auto" and r.settings["own_weights"]
    with pytest.raises(UserError, match="precision"):
        flatness(obj, k=1, precision="float16")


def test_float32_runs_on_the_models_own_weights(monkeypatch):
    obj = tiny_gpt_objective()

    def no_copy(*a, **k):
        raise AssertionError("a private copy was made")

    monkeypatch.setattr(Objective, "to", no_copy)
    r = flatness(obj, k=1, which="top", trace=False, precision="float32")
    assert r.converged and r.precision == "float32"


MEMORY_SCRIPT = r'''
import json, sys, torch, torch.nn as nn
from landscape import Objective, flatness
from landscape.cost import flatness_estimate
torch.set_num_threads(1)
def status(key):  # VmHWM is this process's own peak (ru_maxrss keeps the forking parent's after exec)
    with open("/proc/self/status") as f:
        return next(float(l.split()[1]) * 1024 for l in f if l.startswith(key))
torch.manual_seed(0)
w = 700
model = nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1))
g = torch.Generator().manual_seed(0)
b = {"x": torch.randn(32, 64, generator=g), "y": torch.randn(32, 1, generator=g)}
obj = Objective(model, {"d": [b]}, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean())
est = flatness_estimate(obj, k=1, which="top", trace=False, precision=sys.argv[1], time_one=False)
base = status("VmRSS")
r = flatness(obj, k=1, which="top", trace=False, precision=sys.argv[1])
peak = status("VmHWM") - base
print(json.dumps({"est": est.peak_bytes, "peak": peak, "converged": r.converged}))
'''


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_memory_estimate_within_a_factor_two_of_the_measured_peak(precision):
    """The formula (model copy + graph + product + basis) against the peak resident memory a fresh process
    adds while flatness runs on a 537k-parameter MLP (analysis memory well above the interpreter's noise)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, precision], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["converged"]
    assert 0.5 <= got["peak"] / got["est"] <= 2.0, got


def test_cli_estimate_prints_the_formula_and_stops(tmp_path, tiny_mix_run):
    from conftest import run_cli_process

    target = tmp_path / "f.json"
    p = run_cli_process("flatness", tiny_mix_run.path, "--estimate", "--json", target)
    assert p.returncode == 0, p.stderr
    assert "estimate:" in p.stderr and "memory ~" in p.stderr and "one product" in p.stderr
    assert not target.exists()  # nothing was measured, nothing written
    p = run_cli_process("flatness", tiny_mix_run.path, "--estimate", "--precision", "float16")
    assert p.returncode == 2 and "precision" in p.stderr


def test_gradsim_rows_streamed_from_disk_equal_rows_in_memory():
    """The O(n)-memory path (rows in a temporary file, Gram matrices accumulated over column chunks) gives
    the in-memory numbers."""
    from landscape import gradsim

    obj = tiny_gpt_objective()
    text = obj.domains["text"][0]["tokens"]
    three = Objective(obj.model, {"a": [{"tokens": text[:2]}, {"tokens": text[2:3]}], "b": [{"tokens": text[3:]}]},
                      obj.loss_fn)
    mem = gradient_similarity(three, resamples=10, in_memory=True)
    from landscape.basis import Basis

    old = Basis.CHUNK_BYTES
    Basis.CHUNK_BYTES = 8 * 4 * 1024  # many chunks
    try:
        disk = gradient_similarity(three, resamples=10, in_memory=False)
    finally:
        Basis.CHUNK_BYTES = old
    assert mem.settings["in_memory"] and not disk.settings["in_memory"]
    np.testing.assert_allclose(np.array(disk.cosine, dtype=float), np.array(mem.cosine, dtype=float), atol=1e-12)
    np.testing.assert_allclose(np.array(disk.cosine_stderr, dtype=float), np.array(mem.cosine_stderr, dtype=float),
                               atol=1e-12)
    for name, m in mem.per_layer.items():
        np.testing.assert_allclose(np.array(disk.per_layer[name], dtype=float), np.array(m, dtype=float), atol=1e-12)
    assert disk.split_half == pytest.approx(mem.split_half, abs=1e-12)


def test_basis_plan_keeps_to_its_budget_with_no_floor():
    from landscape.eigen import STEP_BYTES, basis_plan

    n = 10_000_000
    p = basis_plan(n, 1, basis_bytes=8 * n * 40)  # 40 float64 rows' worth, float64 products
    assert p.dtype == torch.float64 and not p.disk and p.resident_bytes(n, 1) <= 8 * n * 40
    assert p.rows == 12  # 2 kw + 10: more rows than STEP_BYTES would cost more traffic per step than they save
    assert 12 * 8 * n > STEP_BYTES
    p = basis_plan(n, 1, basis_bytes=4 * n * 20)  # 12 float64 rows do not fit: float32 rows
    assert p.dtype == torch.float32 and p.rows == STEP_BYTES // (4 * n) and not p.disk
    p = basis_plan(n, 10, basis_bytes=8 * n * 27)  # 30 float64 rows do not fit: float32 rows
    assert p.dtype == torch.float32 and p.rows >= 30 and p.resident_bytes(n, 10) <= 8 * n * 27
    p = basis_plan(n, 10, basis_bytes=8 * n * 12)  # not even 30 float32 rows: a file of them
    assert p.disk and p.dtype == torch.float32 and p.rows == 30 and p.resident_bytes(n, 10) <= 8 * n * 12
    with pytest.raises(UserError, match="returns 10 float64 vectors"):
        basis_plan(n, 10, basis_bytes=8 * n * 5)
    assert basis_plan(50_000, 5, basis_bytes=2 ** 30).rows == 200  # small models: the full basis


def test_lanczos_on_a_disk_basis_equals_the_memory_basis():
    """Rows in a temporary file (pread/pwrite, float32) give the same eigenvalues as float32 rows in memory,
    and the file is removed after."""
    import glob
    import tempfile

    from landscape.lanczos import lanczos

    class Diag:
        n, hvps, dtype = 3000, 0, torch.float32
        d = torch.linspace(-1.0, 1.0, 3000, dtype=torch.float64) ** 3
        d[-3:] = torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64)  # a repeated eigenvalue under the top

        def matvec(self, v):
            self.hvps += 1
            return (self.d * v.double()).float()

    before = set(glob.glob(f"{tempfile.gettempdir()}/landscape-basis-*"))
    row = 4 * Diag.n
    mem = lanczos(Diag(), 3, "top", tol=1e-5, basis_bytes=8 * 3 * Diag.n + row * 40)
    disk = lanczos(Diag(), 3, "top", tol=1e-5, basis_bytes=8 * 3 * Diag.n + row * 5)
    assert mem.all_converged and disk.all_converged
    np.testing.assert_allclose(disk.eigenvalues, [3.0, 2.0, 2.0], atol=1e-4)
    np.testing.assert_allclose(disk.eigenvalues, mem.eigenvalues, atol=1e-5)
    assert set(glob.glob(f"{tempfile.gettempdir()}/landscape-basis-*")) == before


def test_basis_operations_match_dense_algebra_in_memory_and_on_disk():
    from landscape.basis import Basis

    g = torch.Generator().manual_seed(0)
    R = torch.randn(5, 5000, generator=g, dtype=torch.float64)
    w = torch.randn(5000, generator=g, dtype=torch.float64)
    S = np.random.default_rng(0).standard_normal((5, 3))
    for disk in (False, True):
        B = Basis(5000, torch.float32, 6, disk=disk)
        B.CHUNK_BYTES = 8 * 5 * 1024  # several column chunks
        for r in R:
            B.append(r)
        Rf = R.float().double()
        np.testing.assert_allclose(B.dots(w).numpy(), (Rf @ w).numpy(), rtol=1e-12)
        x = w.clone()
        B.subtract(x, torch.arange(5, dtype=torch.float64))
        np.testing.assert_allclose(x.numpy(), (w - Rf.T @ torch.arange(5, dtype=torch.float64)).numpy(), rtol=1e-12)
        np.testing.assert_allclose(B.combine(S).numpy(), (Rf.T @ torch.from_numpy(S)).numpy(), rtol=1e-12)
        B.restart(S)
        assert len(B) == 3
        np.testing.assert_allclose(B.row(1).numpy(), (Rf.T @ torch.from_numpy(S))[:, 1].float().double().numpy(),
                                   rtol=1e-6)
        B.close()


def test_lanczos_basis_grows_only_as_far_as_the_run_goes():
    """A top-1 run that converges in a few steps writes a few rows, not the whole budget."""
    from landscape.basis import Basis
    from landscape.lanczos import lanczos

    sizes = []
    orig = Basis.append

    def spy(self, v, background=False):
        orig(self, v, background)
        sizes.append(self.count)

    class Diag:
        n, hvps, dtype = 5000, 0, torch.float64
        d = torch.linspace(0.0, 1.0, 5000, dtype=torch.float64) ** 4
        d[-1] = 2.0  # a gap: the top one converges in a few steps

        def matvec(self, v):
            self.hvps += 1
            return self.d * v

    Basis.append = spy
    try:
        r = lanczos(Diag(), 1, "top", tol=1e-4, basis_bytes=8 * 5000 * 150)
    finally:
        Basis.append = orig
    assert r.all_converged and abs(r.eigenvalues[0] - 2.0) < 1e-3
    assert max(sizes) < 40  # rows written (pages touched), of a budget of 150
