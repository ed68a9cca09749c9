"""Quadratic domains L_k(theta) = 1/2 (theta - m_k)^T A_k (theta - m_k) + c_k with analytic minima."""
from __future__ import annotations

import torch

from ..errors import UserError
from .. import limits
from .base import Suite, generator, opt_float, opt_int


def _preset(v, name, where):
    if v is not None and not isinstance(v, str):
        raise UserError(f"{where}{name} must be a preset name, got {v!r}")
    return v


def _curvature(v, name, where):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise UserError(f"{where}{name} must be two numbers [lo, hi], got {v!r}")
    lo, hi = (limits.check_float(x, name, 1e-12, 1e12, where=where) for x in v)
    if lo > hi:
        raise UserError(f"{where}{name} must have lo <= hi, got {v!r}")
    return [lo, hi]

# The paper's Figure 2 (nexus.md): parabolas 8 (x - m)^2 + c, i.e. A = 16; c makes the training loss 1.0 at x = 0.
PRESETS = {
    "fig2-sum": {"train1": -0.2, "train2": 0.2, "target": 0.5, "c": 0.68},
    "fig2-intersection": {"train1": -0.1, "train2": 0.1, "target": 0.15, "c": 0.92},
}


def bowl_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """1/2 (theta - m)^T A (theta - m) + c for the Point model's theta."""
    theta = model()
    d = theta - batch["m"][0].to(theta.dtype)
    return 0.5 * d @ (batch["A"][0].to(theta.dtype) @ d) + batch["c"][0].to(theta.dtype)


class Bowls(Suite):
    """Random SPD bowls in any dimension (`dim`, `n_domains`, `spread`, `noise`) or a Figure 2 preset."""

    name = "bowls"
    SCHEMA = {"dim": opt_int(1, 1 << 14), "n_domains": opt_int(1, 1024), "spread": opt_float(),
              "noise": opt_float(0.0), "preset": _preset, "curvature": _curvature}
    ood_description = "a bowl never trained on (preset 'target', or 'ood'), with its minimum beyond the trained ones"

    def __init__(self, seed: int = 0, weights=None, dim: int = 2, n_domains: int = 2, spread: float = 1.0,
                 noise: float = 0.0, preset: str | None = None, curvature: tuple[float, float] = (1.0, 10.0)):
        if preset is not None and preset not in PRESETS:
            raise UserError(f"unknown bowls preset '{preset}'; choose one of {sorted(PRESETS)}")
        if dim < 1 or n_domains < 1:
            raise UserError("bowls need dim >= 1 and n_domains >= 1")
        if preset:
            p = PRESETS[preset]
            self.domains, self.ood_domains = ["train1", "train2", "target"], ["target"]
            dim = 1
            self.A = {d: torch.tensor([[16.0]], dtype=torch.float64) for d in self.domains}
            self.m = {d: torch.tensor([p[d]], dtype=torch.float64) for d in self.domains}
            self.c = {d: float(p["c"]) for d in self.domains}
        else:
            self.domains = [f"bowl{k}" for k in range(n_domains)] + ["ood"]
            self.ood_domains = ["ood"]
            g = generator(seed, 7)
            lo, hi = curvature
            self.A, self.m, self.c = {}, {}, {}
            for d in self.domains:
                q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
                eig = lo + (hi - lo) * torch.rand(dim, generator=g, dtype=torch.float64)
                self.A[d] = (q * eig) @ q.T
                self.m[d] = spread * torch.randn(dim, generator=g, dtype=torch.float64)
                self.c[d] = 0.0
            # the OOD minimum lies beyond the trained ones: the mean plus its mean offset, doubled
            mean = torch.stack([self.m[d] for d in self.domains[:-1]]).mean(0)
            self.m["ood"] = 2.0 * mean + 0.5 * spread * torch.randn(dim, generator=g, dtype=torch.float64)
        self.dim = dim
        super().__init__(seed, weights, dim=dim, n_domains=n_domains, spread=spread, noise=noise, preset=preset,
                         curvature=list(curvature))

    @classmethod
    def data_elems(cls, o: dict) -> int:
        d = 1 if o.get("preset") else o.get("dim", 2)
        return (o.get("n_domains", 2) + 1) * (3 * d * d + 2 * d)

    def _batch(self, domain: str, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"A": self.A[domain][None].float(), "m": m[None].float(), "c": torch.tensor([self.c[domain]])}

    def _train_batch(self, domain, gen, batch_size):
        m = self.m[domain]
        noise = self.options["noise"]
        if noise:
            m = m + noise * torch.randn(self.dim, generator=gen, dtype=torch.float64) / batch_size ** 0.5
        return self._batch(domain, m)

    def _eval_batches(self, domain, gen):
        return [self._batch(domain, self.m[domain])]

    loss_fn = staticmethod(bowl_loss)

    def default_model(self):
        init = [0.0] * self.dim if self.options["preset"] else [1.0] * self.dim
        return "point", {"dim": self.dim, "init": init}

    # -- analytic truth ------------------------------------------------------------------------
    def minimum(self, domain: str | None = None) -> torch.Tensor:
        """argmin of one domain's loss, or of the weighted training loss (domain=None)."""
        if domain is not None:
            return self.m[domain].clone()
        A = sum(self.weights[d] * self.A[d] for d in self.train_domains)
        b = sum(self.weights[d] * self.A[d] @ self.m[d] for d in self.train_domains)
        return torch.linalg.solve(A, b)

    def hessian(self, domain: str | None = None) -> torch.Tensor:
        if domain is not None:
            return self.A[domain].clone()
        return sum(self.weights[d] * self.A[d] for d in self.train_domains)

    def loss(self, domain: str, theta: torch.Tensor) -> float:
        d = theta.double() - self.m[domain]
        return float(0.5 * d @ self.A[domain] @ d + self.c[domain])
