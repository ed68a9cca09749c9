"""Gradient similarity: cosines between per-domain gradients at one checkpoint, with a noise floor and error bars."""
from __future__ import annotations

import time
import dataclasses
from typing import Callable, Optional

import numpy as np
import torch

from nexus_opt.errors import UserError
from nexus_opt.util import check_seed, mix_seed

from .gradients import batch_gradient, domain_gradient  # noqa: F401  (re-exported)
from .objective import Objective, batch_rng
from .params import layer_slices
from .result import Result, num

Progress = Callable[[int, int, str], None]  # progress(done, total, what)
CHUNKS = 8  # a domain with a single batch is cut into this many chunks of examples (noise floor, bootstrap)


@dataclasses.dataclass
class GradSimResult(Result):
    """Cosine matrix of per-domain gradients (rows/columns in `domains` order), norms, noise floor, error bars."""

    domains: list = dataclasses.field(default_factory=list)
    ood: list = dataclasses.field(default_factory=list)  # which of `domains` are OOD
    cosine: list = dataclasses.field(default_factory=list)  # K x K
    norms: dict = dataclasses.field(default_factory=dict)  # domain -> ||g_d||
    loss: dict = dataclasses.field(default_factory=dict)  # domain -> loss here (+ 'train' when all trained present)
    per_layer: Optional[dict] = None  # parameter name -> K x K cosine matrix (null where a gradient is zero)
    per_layer_norms: Optional[dict] = None  # parameter name -> {domain: norm}
    split_half: dict = dataclasses.field(default_factory=dict)  # domain -> same-domain half-vs-half cosine or null
    split_half_reason: dict = dataclasses.field(default_factory=dict)  # domain -> why split_half is null / how split
    cosine_stderr: Optional[list] = None  # K x K bootstrap standard errors (null where a domain has < 2 units)
    summary_domains: list = dataclasses.field(default_factory=list)  # domains whose pairs make the summaries
    conflict_rate: Optional[float] = None  # share of negative cosines among summary pairs i < j
    conflict_rate_stderr: Optional[float] = None
    mean_offdiag_cosine: Optional[float] = None  # mean cosine over summary pairs i < j
    mean_offdiag_stderr: Optional[float] = None
    settings: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0  # wall-clock time of the measurement
    cosine_precision_error: Optional[float] = None  # how far rounding (the dtype used) can move a cosine


# -- gradients: landscape.gradients (batch_gradient, domain_gradient) --------------------------------------


def _split_examples(batch, parts: int = CHUNKS) -> list[tuple[object, int]] | str:
    """A batch cut into up to `parts` chunks of examples, as (chunk, size) pairs, or why it cannot be cut.
    Any nesting of tuples, lists and dicts works (torch.utils._pytree): every tensor leaf is cut along its
    leading dimension, which must be common to all of them; non-tensor leaves are kept as they are."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(batch)
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    if not tensors:
        return "the domain has one batch with no tensors to split"
    if not all(v.dim() >= 1 for v in tensors):
        return "the domain has one batch with a tensor that has no batch dimension"
    n = int(tensors[0].shape[0])
    if any(int(v.shape[0]) != n for v in tensors):
        return "the domain has one batch whose tensors disagree on the leading (batch) dimension"
    if n < 2:
        return "the domain has one batch of one example: nothing to split"
    bounds = np.linspace(0, n, min(parts, n) + 1).round().astype(int)
    return [(tree_unflatten([v[a:b] if isinstance(v, torch.Tensor) else v for v in leaves], spec), int(b - a))
            for a, b in zip(bounds[:-1], bounds[1:])]


# -- cosine algebra on a Gram matrix ---------------------------------------------------------------------
def _cosines(W: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosines and norms of the combinations W @ X, from the Gram matrix G = X X^T (NaN for a zero vector)."""
    C = W @ G @ W.T
    C = 0.5 * (C + C.T)  # exactly symmetric
    nrm = np.sqrt(np.clip(np.diag(C), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = C / np.outer(nrm, nrm)
    cos[~np.isfinite(cos)] = np.nan
    return np.clip(cos, -1.0, 1.0), nrm


def _pair_summary(cos: np.ndarray, idx: list[int]) -> tuple[float, float]:
    """(mean cosine, share of negative cosines) over pairs i < j of `idx`."""
    vals = np.array([cos[i, j] for a, i in enumerate(idx) for j in idx[a + 1:]])
    if vals.size == 0 or np.isnan(vals).any():
        return float("nan"), float("nan")
    return float(vals.mean()), float((vals < 0).mean())


def _matrix(a: np.ndarray) -> list:
    return [[num(v) for v in row] for row in a]


class _Rows:
    """The per-batch gradient rows (M x n): in memory when they take at most 1 GiB and fit in the Lanczos
    basis's share of the memory available, else in a temporary file (landscape.basis.Basis: pwrite/pread a
    column chunk at a time, float32 rows for a float32 model), so resident memory stays O(n): one gradient plus
    a column chunk of the rows. Gram matrices are accumulated over column chunks in float64."""

    MEMORY_CHUNK_BYTES = 2 ** 21  # in memory: small float64 chunks (reused heap blocks, no page faults)
    MEMORY_BYTES = 2 ** 30  # rows beyond this (or beyond the basis share of available memory) go to the file

    def __init__(self, M: int, n: int, dtype: torch.dtype, device, in_memory: bool | None = None,
                 zeroed: bool = True):
        from .basis import Basis
        from .precision import BASIS_SHARE, available_bytes

        self.M, self.n = int(M), int(n)
        self.row_dtype = torch.float32 if dtype == torch.float32 else torch.float64
        fits = float(self.row_dtype.itemsize) * M * n <= min(BASIS_SHARE * available_bytes(), self.MEMORY_BYTES)
        self.in_memory = fits if in_memory is None else in_memory
        self.file = None
        if self.in_memory:  # `zeroed=False`: every row will be written whole
            self.X = (torch.zeros if zeroed else torch.empty)(M, n, dtype=self.row_dtype, device=device)
        else:
            self.file = Basis(n, self.row_dtype, M, disk=True)

    def set(self, i: int, row: torch.Tensor) -> None:
        if self.in_memory:
            self.X[i] = row
        else:
            self.file.write(i, 0, row)

    def set_parts(self, i: int, parts) -> None:
        """Row i from per-parameter tensors in order (None: zeros), each copied straight into its slice."""
        a = 0
        for g, size in parts:
            if self.in_memory:
                dst = self.X[i, a:a + size]
                dst.zero_() if g is None else dst.copy_(g.reshape(-1))
            else:
                self.file.write(i, a, torch.zeros(size) if g is None else g)
            a += size

    def allreduce_in_memory(self) -> None:
        from . import distributed as dist
        self.X = dist.allreduce(self.X)

    def gram(self, sl: slice | None = None) -> np.ndarray:
        """X[:, sl] X[:, sl]^T (float64, M x M)."""
        a, b = (0, self.n) if sl is None else (sl.start, sl.stop)
        if not self.in_memory:
            return self.file.gram(a, b)
        if self.row_dtype == torch.float64:
            Xs = self.X if sl is None else self.X[:, sl]
            return (Xs @ Xs.T).cpu().numpy()
        step = max(1, int(self.MEMORY_CHUNK_BYTES // (8 * max(self.M, 1))))
        G = np.zeros((self.M, self.M))
        for c in range(a, b, step):  # float32 rows: each column chunk in float64
            blk = self.X[:, c:min(b, c + step)].to(torch.float64)
            G += (blk @ blk.T).cpu().numpy()
        return G

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def gradient_similarity(obj: Objective, *, domains=None, params: str | None = None, seed: int = 0,
                        progress: Progress | None = None, resamples: int = 200, per_layer: bool = True,
                        train_mode: bool = False, precision: str = "auto",
                        in_memory: bool | None = None, split_half: bool = True) -> GradSimResult:
    """Cosine matrix of full-parameter domain gradients at the current weights, with split-half noise floor.

    Each domain's gradient is its loss gradient over its fixed batches, weighted as `obj.terms` defines
    (one forward and backward per batch, per-batch gradients kept in float64). `domains` defaults to every
    domain (trained, then OOD); the summaries (`conflict_rate`, `mean_offdiag_cosine`) use the pairs of
    trained domains among them (all pairs if fewer than two are trained). `split_half[d]` is the cosine
    between the gradients of two halves of d's batches (even vs odd batches; a single batch is first cut
    into up to CHUNKS contiguous chunks of examples, one extra pass): a same-domain noise floor for
    half-size estimates. `cosine_stderr` is the standard deviation over `resamples` bootstrap resamplings
    (with replacement, seeded by `seed`) of each domain's batches (or chunks); null where a domain has one
    unresamplable batch. Eval mode unless train_mode=True (then each batch draws its dropout masks from
    objective.batch_seed(seed, its batch's key), as every analyzer; each chunk of a single batch draws its own); the caller's
    parameters, .grad fields, buffers and mode flags are unchanged. `domains`: see Objective.resolve_domains
    ('train' = the trained domains); `params`: a regex restricting the parameters (Objective.select).
    Under torchrun each rank differentiates its share of the batch rows and the rows are all-reduced, so
    every rank holds the one-process result (bootstraps included; exact in eval mode).

    `precision` (landscape.precision): 'auto' differentiates a copy in float64 up to 100k parameters on the CPU
    (also 100k on an accelerator) and the model itself (its own float32 weights) beyond; 'float64'/'float32' force
    one. `cosine_precision_error` bounds what rounding can move a cosine by (twice the measured relative
    rounding of a gradient, probed on an eighth of the first batch: one forward, two backwards of that size).
    Memory: the rows are held in memory when they fit, else in a temporary file (`in_memory` forces either),
    written straight from each backward's per-parameter gradients and streamed in column chunks into the Gram
    matrices, so memory is O(n) rather than O(rows x n); rows are float32 for a float32 model (Gram sums in
    float64). `split_half=False` skips the floors (and a single batch's chunks, so no bootstrap there): one
    backward per batch, the cost of a plain loop of autograd calls.
    """
    t0 = time.perf_counter()
    obj = obj.select(params)
    names = obj.resolve_domains(domains, default="each", train="expand")
    if int(resamples) < 0:
        raise UserError(f"resamples must be >= 0, got {resamples}")
    if int(resamples) == 1:
        raise UserError("resamples must be 0 (no error bars) or at least 2 (one bootstrap resample has no spread), "
                        "got 1")
    resamples = int(resamples)
    seed = check_seed(seed, "seed")
    weights_ = obj.params()
    if not weights_:
        raise UserError("the model has no trainable parameters")
    from . import distributed as dist

    rank, world = (dist.rank(), torch.distributed.get_world_size()) if dist.active() else (0, 1)
    if world > 1:  # every rank checks every batch before the collectives (one process checks each as it goes)
        obj.validate(names, train_mode=train_mode)
    from . import precision as prec
    requested = prec.check_precision(precision)
    n_par = sum(p.numel() for p in weights_.values())
    want = prec.resolve(requested, n_par, obj.device)
    if obj.dtype != want:
        obj = obj.to(dtype=want)  # a float64 copy where that is cheap (or float32 where asked)
        weights_ = obj.params()

    # Plan: rows of X are per-batch (or per-half) gradients; each domain is a weighted sum of rows.
    plan = {}  # domain -> dict(full=[(row, coef)], units=[(row, coef)], halves=([...], [...]) | None, reason)
    jobs: list[tuple[str, int, object, int | None]] = []  # (domain, batch key, batch, chunk), in row order

    where: list[str] = []  # per job, for errors: "domain 'd', batch i" (chunk j)

    def add(d, key, batch, chunk=None, index=0):
        jobs.append((d, key, batch, chunk))
        where.append(f"domain '{d}', batch {index}" + ("" if chunk is None else f" (chunk {chunk})"))
        return len(jobs) - 1

    for d in names:
        terms = obj.keyed_terms(d)
        full = [(add(d, k, b, index=i), c) for i, (k, c, b) in enumerate(terms)]
        entry = {"full": full, "units": full, "halves": None, "reason": None}
        if not split_half:
            entry["reason"] = "not asked for (split_half=False)"
        elif len(terms) >= 2:
            entry["halves"] = (full[0::2], full[1::2])
            entry["reason"] = f"{len(terms)} batches split even/odd"
        else:
            chunks = _split_examples(terms[0][2])
            if isinstance(chunks, str):
                entry["reason"] = chunks
            else:
                n = sum(k for _, k in chunks)
                units = [(add(d, terms[0][0], c, j), k / n) for j, (c, k) in enumerate(chunks)]
                entry["units"], entry["halves"] = units, (units[0::2], units[1::2])
                entry["reason"] = (f"one batch of {n} examples cut into {len(units)} chunks of examples, "
                                   "split even/odd")
        plan[d] = entry

    rows = _Rows(len(jobs), n_par, obj.dtype, obj.device, in_memory=in_memory, zeroed=world > 1)
    losses = torch.zeros(len(jobs), dtype=torch.float64, device=obj.device)
    rng = seed if train_mode else None
    try:
        with obj.preserved(train_mode, seed):
            for i, (d, key, b, chunk) in enumerate(jobs):
                # a chunk of a single batch draws its own masks (shared masks would inflate the split-half floor)
                s = rng if rng is None or chunk is None else mix_seed(rng, key, chunk + 1) % 2 ** 40
                if world == 1:  # checked as it goes, written straight into its row (no flat copy)
                    with batch_rng(s, key, obj.device):
                        losses[i] = _row_gradient(obj, b, weights_, rows, i, where[i])
                else:  # under torchrun each rank differentiates rows i = rank mod world; the sum is every row
                    row = None
                    if i % world == rank:
                        with batch_rng(s, key, obj.device):
                            row, losses[i] = batch_gradient(obj, b, weights_)
                    if not rows.in_memory:  # streamed rows: each is summed over ranks as it comes
                        row = dist.allreduce(row if row is not None else torch.zeros(n_par, dtype=torch.float64,
                                                                                     device=obj.device))
                    if row is not None:
                        rows.set(i, row)
                    del row
                if progress:
                    progress(i + 1, len(jobs), f"gradients {d}")
            if obj.dtype != torch.float64:  # its two evaluations are also eval mode's determinism check
                noise = prec.gradient_noise(obj, jobs[0][2], weights_, check=None if train_mode else where[0])
            else:
                noise = 8 * prec.eps(torch.float64)
                if world == 1 and not train_mode:  # eval mode promises one function of the weights
                    obj.check_deterministic(jobs[0][2], float(losses[0]), where[0])
        if world > 1:
            if rows.in_memory:
                rows.allreduce_in_memory()
            losses = dist.allreduce(losses)
        result = _from_rows(rows, losses, jobs, plan, names, obj, weights_, seed, resamples, per_layer,
                            train_mode, params, t0, where)
    finally:
        rows.close()
    result.settings.update(precision=requested, in_memory=bool(rows.in_memory))
    result.cosine_precision_error = float(2.0 * noise)
    return result


def _row_gradient(obj: Objective, batch, params: dict, rows: "_Rows", i: int, where: str) -> float:
    """Row i of `rows` = the batch's loss gradient (checked as Objective.validate checks it); returns the loss."""
    loss = obj.checked_loss(batch, where)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    obj.check_gradients(grads, where, finite=False)  # finiteness: from the Gram diagonal (_from_rows)
    rows.set_parts(i, [(g, p.numel()) for g, p in zip(grads, params.values())])
    return float(loss.detach())


def _from_rows(rows: "_Rows", losses, jobs, plan, names, obj, weights_, seed, resamples, per_layer, train_mode,
               params, t0, where=None) -> GradSimResult:
    """The cosines, floors, bootstraps and per-layer matrices from the gradient rows' Gram matrices."""
    batch_loss = {i: float(v) for i, v in enumerate(losses.tolist())}
    M = rows.M
    slices = layer_slices(weights_)
    layer_grams = {name: rows.gram(sl) for name, sl in slices.items()} if per_layer else {}
    G = rows.gram() if rows.in_memory or not per_layer else sum(layer_grams.values())
    bad = [i for i in range(M) if not np.isfinite(G[i, i])]  # a non-finite entry makes its squared norm so
    if bad:
        raise Objective.not_finite(where[bad[0]] if where else f"row {bad[0]}")

    def weights(pairs) -> np.ndarray:
        w = np.zeros(M)
        tot = sum(c for _, c in pairs)
        for r, c in pairs:
            w[r] += c / tot
        return w

    K = len(names)
    W = np.stack([weights(plan[d]["full"]) for d in names])
    cos, nrm = _cosines(W, G)
    np.fill_diagonal(cos, [1.0 if n > 0 else np.nan for n in nrm])

    trained = [i for i, d in enumerate(names) if d in obj.train_domains]
    summary_idx = trained if len(trained) >= 2 else list(range(K))
    mean_off, conflict = _pair_summary(cos, summary_idx)

    split_half, split_reason = {}, {}
    for d in names:
        e = plan[d]
        split_reason[d] = e["reason"]
        if e["halves"] is None:
            split_half[d] = None
        else:
            c2, _ = _cosines(np.stack([weights(e["halves"][0]), weights(e["halves"][1])]), G)
            split_half[d] = num(c2[0, 1])

    stderr, mean_se, conflict_se = None, None, None
    if resamples > 0:
        gen = np.random.default_rng(seed % 2 ** 64)  # numpy wants a non-negative seed; same for seed >= 0
        units = [plan[d]["units"] for d in names]
        ok = np.array([len(u) >= 2 for u in units])
        draws = np.empty((resamples, K, K))
        means, conflicts = np.empty(resamples), np.empty(resamples)
        for r in range(resamples):
            Wr = np.zeros((K, M))
            for k, u in enumerate(units):
                pick = gen.integers(0, len(u), size=len(u)) if len(u) >= 2 else np.zeros(1, dtype=int)
                Wr[k] = weights([u[i] for i in pick])
            draws[r], _ = _cosines(Wr, G)
            means[r], conflicts[r] = _pair_summary(draws[r], summary_idx)
        se = draws.std(axis=0, ddof=1) if resamples > 1 else np.full((K, K), np.nan)
        se[~(ok[:, None] & ok[None, :])] = np.nan
        np.fill_diagonal(se, 0.0)
        stderr = _matrix(se)
        if resamples > 1 and ok[summary_idx].all():
            mean_se, conflict_se = num(means.std(ddof=1)), num(conflicts.std(ddof=1))

    layers, layer_norms = None, None
    if per_layer:
        layers, layer_norms = {}, {}
        for name in slices:
            lc, ln = _cosines(W, layer_grams[name])
            np.fill_diagonal(lc, [1.0 if n > 0 else np.nan for n in ln])
            layers[name] = _matrix(lc)
            layer_norms[name] = {d: float(ln[k]) for k, d in enumerate(names)}

    loss = {d: float(sum(c * batch_loss[r] for r, c in plan[d]["full"])) for d in names}
    if set(obj.train_domains) <= set(names):
        loss["train"] = float(sum(obj.weights[d] * loss[d] for d in obj.train_domains))

    return GradSimResult(
        domains=names, ood=[d for d in names if d in obj.ood], cosine=_matrix(cos),
        norms={d: float(nrm[k]) for k, d in enumerate(names)}, loss=loss,
        per_layer=layers, per_layer_norms=layer_norms, split_half=split_half, split_half_reason=split_reason,
        cosine_stderr=stderr, summary_domains=[names[i] for i in summary_idx], conflict_rate=num(conflict),
        conflict_rate_stderr=conflict_se, mean_offdiag_cosine=num(mean_off), mean_offdiag_stderr=mean_se,
        settings={"resamples": resamples, "per_layer": bool(per_layer), "train_mode": bool(train_mode),
                  "batches": {d: len(plan[d]["full"]) for d in names},
                  "bootstrap_units": {d: len(plan[d]["units"]) for d in names},
                  "num_params": int(rows.n), "device": str(obj.device),
                  "dtype": str(obj.dtype).replace("torch.", ""), "params": params},
        seed=int(seed), seconds=time.perf_counter() - t0)
