"""What every built-in domain suite provides, and the seeded source-pure domain sampler."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import limits
from ..errors import UserError

Batch = Mapping[str, torch.Tensor]
_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 over the parts)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return z & _MASK


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def normalize_weights(train_domains: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Mixture weights over the trained domains, normalised to sum to 1 (uniform by default)."""
    if not weights:
        return {d: 1.0 / len(train_domains) for d in train_domains}
    unknown = sorted(set(weights) - set(train_domains))
    if unknown:
        raise UserError(f"mixture weight for unknown or untrained domain(s) {unknown}; trained domains are {train_domains}")
    try:
        w = {d: float(weights.get(d, 0.0)) for d in train_domains}
    except (TypeError, ValueError, OverflowError):
        w = {d: float("nan") for d in train_domains}
    if any(not (0 <= v < float("inf")) for v in w.values()) or not 0 < sum(w.values()) < float("inf"):
        raise UserError(f"mixture weights must be finite non-negative numbers with a positive sum, got {dict(weights)}")
    s = sum(w.values())
    return {d: v / s for d, v in w.items()}


class Suite:
    """A set of named domains: seeded training micro-batches, fixed evaluation batches, one loss.

    Subclasses set `name`, `domains`, `ood_domains` and implement `_train_batch`, `_eval_batches`,
    `loss_fn` and `default_model`. Every batch comes from one domain (source-pure).
    """

    name: str = ""
    SCHEMA: dict = {}  # option -> checker(value, name, where), see nexus_opt.limits
    domains: list[str] = []
    ood_domains: list[str] = []
    ood_description: str = ""

    def __init__(self, seed: int = 0, weights: Mapping[str, float] | None = None, **options):
        self.seed = int(seed)
        self.options = dict(options)
        self.weights = normalize_weights(self.train_domains, weights)
        self._eval_cache: dict[str, list[dict[str, torch.Tensor]]] = {}

    @property
    def train_domains(self) -> list[str]:
        return [d for d in self.domains if d not in self.ood_domains]

    def spec(self) -> dict:
        """JSON that rebuilds this suite with `make_suite(**spec)`."""
        return {"name": self.name, "seed": self.seed, "weights": self.weights, "options": self.options}

    def _check(self, domain: str) -> int:
        if domain not in self.domains:
            raise UserError(f"unknown domain '{domain}' in suite '{self.name}'; domains are {self.domains}")
        return self.domains.index(domain)

    def train_batch(self, domain: str, step: int, micro: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The micro-batch for (step, micro): a pure function of the seed, so resume is exact."""
        i = self._check(domain)
        return self._train_batch(domain, generator(self.seed, 1, step, micro, i), batch_size)

    def eval_batches(self, domain: str) -> list[dict[str, torch.Tensor]]:
        """The fixed evaluation batches of a domain (held-out split where the data has one)."""
        i = self._check(domain)
        if domain not in self._eval_cache:
            self._eval_cache[domain] = self._eval_batches(domain, generator(self.seed, 2, i))
        return self._eval_cache[domain]

    def sample_domain(self, step: int, micro: int) -> str:
        """The seeded choice of the domain of micro-batch (step, micro) by the mixture weights."""
        doms = self.train_domains
        w = torch.tensor([self.weights[d] for d in doms], dtype=torch.float64)
        return doms[int(torch.multinomial(w, 1, generator=generator(self.seed, 3, step, micro)))]

    @classmethod
    def data_elems(cls, options: dict) -> int:
        """Values the suite holds in memory for these (validated) options: the memory estimate's share."""
        return 0

    @classmethod
    def max_batch(cls, options: dict) -> int:
        """The largest evaluation batch these options ask for."""
        return 1

    # -- to implement -------------------------------------------------------------------------
    def _train_batch(self, domain: str, gen: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _eval_batches(self, domain: str, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    loss_fn: Callable

    def default_model(self) -> tuple[str, dict]:
        raise NotImplementedError


MAX_EVAL_BATCHES = 1024  # evaluation batches per domain: more is minutes per evaluation, never meaningful here


def opt_int(lo: int = 1, hi: int = limits.MAX_DIM):
    return lambda v, n, w: limits.check_int(v, n, lo, hi, where=w)


def opt_float(lo: float = -1e12, hi: float = 1e12, **kw):
    return lambda v, n, w: limits.check_float(v, n, lo, hi, where=w, **kw)
