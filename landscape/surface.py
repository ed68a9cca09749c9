"""Loss surfaces: every domain's loss (and the training loss) on a 2-D grid of a plane, or along a line.

Each grid point's weights are built as theta + a*d1 + b*d2 from device-resident directions and handed to
`functional_call` (the evaluation of `obj.functional_loss`, all domains in one call); the model is never
walked in place, so nothing drifts and the caller's model is unchanged. Evaluation is batched with
`torch.func.vmap` over chunks of grid points, or a plain per-point loop. `batch="auto"`: vmap on CUDA
(measured 9-19x faster than the loop on an H200); elsewhere a short interleaved probe of both modes on
the objective picks the faster (on 2 shared CPU cores vmap was 6-9x faster for the mix MLP and 0.45-0.7x
for the tiny GPT; `bench/bench_surface.py` re-measures). If vmap fails for a model (an op without a
batching rule) the grid falls back to the loop and records why; out of memory halves the vmap chunk.

With `out=PATH.npz` every finished block of rows is appended to a sidecar (`PATH.npz.part<rank>.jsonl`,
flushed per block): an interrupted grid resumes where it stopped and gives the same numbers as an
uninterrupted one; a finished file with the same fingerprint (weights, directions, grid, data) is reused.
Under torchrun (torch.distributed initialised) each rank evaluates its share of the remaining rows and the
rows are gathered once at the end (all_gather_object); rank 0 writes the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import time
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import nexus_opt
from nexus_opt.errors import UserError
from nexus_opt.util import check_seed

from . import directions as dirs
from .objective import TRAIN, Objective
from .params import get_flat, unflatten
from .result import Result, to_jsonable

PLANES = ("random", "domains", "checkpoints")
BATCH_MODES = ("auto", "vmap", "loop")
FORMAT = "nexus-landscape/surface"
FORMAT_VERSION = 1
W_BUDGET_BYTES = 1 << 29  # a vmap chunk's weight matrices (3 x chunk x n floats) stay under 512 MiB
_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


# -- results ------------------------------------------------------------------------------------------
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
    timing: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)  # the objective's (checkpoint) meta
    fingerprint: str = ""

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
    timing: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

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
    arrays["meta"] = np.array(json.dumps(_jsonable(meta), allow_nan=False))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
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
        raise UserError(f"{path} is not a {kind} result (format {meta.get('format')!r}, kind {meta.get('kind')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer version (format {meta['format_version']}); upgrade nexus-landscape")
    names = meta.get("loss_names")
    need = list(_ARRAYS[kind]) + [f"loss_{i}" for i in range(len(names))] if isinstance(names, list) else None
    missing = ["loss_names"] if need is None else [k for k in need if k not in arrays]
    if missing:
        raise UserError(f"{path} is an incomplete {kind} result (missing {missing}); recompute it")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in meta.items() if k in fields}
    kw.update({k: arrays[k] for k in _ARRAYS[kind]})
    kw["losses"] = {d: arrays[f"loss_{i}"] for i, d in enumerate(meta["loss_names"])}
    return cls(**kw)


def _jsonable(x):
    """JSON-safe metadata: to_jsonable, then anything exotic (paths, dtypes) as a string."""
    return json.loads(json.dumps(to_jsonable(x), default=str))


def versions() -> dict:
    return {"nexus_opt": nexus_opt.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# -- the evaluation engine ------------------------------------------------------------------------------
def choose_batch(batch: str, device, obj: Objective | None = None, names: Sequence[str] | None = None,
                 chunk: int | None = None) -> str:
    """'auto' -> 'vmap' on CUDA (measured 9-19x faster there); elsewhere the faster of the two as measured
    once on this objective by `probe` (without an objective: 'loop')."""
    if batch not in BATCH_MODES:
        raise UserError(f"unknown batch mode '{batch}'; choose one of {list(BATCH_MODES)}")
    if batch != "auto":
        return batch
    if torch.device(device).type == "cuda":
        return "vmap"
    if obj is None:
        return "loop"
    return probe(obj, names or list(obj.domains), chunk)["pick"]


def probe(obj: Objective, names: Sequence[str], chunk: int | None = None, points: int = 16, repeats: int = 2) -> dict:
    """Points per second of the loop and of vmap at the current weights (best of `repeats`, interleaved so
    that a busy machine slows both alike); 'pick' is the faster."""
    theta = get_flat(obj.params())
    D = torch.zeros(2, theta.numel(), dtype=theta.dtype, device=theta.device)
    evs = {m: Evaluator(obj, names, m, chunk) for m in ("vmap", "loop")}
    ks = {"vmap": min(points, evs["vmap"].chunk), "loop": max(1, min(points, evs["vmap"].chunk) // 4)}
    rates = {m: 0.0 for m in evs}
    with obj.evaluating(), torch.no_grad():
        for m, ev in evs.items():  # warm-up
            ev(theta, D, torch.zeros(min(2, ks[m]), 2, dtype=theta.dtype, device=theta.device))
        for _ in range(repeats):
            for m, ev in evs.items():
                ab = torch.zeros(ks[m], 2, dtype=theta.dtype, device=theta.device)
                t0 = time.perf_counter()
                ev(theta, D, ab)
                rates[m] = max(rates[m], ks[m] / max(time.perf_counter() - t0, 1e-9))
    if evs["vmap"].mode != "vmap":  # vmap unsupported for this model
        rates["vmap"] = 0.0
    rates["pick"] = "vmap" if rates["vmap"] > rates["loop"] else "loop"
    return rates


def default_chunk(n_params: int, itemsize: int) -> int:
    """Grid points per vmap call: the chunk's weight matrices within W_BUDGET_BYTES, at most 256."""
    return int(max(1, min(256, W_BUDGET_BYTES // max(1, 3 * n_params * itemsize))))


@contextlib.contextmanager
def _math_sdpa():
    """Fused attention kernels have no vmap batching rule: use the (batched, exact) math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class _AllLosses(torch.nn.Module):
    """Every chosen domain's loss in one forward (so one functional_call per point, not one per batch)."""

    def __init__(self, obj: Objective, names: Sequence[str]):
        super().__init__()
        self.model, self.loss_fn = obj.model, obj.loss_fn
        self.terms = [obj.terms(d) for d in names]

    def forward(self) -> torch.Tensor:
        return torch.stack([sum(c * self.loss_fn(self.model, b).double() for c, b in ts) for ts in self.terms])


class Evaluator:
    """Losses of chosen domains at many flat weight vectors, by vmap over chunks or a per-point loop.

    Both modes call `functional_call` on a module holding the objective's model and loss (the same
    evaluation as `obj.functional_loss`) with the point's weights: nothing is written into the model.
    """

    def __init__(self, obj: Objective, names: Sequence[str], mode: str, chunk: int | None = None):
        self.obj, self.names, self.mode = obj, list(names), mode
        self.like = obj.params()
        self.module = _AllLosses(obj, self.names)
        n = sum(p.numel() for p in self.like.values())
        self.chunk = int(chunk) if chunk else default_chunk(n, torch.empty((), dtype=obj.dtype).element_size())
        if self.chunk < 1:
            raise UserError(f"chunk must be >= 1, got {chunk}")
        self.note = ""

    def _at(self, w: torch.Tensor) -> torch.Tensor:
        p = {"model." + k: v for k, v in unflatten(w, self.like).items()}
        return torch.func.functional_call(self.module, p, (), tie_weights=True, strict=False)

    def _loop(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> dict[str, np.ndarray]:
        vals = torch.stack([self._at(_weights(origin, D, ab[k:k + 1])[0]) for k in range(ab.shape[0])]).cpu().numpy()
        return {d: vals[:, i] for i, d in enumerate(self.names)}

    def _vmap(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> dict[str, np.ndarray]:
        with _math_sdpa():
            vals = torch.func.vmap(self._at)(_weights(origin, D, ab)).cpu().numpy()
        return {d: vals[:, i] for i, d in enumerate(self.names)}

    @torch.no_grad()
    def __call__(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> dict[str, np.ndarray]:
        """Losses at origin + a*d1 + b*d2 for the rows (a, b) of ab: vmap over chunks of points (each chunk's
        weights built at once) or one point at a time; falls back to the loop if vmap fails."""
        parts, s, n = [], 0, ab.shape[0]
        while s < n and self.mode == "vmap":
            try:
                parts.append(self._vmap(origin, D, ab[s:s + self.chunk]))
                s += self.chunk
            except _OOM:
                if self.chunk == 1:
                    raise
                self.chunk = max(1, self.chunk // 2)  # activations did not fit: halve the chunk and retry
                self.note = f"out of memory: chunk lowered to {self.chunk}"
                if origin.is_cuda:
                    torch.cuda.empty_cache()
            except (RuntimeError, NotImplementedError, ValueError) as e:
                self.mode = "loop"
                self.note = f"vmap failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); used the loop"
        if s < n:
            parts.append(self._loop(origin, D, ab[s:]))
        return {d: np.concatenate([p[d] for p in parts]) for d in self.names}


def _weights(origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Points x params weights origin + a*d1 + b*d2 (one formula for every mode)."""
    return origin[None] + ab[:, :1] * D[0][None] + ab[:, 1:2] * D[1][None]


def _train_loss(losses: Mapping[str, np.ndarray], obj: Objective) -> np.ndarray:
    return sum(obj.weights[d] * np.asarray(losses[d]) for d in obj.train_domains)


# -- domains, progress, sharding, resume -----------------------------------------------------------------
def resolve_domains(obj: Objective, domains) -> tuple[list[str], list[str]]:
    """(domains to report, domains to evaluate): default every domain incl. OOD; training domains always."""
    if domains is None:
        want = list(obj.domains)
    else:
        want = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else [str(d) for d in domains]
        want = [d for d in want if d and d != TRAIN]
        bad = [d for d in want if d not in obj.domains]
        if bad:
            raise UserError(f"unknown domain(s) {bad}; domains are {list(obj.domains)}")
        if not want:
            want = list(obj.domains)
    evaluated = want + [d for d in obj.train_domains if d not in want]
    return want, evaluated


def _progress(progress, total: int, what: str):
    """A callable(done) for: None/False (nothing), True (a rich bar on stderr), or callable(done, total, what)."""
    if not progress:
        return contextlib.nullcontext(lambda done: None)
    if callable(progress):
        return contextlib.nullcontext(lambda done: progress(done, total, what))

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=False) as p:
            task = p.add_task(what, total=total)
            yield lambda done: p.update(task, completed=done)
    return bar()


def dist_info() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_rows(rows: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank's contiguous share of `rows`: shares differ in size by at most one and cover rows exactly once."""
    rows = list(rows)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world {world}")
    base, extra = divmod(len(rows), world)
    start = rank * base + min(rank, extra)
    return rows[start:start + base + (1 if rank < extra else 0)]


def _hash_tensors(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, Mapping):
        for k in sorted(x, key=str):
            h.update(str(k).encode())
            _hash_tensors(h, x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            _hash_tensors(h, v)
    else:
        h.update(repr(x).encode())


def fingerprint(obj: Objective, origin: torch.Tensor, D: torch.Tensor, x: np.ndarray, y: np.ndarray,
                names: Sequence[str]) -> str:
    """sha256 of what determines the grid: weights, directions, coordinates, domains, batches, loss, dtype."""
    h = hashlib.sha256()
    _hash_tensors(h, [origin, D, torch.from_numpy(np.asarray(x, dtype=np.float64)),
                      torch.from_numpy(np.asarray(y, dtype=np.float64))])
    h.update(json.dumps([list(names), obj.train_domains, obj.weights, str(obj.dtype),
                         getattr(obj.loss_fn, "__qualname__", repr(obj.loss_fn))]).encode())
    for d in names:
        _hash_tensors(h, obj.domains[d])
    return h.hexdigest()


def _sidecars(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part*.jsonl"))


def _read_sidecars(out: Path, fp: str) -> dict[int, dict[str, list[float]]]:
    """Rows finished by earlier (interrupted) runs; a torn last line is ignored."""
    done: dict[int, dict[str, list[float]]] = {}
    for p in _sidecars(out):
        lines = p.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if head.get("fingerprint") != fp:
            raise UserError(f"{p} holds a partial grid for other settings or weights; delete it (and its "
                            f"siblings) or choose another output path")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            for i, row in zip(rec["rows"], zip(*[rec["losses"][d] for d in rec["names"]])):
                done[int(i)] = dict(zip(rec["names"], row))
    return done


class _Sidecar:
    """Append-only JSON-lines log of finished row blocks, flushed and fsynced per block."""

    def __init__(self, out: Path, rank: int, fp: str):
        self.path = out.with_name(f"{out.name}.part{rank}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.f = open(self.path, "a")
        if new:
            self.f.write(json.dumps({"fingerprint": fp, "format": FORMAT}) + "\n")
            self.f.flush()

    def write(self, rows: list[int], losses: Mapping[str, np.ndarray]) -> None:
        names = list(losses)
        rec = {"rows": rows, "names": names, "losses": {d: np.asarray(losses[d]).tolist() for d in names}}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# -- planes ---------------------------------------------------------------------------------------------
def _flat_of(x, obj: Objective) -> torch.Tensor:
    """A flat float64 vector from an Objective, a tensor, an array or a list (checked against obj)."""
    if isinstance(x, Objective):
        other = x.params()
        mine = obj.params()
        if [(k, tuple(v.shape)) for k, v in other.items()] != [(k, tuple(v.shape)) for k, v in mine.items()]:
            raise UserError("the other checkpoint's parameters differ in names or shapes from the first; "
                            "a plane needs one architecture")
        v = get_flat(other, torch.float64)
    else:
        v = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64))
    n = obj.num_params()
    if v.numel() != n:
        raise UserError(f"a point has {v.numel()} values but the model has {n} parameters")
    return v.reshape(-1).to(device=obj.device, dtype=torch.float64)


def _minima(obj: Objective, names: Sequence[str], given, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-domain minima: the given ones (domain -> flat), the rest by `closeness.descend` from theta."""
    given = dict(given or {})
    todo = [d for d in names if d not in given]
    if todo and int(steps) < 1:
        raise UserError(f"descend_steps (--steps) must be at least 1 to find the minimum of {todo} for the domains "
                        f"plane, got {steps}")
    out = {}
    for d in names:
        if d in given:
            out[d] = _flat_of(given[d], obj)
        else:
            from .closeness import descend
            out[d] = descend(obj, d, steps=steps, seed=seed).theta.to(obj.device)
    for d in given:
        if d not in out and d in obj.domains:
            out[d] = _flat_of(given[d], obj)
    return out


def make_plane(obj: Objective, plane: str, *, seed: int = 0, norm: str = "filter", bias: str = "zero",
               others=None, minima=None, pair=None, domains: Sequence[str] = (), descend_steps: int = 300,
               labels: Sequence[str] | None = None) -> dirs.Plane:
    """The plane of a surface: seeded random, through theta and two domain minima, or through checkpoints."""
    if plane not in PLANES:
        raise UserError(f"unknown plane '{plane}'; choose one of {list(PLANES)}")
    if plane == "random":
        return dirs.random_plane(obj, seed, norm, bias)
    theta = get_flat(obj.params(), torch.float64)
    if plane == "checkpoints":
        others = list(others or [])
        if len(others) not in (1, 2):
            raise UserError(f"the checkpoints plane needs 1 or 2 other checkpoints besides the first, got {len(others)}")
        pts = [theta] + [_flat_of(o, obj) for o in others]
        names = list(labels) if labels else [f"ckpt{i}" for i in range(len(pts))]
        return dirs.checkpoint_plane(pts, names, params=obj.params(), seed=seed, norm=norm, bias=bias)
    if pair is None:
        cands = [d for d in obj.train_domains if d in domains] or list(obj.train_domains)
        with_min = [d for d in cands if d in (minima or {})]
        pair = (with_min if len(with_min) >= 2 else list(dict.fromkeys(cands + list(domains))))[:2]
    pair = list(pair)
    bad = [d for d in pair if d not in obj.domains]
    if bad or len(set(pair)) != 2:
        raise UserError(f"the domains plane needs two distinct domains of {list(obj.domains)}, got {pair}")
    mins = _minima(obj, list(dict.fromkeys(list(pair) + list(domains))), minima, descend_steps, seed)
    ordered = {d: mins[d] for d in list(pair) + [d for d in mins if d not in pair]}
    return dirs.domain_plane(theta, ordered, pair)


def grid_axes(points: Mapping[str, Sequence[float]], span, grid) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """x, y coordinates and the box: span None -> +-1 if the origin is the only point, else a square around the
    points' bounding box, padded by a quarter of its larger side; a number s -> +-s; or (xmin, xmax, ymin, ymax)."""
    nx, ny = (int(grid), int(grid)) if np.isscalar(grid) else (int(grid[0]), int(grid[1]))
    if nx < 2 or ny < 2:
        raise UserError(f"grid must be at least 2 points per side, got {grid}")
    if span is None:
        P = np.array([[0.0, 0.0]] + [list(v) for v in points.values()], dtype=float)
        lo, hi = P.min(0), P.max(0)
        side = float(max(hi - lo))
        if side == 0:
            box = [-1.0, 1.0, -1.0, 1.0]
        else:
            c, h = (lo + hi) / 2, 0.75 * side
            box = [c[0] - h, c[0] + h, c[1] - h, c[1] + h]
    elif np.isscalar(span):
        s = float(span)
        if not (s > 0 and np.isfinite(s)):
            raise UserError(f"span must be a positive finite number, got {span}")
        box = [-s, s, -s, s]
    else:
        box = [float(v) for v in span]
        if len(box) != 4 or not (box[0] < box[1] and box[2] < box[3]) or not np.all(np.isfinite(box)):
            raise UserError(f"span must be a number or (xmin, xmax, ymin, ymax), finite, with min < max, got {span}")
    box = [float(v) for v in box]
    return np.linspace(box[0], box[1], nx), np.linspace(box[2], box[3], ny), box


# -- the surface ----------------------------------------------------------------------------------------
def surface(obj: Objective, plane: str = "random", grid=51, span=None, seed: int = 0, domains=None, others=None,
            minima=None, norm: str = "filter", bias: str = "zero", batch: str = "auto", chunk: int | None = None,
            out: str | Path | None = None, progress=None, pair: Sequence[str] | None = None,
            descend_steps: int = 300, labels: Sequence[str] | None = None) -> SurfaceResult:
    """Every domain's loss and the training loss on a grid of a plane around the objective's weights.

    plane: 'random' (seeded filter-normalised orthogonal directions, seeds seed and seed+1), 'domains'
    (through theta and the minima of two trained domains, `pair`, default the first two; `minima` maps
    domain -> flat weights, missing ones are found by `closeness.descend`), 'checkpoints' (through the
    objective's weights and 1 or 2 `others`: Objectives or flat vectors; with 1 the second direction is
    random). grid: points per side or (nx, ny). span: None (auto: +-1 for random, else the points' padded
    bounding box), a number s (+-s) or (xmin, xmax, ymin, ymax). domains: names or 'a,b' (default all, OOD
    included; training domains are always evaluated for 'train'). batch: 'auto' | 'vmap' | 'loop'. out:
    an .npz path written at the end; finished rows go to a sidecar so an interrupted grid resumes.
    progress: None, True (rich bar) or callable(done_points, total_points, what). Eval mode; the model,
    its buffers, flags and the RNG are unchanged.
    """
    from .gradsim import preserved

    seed = check_seed(seed, "seed")
    grid_axes({}, span, grid)  # refuse a bad grid or span before any descent or evaluation
    want, names = resolve_domains(obj, domains)
    rank, world = dist_info()
    device, dtype = obj.device, obj.dtype
    pl = make_plane(obj, plane, seed=seed, norm=norm, bias=bias, others=others, minima=minima, pair=pair,
                    domains=want, descend_steps=descend_steps, labels=labels)
    origin = pl.origin.to(device=device, dtype=dtype)
    D = torch.stack([pl.d1, pl.d2]).to(device=device, dtype=dtype)
    if world > 1:  # one plane for all ranks (descent on GPUs need not be bit-identical)
        origin, D, pl.points, pl.offplane = _broadcast([origin, D, pl.points, pl.offplane], device)
    x, y, box = grid_axes(pl.points, span, grid)
    fp = fingerprint(obj, origin, D, x, y, names)
    out = Path(out) if out is not None else None
    if out is not None and out.is_file():
        try:
            old = SurfaceResult.load(out)
            if old.fingerprint == fp:
                old.timing = dict(old.timing, reused=True)
                return old
        except UserError:
            pass
    probed = probe(obj, names, chunk) if batch == "auto" and device.type != "cuda" else None
    mode = probed["pick"] if probed else choose_batch(batch, device)
    ev = Evaluator(obj, names, mode, chunk)
    nx, ny = len(x), len(y)
    rows_per_block = 1 if mode == "loop" else max(1, ev.chunk // nx)
    Z = {d: np.full((ny, nx), np.nan) for d in names}
    t0 = time.perf_counter()
    done = _read_sidecars(out, fp) if out is not None and rank == 0 else {}
    if world > 1:
        done = _broadcast([done], "cpu")[0]
    resumed = len(done)
    mine = shard_rows([i for i in range(ny) if i not in done], world, rank)
    computed: dict[int, dict[str, list[float]]] = {}
    xs = torch.as_tensor(x, dtype=dtype, device=device)
    side = _Sidecar(out, rank, fp) if out is not None and mine else None
    try:
        with preserved(obj, False, seed), _progress(progress if rank == 0 else None, nx * ny, f"surface {plane}") as tick:
            tick(len(done) * nx)
            for s in range(0, len(mine), rows_per_block):
                rows = mine[s:s + rows_per_block]
                ab = torch.stack([xs.repeat(len(rows)),
                                  torch.as_tensor(np.repeat(y[rows], nx), dtype=dtype, device=device)], 1)
                vals = ev(origin, D, ab)
                block = {d: vals[d].reshape(len(rows), nx) for d in names}
                for k, i in enumerate(rows):
                    computed[i] = {d: block[d][k].tolist() for d in names}
                if side is not None:
                    side.write(rows, block)
                tick((len(done) + len(computed)) * nx)
            point_losses = _point_losses(ev, origin, D, pl.points, names, obj)
    finally:
        if side is not None:
            side.close()
    elapsed = time.perf_counter() - t0
    if world > 1:
        for part in _all_gather(computed):
            done.update(part)
    done.update(computed)
    for i, row in done.items():
        for d in names:
            Z[d][i] = row[d]
    Z[TRAIN] = _train_loss(Z, obj)
    res = SurfaceResult(
        plane=plane, x=x, y=y, losses={**{d: Z[d] for d in want}, **{d: Z[d] for d in names if d not in want},
                                       TRAIN: Z[TRAIN]},
        origin=dirs.to_numpy(origin), directions=D.double().cpu().numpy(), points=pl.points, offplane=pl.offplane,
        point_losses=point_losses, domains=want, train_domains=list(obj.train_domains), ood=list(obj.ood),
        weights=dict(obj.weights), seed=int(seed),
        normalization={**pl.info, **dirs.basis_stats(D[0], D[1])} if plane == "random" else
        {"norm": "none (directions between points)", **pl.info, **dirs.basis_stats(D[0], D[1])},
        settings={"grid": [nx, ny], "span": box, "batch": batch, "batch_used": ev.mode, "batch_note": ev.note,
                  "batch_probe": probed, "chunk": ev.chunk if ev.mode == "vmap" else None, "device": str(device), "dtype": str(dtype),
                  "pair": pl.info.get("pair"), "descend_steps": descend_steps if plane == "domains" else None,
                  "labels": list(labels) if labels else None, "world_size": world},
        versions=versions(),
        timing={"seconds": elapsed, "points": len(computed) * nx, "resumed_rows": resumed,
                "points_per_s": len(computed) * nx / elapsed if elapsed > 0 and computed else None},
        meta=_jsonable(obj.meta), fingerprint=fp)
    if out is not None and rank == 0:
        res.save(out)
        for p in _sidecars(out):
            p.unlink()
    if world > 1:
        torch.distributed.barrier()
    return res


def _point_losses(ev: Evaluator, origin, D, points: Mapping[str, Sequence[float]], names, obj) -> dict:
    """Every domain's loss at each named point's plane coordinates (one evaluator call)."""
    if not points:
        return {}
    keys = list(points)
    ab = torch.as_tensor([points[k] for k in keys], dtype=origin.dtype, device=origin.device)
    vals = ev(origin, D, ab)
    vals[TRAIN] = _train_loss(vals, obj)
    return {k: {d: float(vals[d][i]) for d in vals} for i, k in enumerate(keys)}


def _broadcast(objs: list, device) -> list:
    """Rank 0's objects on every rank (tensors come back on `device`)."""
    cpu = [o.cpu() if isinstance(o, torch.Tensor) else o for o in objs]
    torch.distributed.broadcast_object_list(cpu, src=0)
    return [o.to(device) if isinstance(o, torch.Tensor) else o for o in cpu]


def _all_gather(obj) -> list:
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


# -- lines ----------------------------------------------------------------------------------------------
def line(obj: Objective, start=None, end=None, points: int = 51, domains=None, *, span=(0.0, 1.0),
         batch: str = "auto", chunk: int | None = None, descend_steps: int = 300, seed: int = 0) -> LineResult:
    """Every domain's loss along start + t*(end - start) for `points` values of t in `span`.

    start/end: None (the objective's weights), an Objective (another checkpoint), a flat vector, or a
    domain name (that domain's nearest minimum, by `closeness.descend` from the weights): e.g.
    `line(obj, None, 'code')` walks from theta toward the code minimum; span=(-0.5, 1.5) extends it.
    """
    from .gradsim import preserved

    if int(points) < 2:
        raise UserError(f"a line needs at least 2 points, got {points}")
    want, names = resolve_domains(obj, domains)

    def resolve(p, what):
        if p is None:
            return get_flat(obj.params(), torch.float64), "theta"
        if isinstance(p, str):
            if p not in obj.domains and p != TRAIN:
                raise UserError(f"line {what} '{p}' is neither a point nor a domain; domains are {list(obj.domains)}")
            from .closeness import descend
            m = descend(obj, None if p == TRAIN else p, steps=descend_steps, seed=seed).theta
            return m.to(obj.device), f"min:{p}"
        return _flat_of(p, obj), what

    if end is None:
        raise UserError("line needs an end: a checkpoint, a flat vector or a domain name")
    s, s_name = resolve(start, "start")
    e, e_name = resolve(end, "end")
    o, d = dirs.segment(s, e)
    if not (len(span) == 2 and span[0] < span[1]):
        raise UserError(f"span must be (tmin, tmax) with tmin < tmax, got {span}")
    t = np.linspace(float(span[0]), float(span[1]), int(points))
    dev, dt = obj.device, obj.dtype
    O, Dd = o.to(device=dev, dtype=dt), d.to(device=dev, dtype=dt)
    ev = Evaluator(obj, names, choose_batch(batch, dev, obj, names, chunk), chunk)
    t0 = time.perf_counter()
    with preserved(obj, False, seed):
        tt = torch.as_tensor(t, dtype=dt, device=dev)
        vals = ev(O, torch.stack([Dd, torch.zeros_like(Dd)]), torch.stack([tt, torch.zeros_like(tt)], 1))
    vals[TRAIN] = _train_loss(vals, obj)
    el = time.perf_counter() - t0
    labels = {s_name: 0.0, e_name: 1.0} if s_name != e_name else {"start": 0.0, "end": 1.0}
    return LineResult(t=t, losses={**{k: vals[k] for k in want}, **{k: vals[k] for k in names if k not in want},
                                   TRAIN: vals[TRAIN]},
                      origin=dirs.to_numpy(O), direction=dirs.to_numpy(Dd), points=labels,
                      distance=float(Dd.double().norm()), domains=want, train_domains=list(obj.train_domains),
                      ood=list(obj.ood), weights=dict(obj.weights),
                      settings={"points": int(points), "span": [float(span[0]), float(span[1])], "batch": batch,
                                "batch_used": ev.mode, "batch_note": ev.note, "device": str(dev), "dtype": str(dt),
                                "descend_steps": descend_steps},
                      versions=versions(), timing={"seconds": el, "points_per_s": len(t) / el if el > 0 else None},
                      meta=_jsonable(obj.meta))

