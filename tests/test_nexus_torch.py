"""Nexus as a torch optimizer: every lr scheduler, keyword-only options, one .grad behaviour on every device,
the gamma used by pseudo_grad_scale="inner_lr", and an import of torch and the standard library only."""
from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nexus_opt.nexus as nexus_module
from nexus_opt import Nexus
from test_nexus import GAMMA, K, MultiHead, adamw, groups_of, loss_fn, make_batches, max_diff, nexus_run, \
    reference_run, warmup_cosine

S = torch.optim.lr_scheduler
SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda s: 0.8 ** s),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda s: 0.9),
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=2),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.25, total_iters=3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=4, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=4),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, factor=0.5, total_iters=2),
                                                      S.ExponentialLR(o, gamma=0.9)]),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.ConstantLR(o, factor=0.5, total_iters=2),
                                                 S.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=10),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2),
}
OUTERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=3e-3, momentum=0.9),
}


def test_every_torch_scheduler_is_listed():
    """A scheduler class added to torch shows up here (and must then be added to SCHEDULERS)."""
    names = {n for n in dir(S) if isinstance(getattr(S, n), type) and not n.startswith("_")
             and issubclass(getattr(S, n), (S.LRScheduler, S.ReduceLROnPlateau)) and n != "LRScheduler"}
    assert names == set(SCHEDULERS)


def _lr_trace(outer_kind: str, sched_name: str, wrap: bool, steps: int = 6) -> list:
    """(lr, betas or momentum) of the outer optimizer's group after each scheduler step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    outer = OUTERS[outer_kind](model.parameters())
    opt = Nexus(outer, inner_lr=0.01, inner_steps=2) if wrap else outer
    sched = SCHEDULERS[sched_name](opt)
    trace = []
    x = torch.randn(4, 3)
    for t in range(steps):
        for _ in range(2 if wrap else 1):  # Nexus: K micro-batches; the plain optimizer: one step
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        if sched_name == "ReduceLROnPlateau":
            sched.step(float(t))  # a metric that never improves: the lr halves
        else:
            sched.step()
        g = outer.param_groups[0]
        trace.append((g["lr"], g.get("betas", g.get("momentum"))))
    return trace


@pytest.mark.parametrize("outer_kind", list(OUTERS))
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_every_scheduler_drives_the_outer_lr(outer_kind, sched_name):
    """Built on Nexus, each scheduler constructs, steps (once per outer step) and sets the outer optimizer's lr
    (and cycled momentum) exactly as it does on the outer optimizer alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "lr_scheduler.step() before optimizer.step()"
        mine = _lr_trace(outer_kind, sched_name, wrap=True)
    assert mine == _lr_trace(outer_kind, sched_name, wrap=False)
    assert len({lr for lr, _ in mine}) > 1  # the schedule changed the lr


def test_defaults_mirror_the_outer_optimizer():
    ps = list(MultiHead().parameters())
    a = Nexus(adamw(ps), inner_lr=GAMMA)
    assert a.defaults["betas"] == (0.9, 0.95) and a.defaults["lr"] == 1e-2 and a.defaults["inner_lr"] == GAMMA
    s = Nexus(torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert s.defaults["momentum"] == 0.9 and s.defaults["mode"] == "sequential"


def test_options_are_keyword_only():
    ps = list(MultiHead().parameters())
    with pytest.raises(TypeError):
        Nexus(adamw(ps), 0.01)
    assert all(p.kind == p.KEYWORD_ONLY for n, p in inspect.signature(Nexus).parameters.items() if n != "outer")


# -- .grad after step(): the normalised gradient, in place, on every device ---------------------------------
@pytest.mark.parametrize("host_read", [True, False], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_grad_after_step_is_the_normalised_gradient_on_every_path(monkeypatch, host_read, mode):
    """step() replaces .grad by g/||g|| (global norm) in place, whichever device path runs; zeros when skipped."""
    monkeypatch.setattr(Nexus, "_host_read_is_free", staticmethod(lambda t: host_read))
    model = MultiHead()
    opt = Nexus(adamw(groups_of(model, [1e-2, 3e-3], [0.05, 0.02])), inner_lr=GAMMA, inner_steps=3, mode=mode)
    batch = make_batches(1)[0]
    loss_fn(model, batch).backward()
    raw = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g * g).sum() for g in raw.values()))
    opt.step()
    for p, g in raw.items():
        assert torch.allclose(p.grad, g / norm, rtol=0, atol=1e-15)
    opt.zero_grad()
    loss_fn(model, batch).backward()
    next(iter(raw)).grad.view(-1)[0] = float("inf")
    opt.step()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in raw)  # skipped: nothing of the inf survives


# -- pseudo_grad_scale="inner_lr" divides by the gamma actually used ------------------------------------------
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_inner_lr_scale_divides_by_the_scheduled_gamma(mode):
    """K = 1 with gamma following a schedule at factor 0.25 (lr 0.25 over a base lr 1): the scaled pseudo-gradient
    is the unit step direction (norm 1), not 0.25 of it (what dividing by the unscheduled gamma gave)."""
    model = MultiHead()
    outer = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = Nexus(outer, inner_lr=GAMMA, inner_steps=1, mode=mode, pseudo_grad_scale="inner_lr",
                inner_lr_follows_schedule=True)
    S.LambdaLR(opt, lambda s: 0.25)  # a scheduler sets lr = 0.25 * base lr: gamma used = 0.25 * GAMMA
    assert outer.param_groups[0]["lr"] == 0.25 and outer.param_groups[0]["base_lr"] == 1.0
    loss_fn(model, make_batches(1)[0]).backward()
    opt.step()
    sq = sum((p.grad * p.grad).sum() for p in model.parameters() if p.grad is not None)
    assert abs(float(sq) ** 0.5 - 1.0) < 1e-12


@pytest.mark.parametrize("every_micro", [False, True], ids=["per-outer-step", "per-micro-batch"])
def test_inner_lr_scale_with_schedule_matches_reference(every_micro):
    """Reference: displacement / mean of the gammas used in the walk (scheduler stepped per outer step or per
    micro-batch)."""
    batches = make_batches(K * 10)
    ref, mine = MultiHead(), MultiHead()
    n = len(batches) if every_micro else 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-micro-batch: scheduler steps before the outer optimizer does
        ref_outer = adamw(groups_of(ref, [1e-2, 3e-3]))
        ref_sched = S.LambdaLR(ref_outer, warmup_cosine(n, warm=3))
        reference_run(ref, ref_outer, batches, K, GAMMA, scale="inner_lr", sched=ref_sched,
                      sched_every_micro=every_micro, follows=True)
        opt = Nexus(adamw(groups_of(mine, [1e-2, 3e-3])), inner_lr=GAMMA, inner_steps=K, pseudo_grad_scale="inner_lr",
                    inner_lr_follows_schedule=True)
        nexus_run(mine, opt, batches, sched=S.LambdaLR(opt, warmup_cosine(n, warm=3)), sched_every_micro=every_micro)
    assert max_diff(ref, mine) < 1e-12


# -- import hygiene ---------------------------------------------------------------------------------------------
def _is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def test_nexus_module_imports_only_torch_and_the_standard_library():
    """Statically (every import statement of nexus.py) and at run time (modules that `import nexus_opt.nexus`
    adds after `import torch`, in a fresh interpreter)."""
    tree = ast.parse(Path(nexus_module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert all(_is_stdlib(n) or n.split(".")[0] == "torch" for n in names), names
    code = ("import sys, json, torch; before = set(sys.modules); import nexus_opt.nexus; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    new = json.loads(out)
    assert "nexus_opt.nexus" in new
    own = {"nexus_opt", "nexus_opt.nexus", "nexus_opt.errors"}  # the package __init__ (stdlib-only errors module)
    assert [m for m in new if m not in own and not _is_stdlib(m) and m.split(".")[0] != "torch"] == []
