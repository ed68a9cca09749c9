"""Built-in multi-domain suites by name: `text` (byte LM), `mix` (MLP regression), `bowls` (quadratics)."""
from __future__ import annotations

from .. import limits
from ..errors import UserError
from .base import Suite, generator, mix_seed
from .bowls import Bowls
from .mix import Mix
from .text import Text

SUITES: dict[str, type[Suite]] = {"text": Text, "mix": Mix, "bowls": Bowls}


def _check_weights(weights):
    if weights is None:
        return None
    if not isinstance(weights, dict):
        raise UserError(f"mixture weights must map domain names to numbers, got {type(weights).__name__}")
    return {str(k): limits.check_float(v, f"weight of '{k}'", 0.0, 1e300, where="mixture ")
            for k, v in weights.items()}


def check_options(name: str, options) -> dict:
    """A suite's options checked against its schema (known keys, right types, meaningful ranges)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise UserError(f"suite options must be an object, got {type(options).__name__}")
    schema = SUITES[name].SCHEMA
    unknown = sorted(map(str, set(options) - set(schema)))
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for suite '{name}'; known: {sorted(schema)}")
    return {k: schema[k](v, k, f"suite '{name}' option ") for k, v in options.items()}


def make_suite(name: str, seed: int = 0, weights=None, options: dict | None = None,
               allow_large: bool | None = None) -> Suite:
    """Build a suite from its name, seed, mixture weights and options (the checkpoint's `suite` spec).

    Everything is validated, and the suite's data sized, before anything is generated.
    """
    if not isinstance(name, str) or name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    seed = limits.check_int(seed, "seed", -(2 ** 32 - 1), 2 ** 32 - 1, where=f"suite '{name}' ")
    weights = _check_weights(weights)
    options = check_options(name, options)
    cls = SUITES[name]
    limits.check_work(f"suite '{name}' {options}", 0, 0, cls.data_elems(options), allow_large)
    try:
        return cls(seed=seed, weights=weights, **options)
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise UserError(f"bad options for suite '{name}': {e}") from None


__all__ = ["Suite", "Bowls", "Mix", "Text", "SUITES", "make_suite", "generator", "mix_seed"]
