"""Nexus against an independent plain-loop reference of the paper's box, its equivalences, and its checkpoints."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

from nexus_opt import Nexus

N_DOMAINS, IN, HID = 3, 4, 8


class MultiHead(nn.Module):
    """A 2-layer tanh trunk with one linear head per domain (heads unused by a micro-batch get no gradient)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(HID, 1) for _ in range(N_DOMAINS))
        self.double()

    def forward(self, x, d):
        return self.heads[d](self.trunk(x))


def loss_fn(model, batch):
    d, x, y = batch
    return ((model(x, d) - y) ** 2).mean()


def make_batches(n: int, seed: int = 1, bs: int = 8):
    """Single-domain micro-batches of a 3-domain regression, domain drawn at random per micro-batch."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N_DOMAINS, IN, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        d = int(torch.randint(N_DOMAINS, (1,), generator=g))
        x = torch.randn(bs, IN, generator=g, dtype=torch.float64)
        y = torch.tanh(x @ w[d]).unsqueeze(1) + 0.1 * torch.randn(bs, 1, generator=g, dtype=torch.float64)
        out.append((d, x, y))
    return out


def groups_of(model, lrs=None, inner_lrs=None):
    """Param groups: one (all params) or trunk / heads with their own lr and inner_lr."""
    if lrs is None:
        return [{"params": list(model.parameters())}]
    gs = [{"params": list(model.trunk.parameters()), "lr": lrs[0]},
          {"params": list(model.heads.parameters()), "lr": lrs[1]}]
    for g, il in zip(gs, inner_lrs or []):
        g["inner_lr"] = il
    return gs


def warmup_cosine(total: int, warm: int = 5):
    """LambdaLR factor: linear warmup, then cosine to zero at `total`."""
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / (total - warm))))  # noqa: E731
    return lambda s: (s + 1) / warm if s < warm else cosine(s)


# -- the reference: the paper's box written out with plain loops ---------------------------------------
def reference_run(model, outer, batches, K, gamma, scale="raw", sched=None, sched_every_micro=False, follows=False,
                  parallel=False):
    """Sequential: theta_in walks K normalized steps from theta; theta <- outer(theta, theta - theta_in).
    Parallel (the control): every gradient at theta; theta <- outer(theta, sum_k gamma_k g_k / ||g_k||).
    A parameter without a gradient during the whole walk gets .grad = None (the outer optimizer skips it);
    with scale="inner_lr" the displacement is divided by the mean of the gammas used in the walk."""
    groups = outer.param_groups
    gammas = [g.get("inner_lr", gamma) for g in groups]
    base = [g.get("initial_lr", g["lr"]) for g in groups]
    allp = [p for g in groups for p in g["params"]]
    anchor = disp = used = walk_gammas = None
    for m, batch in enumerate(batches):
        if m % K == 0:
            anchor = [p.detach().clone() for p in allp]
            disp = [torch.zeros_like(p) for p in allp]
            used = [False] * len(allp)
            walk_gammas = [[] for _ in groups]
        grads = torch.autograd.grad(loss_fn(model, batch), allp, allow_unused=True)
        sq = torch.zeros((), dtype=torch.float64)
        for g in grads:
            if g is not None:
                sq = sq + (g * g).sum()
        norm = torch.sqrt(sq)
        with torch.no_grad():
            i = 0
            for gi, group in enumerate(groups):
                gam = gammas[gi] * (group["lr"] / base[gi] if follows else 1.0)
                walk_gammas[gi].append(gam)
                for p in group["params"]:
                    if grads[i] is not None:
                        used[i] = True
                        if norm > 0:
                            if parallel:
                                disp[i] += gam * grads[i] / norm
                            else:
                                p.sub_(gam * grads[i] / norm)
                    i += 1
            if m % K == K - 1:
                i = 0
                for gi, group in enumerate(groups):
                    mean_gamma = sum(walk_gammas[gi]) / K
                    for p in group["params"]:
                        d = disp[i] if parallel else anchor[i] - p
                        p.grad = None if not used[i] else (d if scale == "raw" else d / mean_gamma)
                        p.copy_(anchor[i])
                        i += 1
                outer.step()
                outer.zero_grad()
        if sched is not None and (sched_every_micro or m % K == K - 1):
            sched.step()
    return model


def nexus_run(model, opt, batches, sched=None, sched_every_micro=False):
    for batch in batches:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None and (sched_every_micro or opt.at_outer_boundary):
            sched.step()
    return model


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def adamw(params, lr=1e-2):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)


K, GAMMA, T = 4, 0.05, 20


@pytest.fixture
def batches():
    return make_batches(K * T)


# -- matches the reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_adamw(batches, foreach):
    ref, mine = MultiHead(), MultiHead()
    reference_run(ref, adamw(groups_of(ref)), batches, K, GAMMA)
    nexus_run(mine, Nexus(adamw(groups_of(mine)), inner_lr=GAMMA, inner_steps=K, foreach=foreach), batches)
    assert max_diff(ref, mine) < 1e-12
    assert max_diff(ref, MultiHead()) > 1e-2  # it actually trained


def test_matches_reference_sgd_momentum(batches):
    ref, mine = MultiHead(), MultiHead()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True, weight_decay=1e-3)  # noqa: E731
    reference_run(ref, sgd(groups_of(ref)), batches, K, GAMMA)
    nexus_run(mine, Nexus(sgd(groups_of(mine)), inner_lr=GAMMA, inner_steps=K), batches)
    assert max_diff(ref, mine) < 1e-12


def test_matches_reference_param_groups(batches):
    """Different outer lrs and inner lrs per group; the inner norm is still global across groups."""
    ref, mine = MultiHead(), MultiHead()
    reference_run(ref, adamw(groups_of(ref, [1e-2, 3e-3], [0.05, 0.02])), batches, K, GAMMA)
    opt = Nexus(adamw(groups_of(mine, [1e-2, 3e-3], [0.05, 0.02])), inner_lr=GAMMA, inner_steps=K)
    assert [g["inner_lr"] for g in opt.param_groups] == [0.05, 0.02]
    nexus_run(mine, opt, batches)
    assert max_diff(ref, mine) < 1e-12


@pytest.mark.parametrize("on", ["nexus", "outer"])
def test_matches_reference_with_scheduler(batches, on):
    ref, mine = MultiHead(), MultiHead()
    ref_outer = adamw(groups_of(ref, [1e-2, 3e-3]))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_outer, warmup_cosine(T))
    reference_run(ref, ref_outer, batches, K, GAMMA, sched=ref_sched)
    outer = adamw(groups_of(mine, [1e-2, 3e-3]))
    opt = Nexus(outer, inner_lr=GAMMA, inner_steps=K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt if on == "nexus" else outer, warmup_cosine(T))
    nexus_run(mine, opt, batches, sched=sched)
    assert max_diff(ref, mine) < 1e-12
    assert outer.param_groups[0]["lr"] == ref_outer.param_groups[0]["lr"] < 1e-3  # the schedule reached the real lr


def test_matches_reference_inner_lr_scale(batches):
    ref, mine = MultiHead(), MultiHead()
    reference_run(ref, adamw(groups_of(ref), lr=3e-3), batches, K, GAMMA, scale="inner_lr")
    nexus_run(mine, Nexus(adamw(groups_of(mine), lr=3e-3), inner_lr=GAMMA, inner_steps=K, pseudo_grad_scale="inner_lr"),
              batches)
    assert max_diff(ref, mine) < 1e-12


def test_matches_reference_inner_lr_follows_schedule(batches):
    """gamma_eff = inner_lr * lr / base lr, with the schedule stepped every micro-batch."""
    ref, mine = MultiHead(), MultiHead()
    ref_outer = adamw(groups_of(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": the outer steps every K calls
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_outer, warmup_cosine(K * T, warm=8))
        reference_run(ref, ref_outer, batches, K, GAMMA, sched=ref_sched, sched_every_micro=True, follows=True)
        opt = Nexus(adamw(groups_of(mine)), inner_lr=GAMMA, inner_steps=K, inner_lr_follows_schedule=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(K * T, warm=8))
        nexus_run(mine, opt, batches, sched=sched, sched_every_micro=True)
    assert opt.param_groups[0]["base_lr"] == 1e-2
    assert max_diff(ref, mine) < 1e-12


def test_mixed_outer_muon_adamw(batches):
    """A list of outer optimizers: Muon on the 2-D trunk weights, AdamW on the rest."""
    def outers(model):
        mat = [p for p in model.trunk.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2] + [p for p in model.heads.parameters() if p.ndim == 2]
        return torch.optim.Muon(mat, lr=0.02, adjust_lr_fn="match_rms_adamw"), adamw(rest)

    ref, mine = MultiHead(), MultiHead()
    ref_outers = outers(ref)
    groups = [g for o in ref_outers for g in o.param_groups]

    class Both:  # the reference steps both outers together
        param_groups = groups

        def step(self):
            for o in ref_outers:
                o.step()

        def zero_grad(self):
            for o in ref_outers:
                o.zero_grad()

    batches = batches[:8 * K]  # torch's Muon runs Newton-Schulz in bfloat16: slow on CPU
    reference_run(ref, Both(), batches, K, GAMMA)
    my_outers = outers(mine)
    opt = Nexus(my_outers, inner_lr=GAMMA, inner_steps=K)
    assert len(opt.param_groups) == 2 and opt.param_groups[0] is my_outers[0].param_groups[0]
    nexus_run(mine, opt, batches)
    assert max_diff(ref, mine) < 1e-12
    assert all(isinstance(k, torch.Tensor) for k in opt.state)


# -- equivalences and the sign -----------------------------------------------------------------------------
def normalized_sgd(model, batches, gamma):
    for batch in batches:
        ps = list(model.parameters())
        grads = torch.autograd.grad(loss_fn(model, batch), ps, allow_unused=True)
        norm = torch.sqrt(sum((g * g).sum() for g in grads if g is not None))
        with torch.no_grad():
            for p, g in zip(ps, grads):
                if g is not None:
                    p.sub_(gamma * g / norm)
    return model


def test_outer_sgd_lr1_is_normalized_sgd(batches):
    ref, mine = normalized_sgd(MultiHead(), batches, GAMMA), MultiHead()
    nexus_run(mine, Nexus(torch.optim.SGD(mine.parameters(), lr=1.0), inner_lr=GAMMA, inner_steps=K), batches)
    assert max_diff(ref, mine) < 1e-12


def test_outer_sgd_is_lookahead(batches):
    """Lookahead(k=K, alpha) over normalized SGD: slow += alpha * (fast - slow), fast <- slow."""
    alpha, ref = 0.5, MultiHead()
    for t in range(T):
        slow = [p.detach().clone() for p in ref.parameters()]
        normalized_sgd(ref, batches[t * K:(t + 1) * K], GAMMA)
        with torch.no_grad():
            for p, s in zip(ref.parameters(), slow):
                p.copy_(s + alpha * (p - s))
    mine = MultiHead()
    nexus_run(mine, Nexus(torch.optim.SGD(mine.parameters(), lr=alpha), inner_lr=GAMMA, inner_steps=K), batches)
    assert max_diff(ref, mine) < 1e-12


def test_pseudo_gradient_sign_is_descent():
    """The pseudo-gradient is theta_0 - theta_K; an outer SGD step moves along the inner walk and lowers the loss."""
    model = MultiHead()
    batch = make_batches(1)[0]
    theta0 = [p.detach().clone() for p in model.parameters()]
    g0 = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()), allow_unused=True)
    loss0 = loss_fn(model, batch).item()
    walked = normalized_sgd(copy.deepcopy(model), [batch] * K, GAMMA)
    opt = Nexus(torch.optim.SGD(model.parameters(), lr=0.5), inner_lr=GAMMA, inner_steps=K)
    for _ in range(K):
        loss_fn(model, batch).backward()
        opt.step()  # no zero_grad: .grad still holds the pseudo-gradient after the outer step
        if not opt.at_outer_boundary:
            opt.zero_grad()
    dot = 0.0
    for p, t0, w, g in zip(model.parameters(), theta0, walked.parameters(), g0):
        if g is None:  # a head this domain never used: no gradient in the walk, so none for the outer step
            assert p.grad is None and torch.equal(p, t0)
            continue
        assert torch.allclose(p.grad, t0 - w, atol=1e-14)  # start minus end
        assert torch.allclose(p - t0, 0.5 * (w - t0), atol=1e-14)  # moved along the inner walk
        if g is not None:
            dot += (p.grad * g).sum().item()
    assert dot > 0 and loss_fn(model, batch).item() < loss0


def test_zero_norm_and_no_grad_steps_are_skipped_but_counted():
    model = MultiHead()
    opt = Nexus(torch.optim.SGD(model.parameters(), lr=1.0), inner_lr=GAMMA, inner_steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    opt.step()  # no gradients at all
    assert opt.micro_step == 2 and not opt.at_outer_boundary
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step()
    assert opt.micro_step == 3 and opt.at_outer_boundary
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_step_closure_and_hooks():
    model, batch = MultiHead(), make_batches(1)[0]
    opt = Nexus(adamw(model.parameters()), inner_lr=GAMMA, inner_steps=2)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(o.micro_step))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(4)]
    assert calls == [1, 2, 3, 4] and losses[-1] < losses[0]
    assert isinstance(opt, torch.optim.Optimizer)


def test_eps_warning():
    model = MultiHead()
    with pytest.warns(UserWarning, match="eps"):
        Nexus(torch.optim.AdamW(model.parameters()), inner_lr=GAMMA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Nexus(adamw(model.parameters()), inner_lr=GAMMA)
        Nexus(torch.optim.AdamW(model.parameters()), inner_lr=GAMMA, pseudo_grad_scale="inner_lr")


def test_bad_arguments():
    ps = list(MultiHead().parameters())
    for kw in ({"inner_steps": 0}, {"inner_lr": -1.0}, {"pseudo_grad_scale": "gamma"}):
        with pytest.raises(ValueError):
            Nexus(adamw(ps), **kw)
    with pytest.raises(ValueError):
        Nexus(adamw(ps), inner_lr=0.0, pseudo_grad_scale="inner_lr")
    with pytest.raises(TypeError):
        Nexus("adamw")
    with pytest.raises(ValueError, match="more than one"):
        Nexus([adamw(ps), adamw(ps[:1])])


# -- anchor, boundary, groups ------------------------------------------------------------------------------
def test_anchor_weights_context(batches):
    model = MultiHead()
    opt = Nexus(adamw(model.parameters()), inner_lr=GAMMA, inner_steps=K)
    nexus_run(model, opt, batches[:K])
    outer_w = [p.detach().clone() for p in model.parameters()]
    with opt.anchor_weights():  # at a boundary the model already holds the outer weights
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), outer_w))
    nexus_run(model, opt, batches[K:K + 2])
    inner_w = [p.detach().clone() for p in model.parameters()]
    assert not opt.at_outer_boundary and opt.micro_step == K + 2
    with opt.anchor_weights():
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), outer_w))
        with pytest.raises(RuntimeError, match="anchor_weights"):
            opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), inner_w))


def test_add_param_group_passes_through(batches):
    model = MultiHead()
    outer = adamw(list(model.trunk.parameters()))
    opt = Nexus(outer, inner_lr=GAMMA, inner_steps=K)
    opt.add_param_group({"params": list(model.heads.parameters()), "lr": 1e-3, "inner_lr": 0.02})
    assert len(outer.param_groups) == 2 and opt.param_groups is outer.param_groups
    assert outer.param_groups[1]["inner_lr"] == 0.02 and outer.param_groups[0]["inner_lr"] == GAMMA
    nexus_run(model, opt, batches[:2])
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="outer boundary"):
        opt.add_param_group({"params": [extra]})


ACCELERATOR_PATHS = ["sync_free_inner", "offloaded_outer"]


def simulate_accelerator_path(monkeypatch, path: str) -> None:
    """Take an accelerator-only code path on the CPU: no host read of the gradient norm ('sync_free_inner'), or
    the anchor/displacement kept on another device ('offloaded_outer')."""
    if path == "sync_free_inner":
        monkeypatch.setattr(Nexus, "_host_read_is_free", staticmethod(lambda t: False))
    else:
        monkeypatch.setattr(Nexus, "_offloaded", staticmethod(lambda params, buffers: True))


@pytest.mark.parametrize("path", ACCELERATOR_PATHS)
def test_accelerator_code_paths_on_cpu(batches, monkeypatch, path):
    """The CUDA-only paths (no host read of the norm; single-transfer outer step) still match the reference."""
    simulate_accelerator_path(monkeypatch, path)
    for scale in ("raw", "inner_lr"):
        for foreach in (True, False):
            ref, mine = MultiHead(), MultiHead()
            reference_run(ref, adamw(groups_of(ref, [1e-2, 3e-3], [0.05, 0.02])), batches, K, GAMMA, scale=scale)
            opt = Nexus(adamw(groups_of(mine, [1e-2, 3e-3], [0.05, 0.02])), inner_lr=GAMMA, inner_steps=K,
                        pseudo_grad_scale=scale, foreach=foreach)
            nexus_run(mine, opt, batches)
            assert max_diff(ref, mine) < 1e-12


def test_offload_anchor_on_cpu_matches(batches):
    a, b = MultiHead(), MultiHead()
    nexus_run(a, Nexus(adamw(a.parameters()), inner_lr=GAMMA, inner_steps=K), batches)
    nexus_run(b, Nexus(adamw(b.parameters()), inner_lr=GAMMA, inner_steps=K, offload_anchor=True), batches)
    assert max_diff(a, b) == 0.0


# -- checkpoints -------------------------------------------------------------------------------------------
def _plain(obj) -> bool:
    """Only tensors, Python scalars, strings, lists, tuples and dicts (safetensors + JSON, never pickle)."""
    if isinstance(obj, (torch.Tensor, bool, int, float, str)) or obj is None:
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    return False


def _save_load(state: dict, tmp_path, name: str) -> dict:
    """Round-trip through the project's checkpoint packing: a JSON skeleton + a safetensors file."""
    from safetensors.torch import load_file, save_file

    from nexus_opt.checkpoint import pack, unpack

    tensors: dict = {}
    skeleton = json.dumps(pack(state, tensors))
    save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    return unpack(json.loads(skeleton), load_file(str(tmp_path / f"{name}.safetensors")))


def _fresh(lrs=(1e-2, 3e-3), mode="sequential"):
    model = MultiHead(seed=123)  # different init: everything must come from the checkpoint
    opt = Nexus(adamw(groups_of(model, list(lrs))), inner_lr=GAMMA, inner_steps=K, mode=mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(T))
    return model, opt, sched


def check_resume_bit_exact(batches, tmp_path, cut: int, mode: str = "sequential", saved_check=None,
                           loaded_check=None) -> None:
    """Run `cut` micro-batches, save model + optimizer + scheduler through the checkpoint packing, load them into a
    differently initialised copy and finish: the weights equal an uninterrupted run's bit for bit. The checks see
    the saved optimizer state dict and the loaded optimizer."""
    full, opt, sched = _fresh(mode=mode)
    full.load_state_dict(MultiHead().state_dict())
    nexus_run(full, opt, batches, sched=sched)

    run, opt, sched = _fresh(mode=mode)
    run.load_state_dict(MultiHead().state_dict())
    nexus_run(run, opt, batches[:cut], sched=sched)
    sd = opt.state_dict()
    if saved_check:
        saved_check(sd)
    saved = _save_load({"model": run.state_dict(), "opt": sd, "sched": sched.state_dict()}, tmp_path, mode)
    del run, opt, sched

    model, opt, sched = _fresh(mode=mode)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    if loaded_check:
        loaded_check(opt)
    nexus_run(model, opt, batches[cut:], sched=sched)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), model.parameters()))


@pytest.mark.parametrize("cut", [2 * K, 3 * K + 2])  # at a boundary and mid-walk
def test_resume_is_bit_exact(batches, tmp_path, cut):
    def saved(sd):
        assert _plain(sd) and sd["micro_step"] == cut

    def loaded(opt):
        assert opt.param_groups is opt.outer.param_groups and opt.micro_step == cut

    check_resume_bit_exact(batches, tmp_path, cut, saved_check=saved, loaded_check=loaded)


def test_scheduler_drives_lr_after_load(batches):
    model = MultiHead()
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Nexus(outer, inner_lr=GAMMA, inner_steps=K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    nexus_run(model, opt, batches[:K], sched=sched)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    sched.step()
    assert opt.param_groups is outer.param_groups
    assert outer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    # the next outer step really uses that lr: SGD moves by lr * pseudo-gradient
    start = [p.detach().clone() for p in model.parameters()]
    for batch in batches[K:2 * K]:
        loss_fn(model, batch).backward()
        opt.step()
        if not opt.at_outer_boundary:
            opt.zero_grad()
    for p, s in zip(model.parameters(), start):
        assert torch.allclose(s - p, 0.025 * p.grad, atol=1e-15) if p.grad is not None else torch.equal(s, p)


def test_load_validation_errors(batches):
    model, opt, _ = _fresh()
    nexus_run(model, opt, batches[:K + 1])
    good = opt.state_dict()

    def bad(**change):
        sd = dict(good, **change)
        with pytest.raises(ValueError) as e:
            _fresh()[1].load_state_dict(sd)
        assert "\n" not in str(e.value)
        return str(e.value)

    sd = {k: v for k, v in good.items() if k != "anchor"}
    with pytest.raises(ValueError, match="missing anchor"):
        _fresh()[1].load_state_dict(sd)
    assert "param groups" in bad(anchor=good["anchor"][:1])
    assert "parameters" in bad(anchor=[good["anchor"][0][:-1], good["anchor"][1]])
    wrong = [list(good["anchor"][0]), good["anchor"][1]]
    wrong[0][0] = torch.zeros(3, 3, dtype=torch.float64)
    assert "shape" in bad(anchor=wrong)
    assert "outer" in bad(outer=good["outer"] * 2)
    assert "inner_steps" in bad(inner_steps=K + 1)  # mid-walk with another K
    other = Nexus(adamw(groups_of(MultiHead(), [1e-2, 3e-3])), inner_lr=GAMMA, inner_steps=K + 1)
    other.load_state_dict(dict(good, phase=0))  # another K from a boundary is fine


def test_mixed_outer_state_dict_round_trip(batches, tmp_path):
    def build():
        m = MultiHead()
        mat = [p for p in m.trunk.parameters() if p.ndim == 2]
        rest = [p for p in m.parameters() if all(p is not q for q in mat)]
        return m, Nexus([torch.optim.Muon(mat, lr=0.02), adamw(rest)], inner_lr=GAMMA, inner_steps=K)

    full, opt = build()
    nexus_run(full, opt, batches[:4 * K])
    model, opt = build()
    nexus_run(model, opt, batches[:2 * K + 1])
    saved = _save_load({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path, "mixed")
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    nexus_run(model, opt, batches[2 * K + 1:4 * K])
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), model.parameters()))


def test_deepcopy_continues_identically(batches):
    model = MultiHead()
    opt = Nexus(adamw(model.parameters()), inner_lr=GAMMA, inner_steps=K)
    nexus_run(model, opt, batches[:K + 1])
    model2, opt2 = copy.deepcopy((model, opt))
    nexus_run(model, opt, batches[K + 1:3 * K])
    nexus_run(model2, opt2, batches[K + 1:3 * K])
    assert max_diff(model, model2) == 0.0
