"""The evaluation engine: every chosen domain's loss at many points origin + a*d1 + b*d2 of weight space,
by `torch.func.vmap` over chunks of points or a plain per-point loop (`functional_call`; the model is never
written to). `batch="auto"` picks vmap on CUDA and elsewhere the faster of the two as probed on the objective.

Train mode: every batch's loss runs on an RNG reseeded for that batch (objective.batch_rng(seed, key)) at every
point, so a point's value is one deterministic function of its weights whatever the chunking, batching or order.
vmap then uses randomness="same": one dropout mask per batch, drawn as the per-point loop draws it, shared by
the chunk's points (vmap's "different" would give each point its own masks: values depending on the chunk).
BatchNorm in train mode cannot run under vmap (its running-statistics update is in place): the loop is used."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError

from ..hvp import math_sdpa
from ..objective import TRAIN, Objective, batch_rng
from ..params import get_flat, unflatten

BATCH_MODES = ("auto", "vmap", "loop")
W_BUDGET_BYTES = 1 << 29  # a vmap chunk's weight matrices (3 x chunk x n floats) stay under 512 MiB
_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def choose_batch(batch: str, device, obj: Objective | None = None, names: Sequence[str] | None = None,
                 chunk: int | None = None, train_mode: bool = False) -> str:
    """'auto' -> 'vmap' on CUDA (measured 9-19x faster there); elsewhere the faster of the two as measured
    once on this objective by `probe` (without an objective: 'loop'). Under torchrun the probe runs on rank 0
    only and its pick is broadcast, so every rank uses one engine and results do not depend on timing noise."""
    if batch not in BATCH_MODES:
        raise UserError(f"unknown batch mode '{batch}'; choose one of {list(BATCH_MODES)}")
    if batch != "auto":
        return batch
    if torch.device(device).type == "cuda":
        return "vmap"
    if obj is None:
        return "loop"
    from .. import distributed as dist

    if not dist.active():
        return probe(obj, names or list(obj.domains), chunk, train_mode=train_mode)["pick"]
    pick = probe(obj, names or list(obj.domains), chunk, train_mode=train_mode)["pick"] if dist.is_main() else "loop"
    return dist.broadcast_choice(pick, ("vmap", "loop"))


def probe(obj: Objective, names: Sequence[str], chunk: int | None = None, points: int = 16, repeats: int = 2,
          train_mode: bool = False, min_seconds: float = 0.05) -> dict:
    """Points per second of the loop and of vmap at the current weights, in the mode the surface will use; 'pick'
    is the faster. Each mode is warmed up on the shape it is timed on, then timed in `repeats` interleaved rounds,
    each repeating its call until `min_seconds` have passed; the best round counts. On a busy machine a single
    call of a millisecond can be preempted for tens of milliseconds: timing one call let that flip the choice
    (the mix MLP got the loop at 93 points/s where vmap runs 14,656)."""
    theta = get_flat(obj.params())
    D = torch.zeros(2, theta.numel(), dtype=theta.dtype, device=theta.device)
    evs = {m: Evaluator(obj, names, m, chunk, train_mode=train_mode) for m in ("vmap", "loop")}
    ks = {"vmap": min(points, evs["vmap"].chunk), "loop": max(1, min(points, evs["vmap"].chunk) // 4)}
    abs_ = {m: torch.zeros(ks[m], 2, dtype=theta.dtype, device=theta.device) for m in evs}
    rates = {m: 0.0 for m in evs}
    with obj.preserved(train_mode, None), torch.no_grad():
        for m, ev in evs.items():  # warm-up, on the timed shape
            ev(theta, D, abs_[m])
        for _ in range(repeats):
            for m, ev in evs.items():
                calls, t0 = 0, time.perf_counter()
                while True:
                    ev(theta, D, abs_[m])
                    calls += 1
                    took = time.perf_counter() - t0
                    if took >= min_seconds:
                        break
                rates[m] = max(rates[m], calls * ks[m] / max(took, 1e-9))
    if evs["vmap"].mode != "vmap":  # vmap unsupported for this model
        rates["vmap"] = 0.0
    rates["pick"] = "vmap" if rates["vmap"] > rates["loop"] else "loop"
    return rates


def default_chunk(n_params: int, itemsize: int) -> int:
    """Grid points per vmap call: the chunk's weight matrices within W_BUDGET_BYTES, at most 256."""
    return int(max(1, min(256, W_BUDGET_BYTES // max(1, 3 * n_params * itemsize))))



class _AllLosses(torch.nn.Module):
    """Every chosen domain's loss in one forward (so one functional_call per point, not one per batch); with
    `seed` (train mode) each batch's loss runs on batch_rng(seed, key)."""

    def __init__(self, obj: Objective, names: Sequence[str], seed: int | None = None):
        super().__init__()
        self.model, self.loss_fn, self.seed, self.device = obj.model, obj.loss_fn, seed, obj.device
        self.terms = [obj.keyed_terms(d) for d in names]

    def _term(self, key: int, c: float, batch) -> torch.Tensor:
        with batch_rng(self.seed, key, self.device):
            return c * self.loss_fn(self.model, batch).double()

    def forward(self) -> torch.Tensor:
        return torch.stack([sum(self._term(*t) for t in ts) for ts in self.terms])


class Evaluator:
    """Losses of chosen domains at many flat weight vectors, by vmap over chunks or a per-point loop.

    Both modes call `functional_call` on a module holding the objective's model and loss (the same
    evaluation as `obj.functional_loss`) with the point's weights: nothing is written into the model.
    Calls set the model's flags to eval (or `train_mode`: each batch reseeded from `seed`, see the module
    docstring); the caller keeps the buffers (Objective.preserved), which train-mode BatchNorm updates.
    """

    def __init__(self, obj: Objective, names: Sequence[str], mode: str, chunk: int | None = None, *,
                 train_mode: bool = False, seed: int = 0):
        self.obj, self.names, self.mode, self.train_mode = obj, list(names), mode, bool(train_mode)
        self.like = obj.params()
        self.module = _AllLosses(obj, self.names, int(seed) if self.train_mode else None)
        n = sum(p.numel() for p in self.like.values())
        self.chunk = int(chunk) if chunk else default_chunk(n, torch.empty((), dtype=obj.dtype).element_size())
        if self.chunk < 1:
            raise UserError(f"chunk must be >= 1, got {chunk}")
        self.note = ""

    def _at(self, w: torch.Tensor) -> torch.Tensor:
        p = {"model." + k: v for k, v in unflatten(w, self.like).items()}
        return torch.func.functional_call(self.module, p, (), tie_weights=True, strict=False)

    def _loop(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> dict[str, np.ndarray]:
        row = (lambda k: origin[k:k + 1]) if origin.dim() == 2 else (lambda k: origin)
        vals = torch.stack([self._at(_weights(row(k), D, ab[k:k + 1])[0]) for k in range(ab.shape[0])]).cpu().numpy()
        return {d: vals[:, i] for i, d in enumerate(self.names)}

    def _vmap(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> dict[str, np.ndarray]:
        with math_sdpa():
            vals = torch.func.vmap(self._at, randomness="same" if self.train_mode else "error")(
                _weights(origin, D, ab)).cpu().numpy()
        return {d: vals[:, i] for i, d in enumerate(self.names)}

    @torch.no_grad()
    def __call__(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> dict[str, np.ndarray]:
        """Losses at origin + a*d1 + b*d2 for the rows (a, b) of ab: vmap over chunks of points (each chunk's
        weights built at once) or one point at a time; falls back to the loop if vmap fails."""
        with self.obj.evaluating(self.train_mode):
            return self._call(origin, D, ab)

    @torch.no_grad()
    def at(self, W: torch.Tensor) -> dict[str, np.ndarray]:
        """Losses at the rows of W (points x params, flat weights in obj.params() order): the same chunking,
        vmap-or-loop choice and fallbacks as a plane's points (used for points not on one plane: random
        perturbations, curves)."""
        zero = torch.zeros(2, W.shape[1], dtype=W.dtype, device=W.device)
        with self.obj.evaluating(self.train_mode):
            return self._call(W, zero, None)

    def _call(self, origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor | None) -> dict[str, np.ndarray]:
        if ab is None:  # `at`: origin holds the points' weights themselves, one row each
            W, n = origin, origin.shape[0]
            ab = torch.zeros(n, 2, dtype=W.dtype, device=W.device)
            pick = lambda s, e: (W[s:e], ab[s:e])  # noqa: E731
        else:
            n = ab.shape[0]
            pick = lambda s, e: (origin, ab[s:e])  # noqa: E731
        parts, s = [], 0
        while s < n and self.mode == "vmap":
            try:
                o, a = pick(s, s + self.chunk)
                parts.append(self._vmap(o, D, a))
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
            o, a = pick(s, n)
            parts.append(self._loop(o, D, a))
        return {d: np.concatenate([p[d] for p in parts]) for d in self.names}


def _weights(origin: torch.Tensor, D: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Points x params weights origin + a*d1 + b*d2 (one formula for every mode); a 2-D `origin` holds one
    origin per point (Evaluator.at)."""
    o = origin if origin.dim() == 2 else origin[None]
    return o + ab[:, :1] * D[0][None] + ab[:, 1:2] * D[1][None]


def train_loss(losses: Mapping[str, np.ndarray], obj: Objective) -> np.ndarray:
    return sum(obj.weights[d] * np.asarray(losses[d]) for d in obj.train_domains)


def point_losses(ev: Evaluator, origin, D, points: Mapping[str, Sequence[float]], names, obj) -> dict:
    """Every domain's loss at each named point's plane coordinates (one evaluator call)."""
    if not points:
        return {}
    keys = list(points)
    ab = torch.as_tensor([points[k] for k in keys], dtype=origin.dtype, device=origin.device)
    vals = ev(origin, D, ab)
    vals[TRAIN] = train_loss(vals, obj)
    return {k: {d: float(vals[d][i]) for d in vals} for i, k in enumerate(keys)}

