"""Surface and line results and their files: one .npz of float64 arrays plus a JSON metadata string (no pickle)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import zipfile
from pathlib import Path

import numpy as np
import torch

import nexus_opt
from nexus_opt.errors import UserError

from ..result import Result, to_jsonable

FORMAT = "nexus-landscape/surface"
FORMAT_VERSION = 1


@dataclasses.dataclass
class SurfaceResult(Result):
    """Losses on a plane: `losses[d][i, j]` is domain d's loss at origin + x[j]*d1 + y[i]*d2 ('train' included)."""

    plane: str = "random"
    x: object = None  # (nx,) plane coordinates along d1
    y: object = None  # (ny,) along d2
    losses: dict = dataclasses.field(default_factory=dict)  # domain -> (ny, nx) array; 'train' = weighted training loss
    origin: object = None  # flat float64 weights at (0, 0), obj.params() order
    directions: object = None  # (2, n) float64: d1, d2 as evaluated
    points: dict = dataclasses.field(default_factory=dict)  # name -> [a, b] ('theta', 'min:<d>', 'ckpt<i>')
    offplane: dict = dataclasses.field(default_factory=dict)  # name -> distance of the point from the plane
    point_losses: dict = dataclasses.field(default_factory=dict)  # name -> {domain: loss at its plane coordinates}
    domains: list = dataclasses.field(default_factory=list)  # evaluated domains ('train' last)
    train_domains: list = dataclasses.field(default_factory=list)
    ood: list = dataclasses.field(default_factory=list)
    weights: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    normalization: dict = dataclasses.field(default_factory=dict)  # norm, bias policy, seeds, basis, cosine, norms
    settings: dict = dataclasses.field(default_factory=dict)  # grid, span, batch mode, chunk, device, dtype, labels
    versions: dict = dataclasses.field(default_factory=dict)
    timing: dict = dataclasses.field(default_factory=dict)  # points, points_per_s, resumed_rows, reused
    meta: dict = dataclasses.field(default_factory=dict)  # the objective's (checkpoint) meta
    fingerprint: str = ""
    seconds: float = 0.0  # wall-clock time of the grid evaluation

    def save(self, path: str | Path) -> Path:
        """Write one .npz: the arrays plus a JSON metadata string (no pickle); atomic replace."""
        return _save_npz(self, path, "surface")

    @classmethod
    def load(cls, path: str | Path) -> "SurfaceResult":
        """Read a file written by `save` (np.load with allow_pickle=False)."""
        return _load_npz(cls, path, "surface")

    def grid_minimum(self, domain: str) -> tuple[float, float, float]:
        """(a, b, loss) of the lowest grid node of a domain's surface (NaNs ignored)."""
        z = np.asarray(self.losses[domain], dtype=float)
        i, j = np.unravel_index(np.nanargmin(z), z.shape)
        return float(np.asarray(self.x)[j]), float(np.asarray(self.y)[i]), float(z[i, j])


@dataclasses.dataclass
class LineResult(Result):
    """Losses along origin + t*direction: `losses[d][k]` at t[k] (t = 0 start, t = 1 end; 'train' included)."""

    t: object = None
    losses: dict = dataclasses.field(default_factory=dict)
    origin: object = None  # flat float64 start
    direction: object = None  # flat float64 end - start
    points: dict = dataclasses.field(default_factory=dict)  # name -> t
    distance: float = 0.0  # ||end - start||
    domains: list = dataclasses.field(default_factory=list)
    train_domains: list = dataclasses.field(default_factory=list)
    ood: list = dataclasses.field(default_factory=list)
    weights: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)
    versions: dict = dataclasses.field(default_factory=dict)
    timing: dict = dataclasses.field(default_factory=dict)  # points_per_s
    meta: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # wall-clock time of the evaluation
    seed: int = 0

    def save(self, path: str | Path) -> Path:
        return _save_npz(self, path, "line")

    @classmethod
    def load(cls, path: str | Path) -> "LineResult":
        return _load_npz(cls, path, "line")


_ARRAYS = {"surface": ("x", "y", "origin", "directions"), "line": ("t", "origin", "direction")}


def _save_npz(r: Result, path: str | Path, kind: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(r.losses)
    arrays = {k: np.asarray(getattr(r, k), dtype=np.float64) for k in _ARRAYS[kind]}
    arrays.update({f"loss_{i}": np.asarray(r.losses[d], dtype=np.float64) for i, d in enumerate(names)})
    meta = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in _ARRAYS[kind] + ("losses",)}
    meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "loss_names": names})
    arrays["meta"] = np.array(json.dumps(jsonable(meta), allow_nan=False))
    from nexus_opt.files import atomic_path

    with atomic_path(path, "--out") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def _load_npz(cls, path: str | Path, kind: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no result file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
            raise UserError(f"{path} is not a landscape result file (not an .npz archive); pass a .npz written by "
                            f"`landscape plot-surface`")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except KeyError:
        raise UserError(f"{path} is not a landscape result file (no metadata entry); pass a .npz written by "
                        f"`landscape plot-surface`") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated or corrupt
        why = str(e).splitlines()[0][:120] if str(e) else "truncated"
        raise UserError(f"{path} is a corrupt or truncated result file ({type(e).__name__}: {why}); recompute it "
                        f"with `landscape plot-surface`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a landscape result file (its metadata is not a JSON object)")
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise UserError(f"{path} is not a {kind} result (format {_short(meta.get('format'))}, kind "
                        f"{_short(meta.get('kind'))})")
    fv = meta.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise UserError(f"{path} has an invalid format_version {_short(fv)}; recompute it with `landscape plot-surface`")
    if fv > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer version (format {fv}); upgrade nexus-landscape")
    names = meta.get("loss_names")
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_NAMES or \
            not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names) or len(set(names)) != len(names):
        raise UserError(f"{path}: 'loss_names' must be 1 to {MAX_NAMES} distinct non-empty names (got "
                        f"{_short(names)}); recompute it")
    need = list(_ARRAYS[kind]) + [f"loss_{i}" for i in range(len(names))]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise UserError(f"{path} is an incomplete {kind} result (missing {_short(missing)}); recompute it")
    _check_schema(path, kind, meta, arrays, len(names))
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in meta.items() if k in fields}
    kw.update({k: arrays[k] for k in _ARRAYS[kind]})
    kw["losses"] = {d: arrays[f"loss_{i}"] for i, d in enumerate(meta["loss_names"])}
    return cls(**kw)


MAX_NAMES = 1000       # domains of one result file
MAX_AXIS = 100_001     # points along one axis


def _short(v) -> str:
    from nexus_opt.files import short

    return short(repr(v), 120)


def _bad(path, what: str):
    raise UserError(f"{path} is not a valid result file: {what}; recompute it with `landscape plot-surface`")


def _real_array(path, name: str, a, ndim: int, finite: bool = True) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.ndim != ndim:
        _bad(path, f"'{name}' must be a {ndim}-D array of real numbers, got "
                   f"{getattr(a, 'dtype', type(a).__name__)} of shape {getattr(a, 'shape', '?')}")
    if finite and a.size and not np.isfinite(a).all():
        _bad(path, f"'{name}' has non-finite values")
    return a


_META_TYPES = {"plane": str, "points": dict, "offplane": dict, "point_losses": dict, "domains": list,
               "train_domains": list, "ood": list, "weights": dict, "seed": int, "normalization": dict,
               "settings": dict, "versions": dict, "timing": dict, "meta": dict, "fingerprint": str,
               "seconds": (int, float), "distance": (int, float)}


def _check_schema(path, kind: str, meta: dict, arrays: dict, n_names: int) -> None:
    """Types, shapes, finiteness and lengths of a result file's fields, before any is used."""
    for k, t in _META_TYPES.items():
        if k in meta and (not isinstance(meta[k], t) or isinstance(meta[k], bool)):
            _bad(path, f"'{k}' must be {getattr(t, '__name__', 'a number')}, got {_short(meta[k])}")
    for k in ("domains", "train_domains", "ood"):
        v = meta.get(k, [])
        if len(v) > MAX_NAMES or not all(isinstance(d, str) for d in v):
            _bad(path, f"'{k}' must be a list of at most {MAX_NAMES} names")
    for name, ab in meta.get("points", {}).items():
        want = 2 if kind == "surface" else None
        ok = (isinstance(ab, list) and len(ab) == want and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              and np.isfinite(v) for v in ab)) if want else \
            (isinstance(ab, (int, float)) and not isinstance(ab, bool) and np.isfinite(ab))
        if not ok:
            _bad(path, f"point {_short(name)} has coordinates {_short(ab)}")
    if kind == "surface":
        x = _real_array(path, "x", arrays["x"], 1)
        y = _real_array(path, "y", arrays["y"], 1)
        if not (2 <= len(x) <= MAX_AXIS and 2 <= len(y) <= MAX_AXIS):
            _bad(path, f"the grid must have 2 to {MAX_AXIS} points a side, got {len(x)} x {len(y)}")
        shape = (len(y), len(x))
        origin = _real_array(path, "origin", arrays["origin"], 1)
        d = _real_array(path, "directions", arrays["directions"], 2)
        if d.shape != (2, len(origin)):
            _bad(path, f"'directions' has shape {d.shape}, expected (2, {len(origin)})")
    else:
        t = _real_array(path, "t", arrays["t"], 1)
        if not 2 <= len(t) <= MAX_AXIS:
            _bad(path, f"'t' must have 2 to {MAX_AXIS} points, got {len(t)}")
        shape = (len(t),)
        origin = _real_array(path, "origin", arrays["origin"], 1)
        d = _real_array(path, "direction", arrays["direction"], 1)
        if d.shape != origin.shape:
            _bad(path, f"'direction' has shape {d.shape}, expected {origin.shape}")
    for i in range(n_names):
        z = _real_array(path, f"loss_{i}", arrays[f"loss_{i}"], len(shape), finite=False)  # NaN cells: diverged
        if z.shape != shape:
            _bad(path, f"'loss_{i}' has shape {z.shape}, expected {shape}")


def jsonable(x):
    """JSON-safe metadata: to_jsonable, then anything exotic (paths, dtypes) as a string."""
    return json.loads(json.dumps(to_jsonable(x), default=str))


def versions() -> dict:
    return {"nexus_opt": nexus_opt.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}

