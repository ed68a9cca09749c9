"""Hessian-vector products against the dense Hessian of torch.autograd.functional.hessian (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape import Objective, UserError
from landscape.hvp import HessianOperator, curvature_along, numerics
from landscape.params import flatten, unflatten
from nexus_opt.models import GPT


pytestmark = pytest.mark.usefixtures("one_thread")


# -- objectives built by hand ----------------------------------------------------------------------
class Unused(nn.Module):
    """A small MLP with a parameter that never reaches the loss."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.dead = nn.Linear(2, 2)  # unused

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def ce_loss(model, batch):
    x = batch["x"].to(next(model.parameters()).dtype)
    return F.cross_entropy(model(x), batch["y"])


def classification_objective(model: nn.Module, seed: int = 0, n_batches: int = 2, bs: int = 12) -> Objective:
    g = torch.Generator().manual_seed(seed)
    doms = {}
    for d in ("p", "q"):
        doms[d] = [{"x": torch.randn(bs + i, 4, generator=g), "y": torch.randint(0, 3, (bs + i,), generator=g)}
                   for i in range(n_batches)]
    return Objective(model, doms, ce_loss, weights={"p": 0.3, "q": 0.7})


def bn_objective(seed: int = 0) -> Objective:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.0), nn.Linear(5, 3))
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return classification_objective(model, seed)


def dense_hessian(obj: Objective, domain=None, train_mode: bool = False, vectorize: bool = True) -> torch.Tensor:
    """The exact Hessian of the domain loss (sum of obj.terms) in float64, independent of landscape.hvp."""
    w = obj.to(dtype=torch.float64)
    P = {k: v.detach() for k, v in w.params().items()}

    def f(flat):
        p = unflatten(flat, P)
        return sum(c * w.functional_loss(p, b) for c, b in w.terms(domain))

    with w.evaluating(train_mode):
        return torch.autograd.functional.hessian(f, flatten(P), vectorize=vectorize)


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "dtypes": [p.dtype for p in model.parameters()], "flags": [m.training for m in model.modules()],
            "grads": [p.grad for p in model.parameters()], "req": [p.requires_grad for p in model.parameters()]}


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["dtypes"] == snap["dtypes"] and now["flags"] == snap["flags"] and now["req"] == snap["req"]
    assert all(g is None for g in now["grads"])
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


@pytest.fixture(scope="module")
def unused_case():
    torch.manual_seed(0)
    obj = classification_objective(Unused())
    return obj, dense_hessian(obj)


# -- tests -----------------------------------------------------------------------------------------
def test_matvec_matmat_and_scipy_match_dense(unused_case):
    obj, H = unused_case
    op = HessianOperator(obj)
    assert op.n == H.shape[0] == obj.num_params()
    g = torch.Generator().manual_seed(1)
    V = torch.randn(op.n, 9, generator=g, dtype=torch.float64)
    ref = H @ V
    HV = op.matmat(V)
    assert op.hvps == 9
    assert torch.allclose(HV, ref, rtol=1e-10, atol=1e-12)
    loop = torch.stack([op.matvec(V[:, j]) for j in range(9)], dim=1)
    assert op.hvps == 18
    assert torch.allclose(HV, loop, rtol=1e-12, atol=1e-13)
    lin = op.to_scipy()
    assert np.allclose(lin.matvec(V[:, 0].numpy()), ref[:, 0].numpy(), rtol=1e-10, atol=1e-12)
    assert np.allclose(lin @ V.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
    # every batched-product method gives the same block
    for method in ("loop", "fwd_rev", "auto"):
        other_op = HessianOperator(obj, batched=method)
        for _ in range(3):  # 'auto' times both batched methods on its first calls (CUDA), then keeps the faster
            assert torch.allclose(other_op.matmat(V), ref, rtol=1e-10, atol=1e-12), method
        assert other_op.batched == method
    assert set(other_op._timing) == {"grads_batched"}  # on a CPU: double backward, no forward-over-reverse warm-up
    no_cache = HessianOperator(obj, batched="auto", cache=False)  # without a retained graph both are timed
    for _ in range(3):
        assert torch.allclose(no_cache.matmat(V), ref, rtol=1e-10, atol=1e-12)
    assert set(no_cache._timing) == {"grads_batched", "fwd_rev"}
    # no cached graph: the same products
    assert torch.allclose(HessianOperator(obj, cache=False).matmat(V[:, :3]), ref[:, :3], rtol=1e-10, atol=1e-12)


def test_unused_parameters_give_zero_rows(unused_case):
    obj, H = unused_case
    op = HessianOperator(obj)
    sl = {}
    i = 0
    for name, p in obj.params().items():
        sl[name] = slice(i, i + p.numel())
        i += p.numel()
    dead = torch.cat([torch.arange(op.n)[sl["dead.weight"]], torch.arange(op.n)[sl["dead.bias"]]])
    V = torch.zeros(op.n, 2, dtype=torch.float64)
    V[dead[0], 0] = 1.0
    V[:, 1] = 1.0
    HV = op.matmat(V)
    assert torch.all(HV[:, 0] == 0) and torch.all(HV[dead, 1] == 0)
    assert torch.all(H[dead] == 0)


def test_finite_difference_close_to_exact(unused_case):
    obj, H = unused_case
    op = HessianOperator(obj, mode="finite_difference")
    V = torch.randn(op.n, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = H @ V
    fd = op.matmat(V)
    assert op.hvps == 3
    assert float((fd - ref).norm() / ref.norm()) < 1e-7


def test_domain_terms_weighting(unused_case):
    obj, H = unused_case
    Hp, Hq = dense_hessian(obj, "p"), dense_hessian(obj, "q")
    assert torch.allclose(0.3 * Hp + 0.7 * Hq, H, atol=1e-12)
    v = torch.randn(obj.num_params(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(HessianOperator(obj, "q").matvec(v), Hq @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(UserError):
        HessianOperator(obj, "each")
    with pytest.raises(UserError):
        HessianOperator(obj).matvec(torch.ones(3))


@pytest.mark.parametrize("train_mode", [False, True])
def test_batchnorm_eval_and_train_mode(train_mode):
    obj = bn_objective()
    snap = snapshot(obj.model)
    H = dense_hessian(obj, train_mode=train_mode, vectorize=False)
    op = HessianOperator(obj, train_mode=train_mode)
    V = torch.randn(op.n, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-9, atol=1e-11)
    other = dense_hessian(obj, train_mode=not train_mode, vectorize=False)
    assert float((other - H).norm()) > 1e-3 * float(H.norm())  # the two modes really differ
    assert_unchanged(obj.model, snap)


def test_curvature_along_matches_dense(unused_case):
    obj, H = unused_case
    g = torch.Generator().manual_seed(5)
    us = [torch.randn(obj.num_params(), generator=g, dtype=torch.float64) for _ in range(3)]
    us.append(torch.zeros(obj.num_params()))
    us.append(us[0].float() * 3.0)  # any dtype and scale
    got = curvature_along(obj, us)
    for u, c in zip(us[:3], got[:3]):
        assert c == pytest.approx(float(u @ H @ u / (u @ u)), rel=1e-10)
    assert math.isnan(got[3])
    assert got[4] == pytest.approx(got[0], rel=1e-6)
    assert curvature_along(obj, []) == []
    with pytest.raises(UserError):
        curvature_along(obj, [torch.ones(5)])


def test_caller_model_untouched_and_flags_restored(unused_case):
    obj, _ = unused_case
    obj.model.train()
    snap = snapshot(obj.model)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    op = HessianOperator(obj)
    op.matmat(torch.ones(op.n, 2))
    curvature_along(obj, [torch.ones(op.n)])
    assert_unchanged(obj.model, snap)
    assert next(obj.model.parameters()).dtype == torch.float32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    with numerics():
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32


def lm_loss(model, batch):
    tok = batch["tokens"]
    logits = model(tok[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))


def tiny_gpt_objective() -> Objective:
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    text = torch.frombuffer(bytearray(b"the quick brown fox jumps over the lazy dog " * 4), dtype=torch.uint8).long()
    starts = torch.randint(0, len(text) - 9, (6,), generator=g).tolist()
    batch = {"tokens": torch.stack([text[s:s + 9] for s in starts])}
    return Objective(model, {"text": [batch]}, lm_loss)


def test_tiny_gpt_double_backward_through_attention():
    obj = tiny_gpt_objective()
    snap = snapshot(obj.model)
    op = HessianOperator(obj)
    g = torch.Generator().manual_seed(6)
    U = torch.randn(op.n, 3, generator=g, dtype=torch.float64)
    HU = op.matmat(U)  # no "derivative for _scaled_dot_product_*_attention_backward not implemented" error
    assert torch.isfinite(HU).all() and float(HU.norm()) > 0
    assert float(U[:, 0] @ HU[:, 1]) == pytest.approx(float(U[:, 1] @ HU[:, 0]), rel=1e-9)  # symmetric
    fd = HessianOperator(obj, mode="finite_difference").matvec(U[:, 0])
    assert float((fd - HU[:, 0]).norm() / HU[:, 0].norm()) < 1e-6
    loop = op.matvec(U[:, 2])
    assert torch.allclose(loop, HU[:, 2], rtol=1e-10, atol=1e-12)
    assert_unchanged(obj.model, snap)
