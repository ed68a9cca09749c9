"""Typed analyzer results that serialise to JSON and back (numpy arrays and tensors become lists)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

R = TypeVar("R", bound="Result")


def to_jsonable(x: Any) -> Any:
    """Plain JSON types from results: dataclasses, tensors, arrays, numpy scalars; NaN/inf as null."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


@dataclasses.dataclass
class Result:
    """Base of every analyzer result: `to_dict`, `to_json`, `from_dict`, `from_json`."""

    def to_dict(self) -> dict:
        return to_jsonable(self)

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            from nexus_opt.files import write_atomic

            write_atomic(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls: type[R], d: dict) -> R:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls: type[R], path: str | Path) -> R:
        return cls.from_dict(json.loads(Path(path).read_text()))


def num(x) -> float | None:
    """A float for JSON, or None for a missing or non-finite number (NaN, inf)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)
