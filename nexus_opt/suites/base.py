"""What every built-in domain suite provides, and the seeded source-pure domain sampler."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import limits
from ..errors import UserError
from ..util import generator, mix_seed, normalize_weights  # noqa: F401  (re-exported: their home is util)

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
