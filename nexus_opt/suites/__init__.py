"""Built-in multi-domain suites by name: `text` (byte LM), `mix` (MLP regression), `bowls` (quadratics)."""
from __future__ import annotations

from ..errors import UserError
from .base import Suite, generator, mix_seed
from .bowls import Bowls
from .mix import Mix
from .text import Text

SUITES: dict[str, type[Suite]] = {"text": Text, "mix": Mix, "bowls": Bowls}


def make_suite(name: str, seed: int = 0, weights=None, options: dict | None = None) -> Suite:
    """Build a suite from its name, seed, mixture weights and options (the checkpoint's `suite` spec)."""
    if name not in SUITES:
        raise UserError(f"unknown suite '{name}'; choose one of {sorted(SUITES)}")
    try:
        return SUITES[name](seed=seed, weights=weights, **(options or {}))
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise UserError(f"bad options for suite '{name}': {e}") from None


__all__ = ["Suite", "Bowls", "Mix", "Text", "SUITES", "make_suite", "generator", "mix_seed"]
