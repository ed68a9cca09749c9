"""Nexus(mode="parallel"), the first-order control: a plain reference loop, its displacement, K=1, checkpoints."""
from __future__ import annotations

import warnings

import pytest
import torch

from nexus_opt import Nexus
from test_nexus import (ACCELERATOR_PATHS, GAMMA, K, T, MultiHead, _fresh, adamw, check_resume_bit_exact, groups_of,
                        loss_fn, make_batches, max_diff, nexus_run, reference_run, simulate_accelerator_path,
                        warmup_cosine)


@pytest.fixture
def batches():
    return make_batches(K * T)


def parallel(outer, **kw):
    return Nexus(outer, inner_lr=kw.pop("inner_lr", GAMMA), inner_steps=kw.pop("inner_steps", K), mode="parallel", **kw)


# -- the reference loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
def test_parallel_matches_reference_adamw_groups(batches, foreach):
    """Two groups (own lr and inner_lr), global norm across groups, heads without gradients skipped."""
    ref, mine = MultiHead(), MultiHead()
    reference_run(ref, adamw(groups_of(ref, [1e-2, 3e-3], [0.05, 0.02])), batches, K, GAMMA, parallel=True)
    nexus_run(mine, parallel(adamw(groups_of(mine, [1e-2, 3e-3], [0.05, 0.02])), foreach=foreach), batches)
    assert max_diff(ref, mine) < 1e-12
    assert max_diff(ref, MultiHead()) > 1e-2  # it trained
    seq = MultiHead()
    nexus_run(seq, Nexus(adamw(groups_of(seq, [1e-2, 3e-3], [0.05, 0.02])), inner_lr=GAMMA, inner_steps=K), batches)
    assert max_diff(seq, mine) > 1e-6  # and it is not the sequential walk


def test_parallel_matches_reference_sgd_inner_lr_scale_follows_schedule(batches):
    """SGD(momentum) outer, pseudo_grad_scale="inner_lr" with gamma following a per-micro-batch schedule."""
    ref, mine = MultiHead(), MultiHead()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler stepped before the outer optimizer: by design here
        ref_outer = sgd(groups_of(ref))
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_outer, warmup_cosine(K * T, warm=8))
        reference_run(ref, ref_outer, batches, K, GAMMA, scale="inner_lr", sched=ref_sched, sched_every_micro=True,
                      follows=True, parallel=True)
        opt = parallel(sgd(groups_of(mine)), pseudo_grad_scale="inner_lr", inner_lr_follows_schedule=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(K * T, warm=8))
        nexus_run(mine, opt, batches, sched=sched, sched_every_micro=True)
    assert max_diff(ref, mine) < 1e-12


@pytest.mark.parametrize("path", ACCELERATOR_PATHS)
def test_parallel_accelerator_code_paths_on_cpu(batches, monkeypatch, path):
    """The accelerator-only paths (no host read of the norm; displacement on another device) match too."""
    simulate_accelerator_path(monkeypatch, path)
    for scale in ("raw", "inner_lr"):
        ref, mine = MultiHead(), MultiHead()
        reference_run(ref, adamw(groups_of(ref, [1e-2, 3e-3], [0.05, 0.02])), batches[:8 * K], K, GAMMA, scale=scale,
                      parallel=True)
        opt = parallel(adamw(groups_of(mine, [1e-2, 3e-3], [0.05, 0.02])), pseudo_grad_scale=scale)
        nexus_run(mine, opt, batches[:8 * K])
        assert max_diff(ref, mine) < 1e-12


# -- what the control is -------------------------------------------------------------------------------------
def test_parallel_displacement_is_gamma_times_sum_of_normalised_anchor_gradients(batches):
    """The model never walks; the pseudo-gradient is gamma * sum_k g_k(theta_0)/||g_k(theta_0)||."""
    model = MultiHead()
    theta0 = [p.detach().clone() for p in model.parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    used = [False] * len(expected)
    for b in batches[:K]:
        gs = torch.autograd.grad(loss_fn(model, b), list(model.parameters()), allow_unused=True)
        norm = torch.sqrt(sum((g * g).sum() for g in gs if g is not None))
        for i, g in enumerate(gs):
            if g is not None:
                expected[i] += GAMMA * g / norm
                used[i] = True
    assert not all(used)  # some head is unused in this walk: it must keep .grad = None
    opt = parallel(torch.optim.SGD(model.parameters(), lr=0.0))
    for b in batches[:K]:
        loss_fn(model, b).backward()
        opt.step()
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta0))  # no walk
        if not opt.at_outer_boundary:
            opt.zero_grad()
    for p, e, u in zip(model.parameters(), expected, used):
        if u:
            assert (p.grad - e).abs().max().item() < 1e-15
        else:
            assert p.grad is None


def test_parallel_with_one_inner_step_equals_nexus(batches):
    """K = 1: no walk to skip, so the control and Nexus take the same steps."""
    a, b = MultiHead(), MultiHead()
    nexus_run(a, Nexus(adamw(groups_of(a, [1e-2, 3e-3])), inner_lr=GAMMA, inner_steps=1), batches)
    nexus_run(b, parallel(adamw(groups_of(b, [1e-2, 3e-3])), inner_steps=1), batches)
    assert max_diff(a, b) < 1e-12 and max_diff(a, MultiHead()) > 1e-2


def test_parallel_anchor_weights_is_a_no_op_and_memory_is_one_copy(batches):
    model = MultiHead()
    opt = parallel(adamw(model.parameters()))
    nexus_run(model, opt, batches[:K + 2])
    w = [p.detach().clone() for p in model.parameters()]
    with opt.anchor_weights():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert sum(b.numel() for g in opt._buf for b in g) == sum(p.numel() for p in model.parameters())
    assert "parallel" in repr(opt) and opt.defaults["mode"] == "parallel"


# -- checkpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [2 * K, 3 * K + 2])
def test_parallel_resume_is_bit_exact(batches, tmp_path, cut):
    def saved(sd):
        assert sd["mode"] == "parallel" and "displacement" in sd and "anchor" not in sd

    check_resume_bit_exact(batches, tmp_path, cut, mode="parallel", saved_check=saved)


def test_mode_mismatch_on_load_is_refused(batches):
    model, opt, _ = _fresh(mode="parallel")
    nexus_run(model, opt, batches[:K])
    with pytest.raises(ValueError, match="mode='parallel'"):
        _fresh(mode="sequential")[1].load_state_dict(opt.state_dict())


def test_trainer_nexus_parallel_run_resumes_bit_for_bit(tmp_path):
    """`landscape train --optimizer nexus-parallel` end to end; an interrupted run resumed equals the full run."""
    from conftest import TINY_MIX, invoke_cli
    from test_checkpoint import _interrupted_run, assert_same_run
    from safetensors.torch import load_file

    from nexus_opt import checkpoint as ck
    from nexus_opt.train import resume

    full = tmp_path / "full"
    r = invoke_cli("train", "--suite", "mix", "--optimizer", "nexus-parallel", "--steps", TINY_MIX["steps"],
                   "--batch-size", TINY_MIX["batch_size"], "--accum", TINY_MIX["accum"], "--warmup", 1,
                   "--eval-every", 1, "--ckpt-every", 2, "--seed", 0, "--device", "cpu", "--out", full)
    assert r.exit_code == 0, r.output
    last = ck.read_checkpoint(full)
    assert last.step == TINY_MIX["steps"] and last.manifest["optimizer"]["name"] == "nexus-parallel"
    part = _interrupted_run(TINY_MIX, tmp_path / "part", 3, optimizer="nexus-parallel")
    resume(part, device="cpu")
    assert_same_run(full, part, TINY_MIX["steps"])
    a = load_file(str(full / ck.checkpoint_name(0) / "model.safetensors"))
    b = load_file(str(full / ck.checkpoint_name(TINY_MIX["steps"]) / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained: the equality above is not vacuous
