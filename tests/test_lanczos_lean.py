"""Issue 22: the lean Lanczos of large models (float32 vectors, the basis a cold store in a file, partial
re-orthogonalisation), forced on small problems by lowering LEAN_MIN: the same answers as the dense Hessian and
as full re-orthogonalisation, ghosts prevented (and shown to appear without the orthogonality monitor),
repeated eigenvalues found, restarts within a small file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import landscape.eigen as eigen
import landscape.lanczos as lz
from landscape import flatness
from landscape.hvp import HessianOperator

from test_hvp import tiny_gpt_objective

pytestmark = pytest.mark.usefixtures("one_thread")


class Diag:
    """A float32 diagonal operator with a known spectrum."""

    def __init__(self, d: torch.Tensor):
        self.d, self.n, self.dtype, self.hvps = d.float(), d.numel(), torch.float32, 0

    def matvec(self, v):
        self.hvps += 1
        return self.d * v.to(torch.float32)


@pytest.fixture
def lean(monkeypatch):
    monkeypatch.setattr(eigen, "LEAN_MIN", 0)
    return monkeypatch


def _spectrum(n=20000, seed=0):
    """A well-separated top eigenvalue (its Ritz value converges early: the classic source of ghosts) over a
    dense [0, 1], then two near the continuum's edge."""
    d = torch.linspace(0, 1, n, dtype=torch.float64)
    d[-1], d[-2], d[-3] = 10.0, 1.05, 1.04
    return d[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def test_lean_partial_reorthogonalisation_prevents_ghosts(lean):
    d = _spectrum()
    truth = np.sort(d.numpy())[::-1][:3]
    r = lz._lanczos_run(Diag(d), 3, "top", tol=1e-6, seed=0, return_vectors=True)
    assert r.all_converged
    np.testing.assert_allclose(r.eigenvalues, truth, rtol=1e-6)
    assert r.vectors.dtype == torch.float32  # a lean run holds no float64 n-vector
    # the control: the same run without the orthogonality monitor reports copies of 10 as 'converged' eigenvalues
    lean.setattr(lz, "ORTH_EVERY", 10 ** 9)
    lean.setattr(lz, "ORTH_LEVEL", float("inf"))
    lean.setattr(lz, "ORTH_RESIDUAL", 0.0)
    bad = lz._lanczos_run(Diag(d), 3, "top", tol=1e-6, seed=0)
    assert bad.eigenvalues[1] > 9.0  # a ghost of the top eigenvalue


@pytest.mark.parametrize("restarts", [False, True])
def test_lean_equals_full_reorthogonalisation_both_ends(lean, restarts):
    g = torch.Generator().manual_seed(3)
    d = torch.rand(30000, generator=g, dtype=torch.float64) * 0.9
    d[:4] = torch.tensor([1.0, 0.99, 0.98, 0.97])
    d[4:7] = torch.tensor([-0.5, -0.49, -0.48])
    if restarts:  # a file of just 2k + 10 rows: the run must restart (in place, in the file)
        lean.setattr(eigen, "LEAN_FILE_BYTES", (2 * 4 + 10 + 1) * 4 * d.numel())
    r = lz.lanczos(Diag(d), 2, "both", tol=1e-6, seed=1)
    lean.setattr(eigen, "LEAN_MIN", 10 ** 12)
    f = lz.lanczos(Diag(d), 2, "both", tol=1e-6, seed=1)
    assert r.all_converged and f.all_converged
    if restarts:
        assert r.restarts > 0
    truth = np.sort(d.float().double().numpy())
    np.testing.assert_allclose(r.eigenvalues, truth[::-1][:2], atol=1e-6)
    np.testing.assert_allclose(r.bottom_eigenvalues, truth[:2], atol=1e-6)
    np.testing.assert_allclose(r.eigenvalues, f.eigenvalues, atol=1e-6)


def test_lean_finds_a_repeated_top_eigenvalue(lean):
    d = _spectrum(seed=1)
    d[d == 1.05] = 10.0  # 10 twice
    r = lz.lanczos(Diag(d), 2, "top", tol=1e-6, seed=0)
    assert r.all_converged
    np.testing.assert_allclose(r.eigenvalues, [10.0, 10.0], rtol=1e-6)
    one = lz.lanczos(Diag(d), 1, "top", tol=1e-4, seed=0)  # top-1: the check deflates one float32 vector
    assert one.all_converged and abs(one.eigenvalues[0] - 10.0) < 1e-3


def test_lean_flatness_matches_the_dense_hessian(lean):
    obj = tiny_gpt_objective()  # float32 weights
    op = HessianOperator(obj, precision="float32", copy=False)
    H = op.to_dense().double().numpy()
    truth = np.linalg.eigvalsh(0.5 * (H + H.T))
    r = flatness(obj, k=2, which="both", tol=1e-5, trace=False, precision="float32")
    assert r.converged and r.precision == "float32"
    scale = abs(truth).max()
    np.testing.assert_allclose(r.eigenvalues, truth[::-1][:2], atol=1e-4 * scale)
    np.testing.assert_allclose(r.bottom_eigenvalues, truth[:2], atol=1e-4 * scale)


def test_lean_plan_puts_the_rows_in_a_file_within_its_cap(tmp_path):
    n, kw = 1_000_000, 1
    p = eigen.lean_plan(n, kw, directory=str(tmp_path))
    assert p.lean and p.disk and p.dtype == torch.float32
    assert 2 * kw + 10 <= p.rows <= eigen.MAX_BASIS
    assert p.rows * 4 * n <= eigen.LEAN_FILE_BYTES
    assert p.resident_bytes(n, kw) == 4.0 * (kw + 3) * n  # no rows resident: three vectors and the Ritz vector


def _two_batch_gpt():
    """The tiny GPT with its 6 sequences in two batches (one per rank under 2 processes), its loss the same
    next-token cross-entropy as an OutputLoss (so the GGN runs too)."""
    from landscape.losses import TokenCrossEntropy

    obj = tiny_gpt_objective()
    (b,) = obj.domains["text"]
    t = b["tokens"]
    return type(obj)(obj.model, {"text": [{"tokens": t[:3]}, {"tokens": t[3:]}]}, TokenCrossEntropy())


def _lean_top2(obj, curvature="hessian"):
    return flatness(obj, k=2, which="top", tol=1e-5, trace=False, precision="float32", curvature=curvature)


def _lean_worker(rank: int, port: int, d: str) -> None:
    import json
    import os
    from datetime import timedelta

    import torch.distributed as dist

    import landscape.distributed as ld

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    eigen.LEAN_MIN = 0  # the lean path on a small model (a spawned interpreter: no monkeypatch here)
    calls = [0]
    inner = ld.ShardedOperator.matvec_into

    def counted(self, v, out):
        calls[0] += 1
        return inner(self, v, out)
    ld.ShardedOperator.matvec_into = counted
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        out = {}
        for c in ("hessian", "ggn"):  # the GGN operator has no matvec_into: the sharded one's fallback
            calls[0] = 0
            r = _lean_top2(_two_batch_gpt(), c)
            out[c] = {"eig": r.eigenvalues, "converged": r.converged, "calls": calls[0]}
        with open(os.path.join(d, f"lean{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch: ~10-20 s on 2 busy cores
def test_lean_lanczos_under_two_gloo_processes_equals_one(lean, tmp_path):
    import json

    import torch.distributed as dist

    from conftest import free_port, spawn_and_wait

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    from landscape.ggn import make_operator

    obj = _two_batch_gpt()
    spawn_and_wait(_lean_worker, (free_port(), str(tmp_path)), 2, 180, "lean workers")
    ranks = [json.loads((tmp_path / f"lean{r}.json").read_text()) for r in range(2)]
    tops = {}
    for c in ("hessian", "ggn"):
        M = make_operator(obj, "text", c, dtype=torch.float32).to_dense().double().numpy()
        truth = tops[c] = np.linalg.eigvalsh(0.5 * (M + M.T))[::-1][:2]
        scale = abs(truth[0])
        one = _lean_top2(obj, c)
        a, b = ranks[0][c], ranks[1][c]
        assert a["eig"] == b["eig"], c  # every rank ran on the same all-reduced products
        assert a["converged"] and b["converged"] and a["calls"] > 0 and b["calls"] > 0, c  # lean, sharded products
        np.testing.assert_allclose(a["eig"], truth, atol=1e-4 * scale, err_msg=c)
        np.testing.assert_allclose(a["eig"], one.eigenvalues, atol=1e-4 * scale, err_msg=c)
    truth = tops["hessian"]
    scale = abs(truth[0])
    # the control: one rank's share alone (what an unreduced product would give) has another top eigenvalue
    half = type(obj)(obj.model, {"text": obj.domains["text"][:1]}, obj.loss_fn)
    Hh = HessianOperator(half, precision="float32", copy=False).to_dense().double().numpy()
    assert abs(np.linalg.eigvalsh(0.5 * (Hh + Hh.T))[-1] - truth[0]) > 1e-2 * scale
