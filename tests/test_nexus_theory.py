"""Nexus against its theory: the exact expected displacement vs the second-order expansion, and domain alignment."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from nexus_opt import Nexus

DT = torch.float64


# -- small smooth domains with exact full-batch gradients ----------------------------------------------------
class Point(nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, x=None):
        return self.theta


def tanh_domains(N: int, seed: int = 0):
    """A 3-5-1 tanh MLP (26 parameters) and N sine-regression domains."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    losses = []
    for _ in range(N):
        X = torch.randn(16, 3, generator=g, dtype=DT)
        y = torch.sin(X @ torch.randn(3, generator=g, dtype=DT)).unsqueeze(1)
        losses.append(lambda m, X=X, y=y: ((m(X) - y) ** 2).mean())
    return model, losses


def quadratic_domains(N: int, seed: int = 0, D: int = 6):
    """A bare parameter vector and N random positive-definite quadratics with different centres."""
    g = torch.Generator().manual_seed(seed)
    model = Point(torch.randn(D, generator=g, dtype=DT))
    losses = []
    for _ in range(N):
        A = torch.randn(D, D, generator=g, dtype=DT)
        H, c = A @ A.T / D + 0.1 * torch.eye(D, dtype=DT), 2 * torch.randn(D, generator=g, dtype=DT)
        losses.append(lambda m, H=H, c=c: 0.5 * (m(None) - c) @ H @ (m(None) - c))
    return model, losses


class _Functional:
    """Call a module with its parameters replaced by slices of one flat vector (for dense Hessians)."""

    def __init__(self, model, theta):
        self.model, self.parts, i = model, {}, 0
        for name, p in model.named_parameters():
            self.parts[name] = theta[i:i + p.numel()].view(p.shape)
            i += p.numel()

    def __call__(self, *args):
        return functional_call(self.model, self.parts, args)


def expansion(model, losses, gamma: float, K: int):
    """First and second-order terms of E[theta_0 - theta_K] from nexus.md, with J_i = (I - u_i u_i^T) H_i / ||g_i||."""
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    us, Js = [], []
    for loss in losses:
        fn = lambda th, loss=loss: loss(_Functional(model, th))  # noqa: E731
        th = theta0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(th), th)
        H = torch.autograd.functional.hessian(fn, theta0)
        u = g / g.norm()
        us.append(u)
        Js.append((torch.eye(len(u), dtype=DT) - torch.outer(u, u)) @ H / g.norm())
    N = len(losses)
    first = gamma * K * torch.stack(us).mean(0)
    second = -gamma ** 2 * K * (K - 1) / (2 * N ** 2) * sum(Js[i] @ us[j] for i in range(N) for j in range(N))
    return first, second


def exact_expected_displacement(model, losses, gamma: float, K: int):
    """Mean of Nexus's pseudo-gradient over all N^K source sequences (each with probability N^-K)."""
    N, total = len(losses), None
    for seq in itertools.product(range(N), repeat=K):
        m = copy.deepcopy(model)
        opt = Nexus(torch.optim.SGD(m.parameters(), lr=0.0), inner_lr=gamma, inner_steps=K)
        for s in seq:
            losses[s](m).backward()
            opt.step()
            if not opt.at_outer_boundary:
                opt.zero_grad()
        d = torch.cat([p.grad.reshape(-1) for p in m.parameters()])  # .grad holds theta_0 - theta_K
        total = d if total is None else total + d
    return total / N ** K


@pytest.mark.parametrize("build,N,K,rel_tol", [(tanh_domains, 3, 3, 0.05), (quadratic_domains, 2, 4, 0.01),
                                              (tanh_domains, 2, 4, 0.08)])
def test_expected_displacement_matches_second_order_expansion(build, N, K, rel_tol):
    model, losses = build(N)
    errs, errs_first, rel = [], [], []
    for gamma in (0.01, 0.005):
        E = exact_expected_displacement(model, losses, gamma, K)
        first, second = expansion(model, losses, gamma, K)
        errs.append((E - first - second).norm().item())
        errs_first.append((E - first).norm().item())
        rel.append(errs[-1] / second.norm().item())
        assert torch.nn.functional.cosine_similarity(E - first, second, dim=0) > 0.999
    assert 3.0 < errs_first[0] / errs_first[1] < 5.0  # what is left after the first order is O(gamma^2) ...
    assert 6.0 < errs[0] / errs[1] < 10.0  # ... and the second-order term removes it: the rest is O(gamma^3)
    assert rel[1] < rel_tol and 1.6 < rel[0] / rel[1] < 2.5  # relative error of the second-order part ~ gamma


# -- outer steps raise the cross-domain gradient cosine ----------------------------------------------------
def _regression(seed: int, N: int = 3, n: int = 32, D: int = 4, shared: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(D, generator=g, dtype=DT)
    out = []
    for _ in range(N):
        w = shared * w0 + (1 - shared) * torch.randn(D, generator=g, dtype=DT)
        X = torch.randn(n, D, generator=g, dtype=DT)
        out.append((X, torch.sin(2 * X @ w).unsqueeze(1)))
    return out


def _mse(m, X, y):
    return ((m(X) - y) ** 2).mean()


def _mean_cosine(m, domains) -> float:
    gs = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(_mse(m, X, y), list(m.parameters()))])
          for X, y in domains]
    cs = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(gs, 2)]
    return sum(cs) / len(cs)


def _train(use_nexus: bool, seed: int, steps: int = 200, K: int = 3, gamma: float = 0.2):
    """K single-domain full-batch micro-batches per optimizer step: Nexus(AdamW), or AdamW accumulating them."""
    domains = _regression(seed)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)
    order = torch.Generator().manual_seed(seed + 100)
    adamw = torch.optim.AdamW(m.parameters(), lr=0.01, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    opt = Nexus(adamw, inner_lr=gamma, inner_steps=K) if use_nexus else adamw
    cos = []
    for t in range(steps):
        for _ in range(K):
            d = int(torch.randint(len(domains), (1,), generator=order))
            loss = _mse(m, *domains[d])
            if use_nexus:
                loss.backward()
                opt.step()
                opt.zero_grad()
            else:
                (loss / K).backward()
        if not use_nexus:
            opt.step()
            opt.zero_grad()
        if t >= steps // 2 and t % 10 == 0:
            cos.append(_mean_cosine(m, domains))
    return sum(_mse(m, *d).item() for d in domains) / len(domains), sum(cos) / len(cos)


def test_nexus_raises_cross_domain_cosine_at_similar_loss():
    """Same data, micro-batch sequence and gradient evaluations; cosine averaged over the second half of training."""
    diffs, ratios = [], []
    for seed in range(4):
        loss_a, cos_a = _train(False, seed)
        loss_n, cos_n = _train(True, seed)
        diffs.append(cos_n - cos_a)
        ratios.append(loss_n / loss_a)
        assert 0.7 < loss_n / loss_a < 1.4, (seed, loss_a, loss_n)
    assert all(d > 0 for d in diffs), diffs
    assert sum(diffs) / len(diffs) > 0.05, diffs
    assert abs(math.log(sum(ratios) / len(ratios))) < 0.15, ratios
