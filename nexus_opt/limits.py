"""Bounded work: estimate the memory and size a model/suite configuration asks for, before building it.

A manifest or an option can ask for any size; this refuses, with the estimate in the message, what would
not fit the machine (or would take hours just to build), unless the caller opts in with
`allow_large=True` (CLI: --allow-large, or LANDSCAPE_ALLOW_LARGE=1). The budget is the memory available
now (at most 80% of physical memory), or LANDSCAPE_MEMORY_BUDGET (bytes, or with a K/M/G/T suffix).
"""
from __future__ import annotations

import math
import os

from .errors import UserError

MAX_LAYERS = 4096          # depth / n_layer: more modules than this take minutes to build and are never meant
MAX_DIM = 1 << 24          # any single width, length or count in a model config
BYTES_PER_PARAM = 4 * 8    # weights, gradient, optimizer moments, an anchor and float64 analysis vectors
BYTES_PER_ACT = 4 * 4      # forward activations kept for backward (and double backward), float32
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def allow_large_default() -> bool:
    return _env_flag("LANDSCAPE_ALLOW_LARGE")


def parse_bytes(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    unit = t[-1:] if t[-1:] in _SUFFIX and t[-1:] else ""
    try:
        v = float(t[:-1] if unit else t) * _SUFFIX[unit]
    except ValueError:
        raise UserError(f"LANDSCAPE_MEMORY_BUDGET must be a size like 8G or 500M, got '{text}'") from None
    if not (math.isfinite(v) and v > 0):
        raise UserError(f"LANDSCAPE_MEMORY_BUDGET must be a positive size, got '{text}'")
    return int(v)


def memory_budget() -> int:
    """Bytes this process may plan to use: LANDSCAPE_MEMORY_BUDGET, else available memory (<= 80% of RAM)."""
    env = os.environ.get("LANDSCAPE_MEMORY_BUDGET")
    if env:
        return parse_bytes(env)
    total = avail = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    cands = [v for v in (avail, int(0.8 * total) if total else None) if v]
    return min(cands) if cands else 16 << 30


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"


def _shown(value) -> str:
    """repr(value), cut to 200 characters with its length (an error line echoes input, never all of it)."""
    s = repr(value)
    return s if len(s) <= 200 else f"{s[:200]}... ({len(s)} characters)"


def _why(why: str) -> str:
    return f"; {why}" if why else ""


def check_int(value, name: str, lo: int = 1, hi: int = MAX_DIM, where: str = "", why: str = "") -> int:
    """An integer in [lo, hi] (not a bool, not a float), or a UserError naming the field (and `why` the limits)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        else:
            raise UserError(f"{where}{name} must be an integer, got {_shown(value)}")
    if not lo <= value <= hi:
        raise UserError(f"{where}{name} must be between {lo} and {hi}, got {value}{_why(why)}")
    return value


def check_float(value, name: str, lo: float = -math.inf, hi: float = math.inf, where: str = "",
                lo_open: bool = False, hi_open: bool = False, why: str = "") -> float:
    """A finite number in the given range (not a bool, not a string), or a UserError naming the field (and
    `why` the limits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}{name} must be a number, got {_shown(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise UserError(f"{where}{name} is too large ({value})") from None
    if not math.isfinite(v):
        raise UserError(f"{where}{name} must be a finite number, got {_shown(value)}")
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise UserError(f"{where}{name} must be in {lb}{lo:g}, {hi:g}{rb}, got {_shown(value)}{_why(why)}")
    return v


def check_work(what: str, n_params: int, act_elems: int = 0, data_elems: int = 0, allow_large: bool | None = None,
               layers: int = 0) -> None:
    """Refuse a configuration whose estimated memory exceeds the budget (or with more layers than MAX_LAYERS)."""
    if allow_large is None:
        allow_large = allow_large_default()
    if allow_large:
        return
    if layers > MAX_LAYERS:
        raise UserError(f"{what} has {layers} layers (more than {MAX_LAYERS}: minutes just to build); "
                        "pass --allow-large (or set LANDSCAPE_ALLOW_LARGE=1) if you mean it")
    need = n_params * BYTES_PER_PARAM + act_elems * BYTES_PER_ACT + data_elems * 8
    budget = memory_budget()
    if need > budget:
        raise UserError(f"{what} needs about {human(need)} ({n_params:.3g} parameters, {act_elems:.3g} activations, "
                        f"{data_elems:.3g} data values) but this machine has {human(budget)} to spare; choose "
                        "smaller sizes, or pass --allow-large (LANDSCAPE_ALLOW_LARGE=1) to try anyway")


def is_allocation_failure(e: BaseException) -> bool:
    """An out-of-memory error from Python, numpy (_ArrayMemoryError) or torch (CPU allocator or CUDA)."""
    if isinstance(e, MemoryError):
        return True
    if type(e).__name__ == "OutOfMemoryError":
        return True
    if isinstance(e, ValueError):  # numpy refuses a size beyond the address space before trying
        text = str(e).lower()
        return "array is too big" in text or "maximum allowed dimension exceeded" in text
    if isinstance(e, RuntimeError):
        text = str(e).lower()
        return any(s in text for s in ("not enough memory", "defaultcpuallocator", "out of memory",
                                       "can't allocate memory", "cannot allocate memory"))
    return False
