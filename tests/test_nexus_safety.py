"""Nexus cannot corrupt silently (issue 14): non-finite gradients, all-or-nothing load_state_dict, a finite
inner_lr, and parameters without a gradient treated as the outer optimizer alone treats them."""
from __future__ import annotations

import copy

import pytest
import torch

from nexus_opt import Nexus
from test_nexus import GAMMA, K, MultiHead, adamw, groups_of, loss_fn, make_batches

MODES = ["sequential", "parallel"]


def _run(model, opt, batches, poison=None):
    """nexus_run, with micro-batch m's gradient replaced by `poison[m](grad)` where given."""
    for m, batch in enumerate(batches):
        loss_fn(model, batch).backward()
        if poison and m in poison:
            ps = [p for p in model.parameters() if p.grad is not None]
            poison[m](ps[0].grad)
        opt.step()
        opt.zero_grad()


def _nan(g):
    g.view(-1)[0] = float("nan")


def _inf(g):
    g.view(-1)[-1] = float("-inf")


def _zero_all_grads_of(model):
    def f(_):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
    return f


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- non-finite gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("host_read", [True, False], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("mode", MODES)
def test_regression_nonfinite_gradient_is_skipped_and_counted(monkeypatch, host_read, mode):
    """Issue 14.6: one NaN or Inf gradient element turned every weight non-finite. Now that micro-batch's inner
    step is skipped: the run equals one where its gradient was zero, and the skip is counted."""
    monkeypatch.setattr(Nexus, "_host_read_is_free", staticmethod(lambda t: host_read))
    batches = make_batches(4 * K)
    a, b = MultiHead(), MultiHead()
    opt_a = Nexus(adamw(a.parameters()), inner_lr=GAMMA, inner_steps=K, mode=mode)
    opt_b = Nexus(adamw(b.parameters()), inner_lr=GAMMA, inner_steps=K, mode=mode)
    _run(a, opt_a, batches, poison={2: _nan, 9: _inf})
    _run(b, opt_b, batches, poison={2: _zero_all_grads_of(b), 9: _zero_all_grads_of(b)})
    assert _finite(a) and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert opt_a.nonfinite_skips == 2 and opt_b.nonfinite_skips == 0
    assert opt_a.state_dict()["nonfinite_skips"] == 2
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), MultiHead().parameters()))  # it trained


def test_regression_nonfinite_skip_does_not_sync_on_accelerators(monkeypatch):
    """On the accelerator path an inner step never reads a device value on the host (bool/item/float/int)."""
    monkeypatch.setattr(Nexus, "_host_read_is_free", staticmethod(lambda t: False))
    model = MultiHead()
    opt = Nexus(adamw(model.parameters()), inner_lr=GAMMA, inner_steps=K, nonfinite="skip")
    for m, batch in enumerate(make_batches(K - 1)):  # inner steps only: the outer AdamW step may read its counters
        loss_fn(model, batch).backward()
        if m == 1:
            _nan(next(p for p in model.parameters() if p.grad is not None).grad)

        def refuse(*a, **k):
            raise AssertionError("host sync inside Nexus.step()")

        with monkeypatch.context() as mp:
            for name in ("__bool__", "item", "__float__", "__int__", "tolist"):
                mp.setattr(torch.Tensor, name, refuse)
            opt.step()
        opt.zero_grad()
    assert opt.nonfinite_skips == 1 and _finite(model)


@pytest.mark.parametrize("mode", MODES)
def test_regression_nonfinite_raise_changes_nothing(mode):
    batches = make_batches(K + 2)
    model = MultiHead()
    opt = Nexus(adamw(model.parameters()), inner_lr=GAMMA, inner_steps=K, mode=mode, nonfinite="raise")
    _run(model, opt, batches[:K + 1])
    before_w = [p.detach().clone() for p in model.parameters()]
    before = copy.deepcopy(opt.state_dict())
    loss_fn(model, batches[K + 1]).backward()
    _inf(next(p for p in model.parameters() if p.grad is not None).grad)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before_w))
    _assert_same_state(opt.state_dict(), before)


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite"):
        Nexus(adamw(MultiHead().parameters()), nonfinite="ignore")


# -- load_state_dict: validated first, all or nothing ---------------------------------------------------------
def _assert_same_state(a, b) -> None:
    """Nested structures equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


def _pair(mode="sequential", outers=1):
    """(model, opt) trained K+1 micro-steps, and a valid state_dict from a run further on (different values)."""
    def build():
        m = MultiHead()
        if outers == 1:
            return m, Nexus(adamw(groups_of(m, [1e-2, 3e-3])), inner_lr=GAMMA, inner_steps=K, mode=mode)
        return m, Nexus([adamw(list(m.trunk.parameters())), adamw(list(m.heads.parameters()))], inner_lr=GAMMA,
                        inner_steps=K, mode=mode)

    batches = make_batches(4 * K)
    model, opt = build()
    _run(model, opt, batches[:K + 1])
    other_model, other = build()
    _run(other_model, other, batches[:3 * K + 2])
    return model, opt, copy.deepcopy(other.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_regression_load_state_dict_is_all_or_nothing(mode):
    """Issue 14.6: phase=99 or -5 were accepted, and a bad micro_step failed after the outer state and anchor
    were loaded. Every bad field now fails first, with one line, and the optimizer is exactly as before."""
    model, opt, good = _pair(mode)
    before = copy.deepcopy(opt.state_dict())
    outer_before = copy.deepcopy(opt.outer.state_dict())
    key = "anchor" if mode == "sequential" else "displacement"
    nan_buf = [list(g) for g in good[key]]
    nan_buf[0][0] = torch.full_like(nan_buf[0][0], float("nan"))
    f32_buf = [list(g) for g in good[key]]
    f32_buf[0][0] = f32_buf[0][0].float()
    bad_outer = copy.deepcopy(good["outer"])
    bad_outer[0]["param_groups"] = bad_outer[0]["param_groups"][:1]
    bad_state = copy.deepcopy(good["outer"])
    pid = next(iter(bad_state[0]["state"]))
    bad_state[0]["state"][pid]["exp_avg"] = torch.zeros(7, dtype=torch.float64)
    bad_lr = copy.deepcopy(good["outer"])
    bad_lr[0]["param_groups"][0]["inner_lr"] = float("inf")
    cases = {
        "phase=99": dict(phase=99), "phase=-5": dict(phase=-5), "phase=1.5": dict(phase=1.5),
        "micro_step=-1": dict(micro_step=-1), "micro_step='x'": dict(micro_step="x"),
        "phase>micro_step": dict(micro_step=1, phase=2), "inner_steps=0": dict(inner_steps=0),
        "nan buffer": {key: nan_buf}, "float32 buffer": {key: f32_buf},
        "touched shape": dict(touched=[[True]]), "gamma_mean inf": dict(gamma_mean=[float("inf"), GAMMA]),
        "nonfinite_skips=-1": dict(nonfinite_skips=-1), "outer groups": dict(outer=bad_outer),
        "outer state shape": dict(outer=bad_state), "outer inner_lr": dict(outer=bad_lr),
        "no outer": dict(outer=None), "mode": dict(mode="walk"),
    }
    for name, change in cases.items():
        sd = dict(good, **change)
        with pytest.raises(ValueError) as e:
            opt.load_state_dict(sd)
        assert "\n" not in str(e.value), name
        _assert_same_state(opt.state_dict(), before)
        _assert_same_state(opt.outer.state_dict(), outer_before)
    opt.load_state_dict(good)  # the valid one still loads, and then really changes the state
    assert opt.micro_step == 3 * K + 2


def test_regression_load_with_several_outers_is_all_or_nothing():
    """The second outer's state is bad: the first outer must not have been loaded."""
    model, opt, good = _pair(outers=2)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good["outer"])
    bad[1]["param_groups"][0]["params"] = bad[1]["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="outer optimizer 1"):
        opt.load_state_dict(dict(good, outer=bad))
    _assert_same_state(opt.state_dict(), before)


def test_load_of_an_older_state_dict_without_the_new_keys():
    """state_dicts written before touched/gamma_mean/nonfinite_skips/mode existed still load."""
    model, opt, good = _pair()
    old = {k: good[k] for k in ("outer", "anchor", "micro_step", "phase", "inner_steps")}
    opt.load_state_dict(old)
    assert opt.micro_step == good["micro_step"] and opt.nonfinite_skips == 0


# -- inner_lr ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0, True, "0.01", None])
def test_regression_inner_lr_must_be_finite_and_positive(bad):
    """Issue 14.6: inner_lr=inf was accepted (and would write inf into the weights)."""
    ps = list(MultiHead().parameters())
    with pytest.raises(ValueError, match="inner_lr"):
        Nexus(adamw(ps), inner_lr=bad)
    with pytest.raises(ValueError, match="inner_lr"):
        Nexus(adamw([{"params": ps[:2], "inner_lr": bad}, {"params": ps[2:]}]), inner_lr=GAMMA)
    opt = Nexus(adamw(ps[:2]), inner_lr=GAMMA)
    with pytest.raises(ValueError, match="inner_lr"):
        opt.add_param_group({"params": ps[2:], "inner_lr": bad})


def test_inner_lr_changed_later_to_inf_is_refused_before_anything_moves():
    model = MultiHead()
    opt = Nexus(adamw(model.parameters()), inner_lr=GAMMA, inner_steps=K)
    opt.param_groups[0]["inner_lr"] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, make_batches(1)[0]).backward()
    with pytest.raises(ValueError, match="inner_lr"):
        opt.step()
    assert opt.micro_step == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- parameters that received no gradient during a whole walk ------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_regression_parameter_without_gradient_is_left_alone_like_the_outer_alone(mode):
    """Issue 14.6: a parameter whose .grad stayed None through the walk still moved (AdamW's weight decay on a
    zero pseudo-gradient). Now it keeps .grad = None for the outer step: AdamW alone and Nexus both leave it."""
    batches = [b for b in make_batches(12 * K) if b[0] != 2][:4 * K]  # domain 2's head is never used
    nex, alone = MultiHead(), MultiHead()
    unused = [nex.heads[2].weight, nex.heads[2].bias]
    w0 = [p.detach().clone() for p in unused]
    opt = Nexus(torch.optim.AdamW(nex.parameters(), lr=1e-2, eps=1e-10, weight_decay=0.5), inner_lr=GAMMA,
                inner_steps=K, mode=mode)
    adam = torch.optim.AdamW(alone.parameters(), lr=1e-2, eps=1e-10, weight_decay=0.5)
    for m, b in enumerate(batches):
        loss_fn(nex, b).backward()
        opt.step()
        opt.zero_grad()
        loss_fn(alone, b).backward()
        if m % K == K - 1:
            adam.step()
            adam.zero_grad()
    for p, w in zip(unused, w0):
        assert torch.equal(p, w) and p.grad is None and p not in opt.state
    assert all(torch.equal(p, w) for p, w in zip([alone.heads[2].weight, alone.heads[2].bias], w0))
    assert not torch.equal(nex.heads[0].weight, MultiHead().heads[0].weight)  # the used heads trained


def test_parameter_with_a_gradient_in_one_micro_batch_only_gets_the_outer_step():
    """A head used in one micro-batch of the walk (then zero_grad to None) still gets its pseudo-gradient."""
    model = MultiHead()
    batches = make_batches(K)
    used = {b[0] for b in batches}
    assert len(used) < 3
    opt = Nexus(torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=GAMMA, inner_steps=K)
    for b in batches:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()  # after the last (outer) step .grad holds the pseudo-gradient
    for d in range(3):
        assert (model.heads[d].weight.grad is not None) == (d in used)
