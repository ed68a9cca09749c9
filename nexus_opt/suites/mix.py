"""A multi-domain regression suite for MLPs: a shared teacher plus a domain-specific one per domain."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MAX_EVAL_BATCHES, Suite, generator, opt_float, opt_int


def mse_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x = batch["x"]
    p = next(model.parameters(), None)
    if p is not None and x.dtype != p.dtype:
        x = x.to(p.dtype)
    return F.mse_loss(model(x).squeeze(-1), batch["y"].to(x.dtype))


class Mix(Suite):
    """Domains 'a', 'b', 'c': y = shared(x) + alpha * specific_k(x) + noise, x ~ N(mu_k, I).

    OOD domain 'ood': inputs from a region no domain trains on (mu = -mean of the domains' means),
    target = shared(x) + alpha * mean_k specific_k(x): solvable only by what the domains share.
    """

    name = "mix"
    SCHEMA = {"in_dim": opt_int(), "n_domains": opt_int(1, 26), "alpha": opt_float(), "noise": opt_float(0.0),
              "width": opt_int(), "eval_batches": opt_int(1, MAX_EVAL_BATCHES), "eval_batch_size": opt_int(1, 1 << 20)}
    ood_description = "inputs from an untrained region; target = shared part + the mean of the domain-specific parts"

    def __init__(self, seed: int = 0, weights=None, in_dim: int = 8, n_domains: int = 3, alpha: float = 0.5,
                 noise: float = 0.05, width: int = 16, eval_batches: int = 4, eval_batch_size: int = 64):
        self.domains = [chr(ord("a") + k) for k in range(n_domains)] + ["ood"]
        self.ood_domains = ["ood"]
        g = generator(seed, 11)
        self.W = {k: torch.randn(width, in_dim, generator=g) / in_dim ** 0.5 for k in ["shared"] + self.domains[:-1]}
        self.v = {k: torch.randn(width, generator=g) / width ** 0.5 for k in self.W}
        self.mu = {d: torch.randn(in_dim, generator=g) / in_dim ** 0.5 for d in self.domains[:-1]}
        self.mu["ood"] = -torch.stack(list(self.mu.values())).mean(0) * 2.0
        self.in_dim, self.alpha = in_dim, alpha
        super().__init__(seed, weights, in_dim=in_dim, n_domains=n_domains, alpha=alpha, noise=noise, width=width,
                         eval_batches=eval_batches, eval_batch_size=eval_batch_size)

    @classmethod
    def data_elems(cls, o: dict) -> int:
        k, d, w = o.get("n_domains", 3) + 1, o.get("in_dim", 8), o.get("width", 16)
        return k * (w * d + w + d + o.get("eval_batches", 4) * o.get("eval_batch_size", 64) * (d + 1))

    @classmethod
    def max_batch(cls, o: dict) -> int:
        return o.get("eval_batch_size", 64)

    def _f(self, k: str, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.W[k].T) @ self.v[k]

    def _sample(self, domain: str, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        x = self.mu[domain] + torch.randn(n, self.in_dim, generator=gen)
        if domain == "ood":
            spec = torch.stack([self._f(k, x) for k in self.domains[:-1]]).mean(0)
        else:
            spec = self._f(domain, x)
        y = self._f("shared", x) + self.alpha * spec + self.options["noise"] * torch.randn(n, generator=gen)
        return {"x": x, "y": y}

    def _train_batch(self, domain, gen, batch_size):
        return self._sample(domain, gen, batch_size)

    def _eval_batches(self, domain, gen):
        o = self.options
        return [self._sample(domain, gen, o["eval_batch_size"]) for _ in range(o["eval_batches"])]

    loss_fn = staticmethod(mse_loss)

    def default_model(self):
        return "mlp", {"in_dim": self.in_dim, "hidden": 32, "depth": 2, "out_dim": 1, "activation": "tanh"}
