"""Gradient similarity over training: the domain cosine matrix and its noise floor on fixed batches, every N steps.

`GradSimTracker` is called after `opt.step()` in any training loop; every `every` optimizer steps it runs
`gradient_similarity` on an Objective built once from fixed batches around the live model and returns a flat,
JSON-ready row (kept in `tracker.rows`). With Nexus it measures only at outer-step boundaries, where the model
holds the outer (anchor) weights; mid-walk calls are skipped. The model, its .grad, buffers, mode flags and
the RNG are left as they were (gradient_similarity's guarantee).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Callable, Optional

import torch

from nexus_opt.errors import UserError
from nexus_opt.util import move_batch
from nexus_opt.util import check_seed

from .gradsim import GradSimResult, gradient_similarity
from .objective import Objective

# Measured on the default `landscape train` (text suite, tiny GPT, K = 4, CPU, Nexus): one measurement over the
# suite's fixed evaluation batches (4 domains x 4 batches x 16 sequences of 64 bytes) costs the CPU time of
# 2.5 optimizer steps (eval and checkpoints included in a step's share), so every 100 steps adds about 2.5%.
DEFAULT_EVERY = 100
DEFAULT_RESAMPLES = 50  # bootstrap resamples for the standard errors: Gram-matrix algebra only, no extra passes


def pair_key(a: str, b: str) -> str:
    """The name of a domain pair in a row ('a|b', in the tracker's domain order)."""
    return f"{a}|{b}"


def row_from_result(step: int, r: GradSimResult, seconds: float | None = None) -> dict:
    """A flat metrics row from a GradSimResult: mean cross-domain cosine, per-pair cosines, floors, stderrs."""
    pairs, pair_se = {}, {}
    for i, a in enumerate(r.domains):
        for j in range(i + 1, len(r.domains)):
            b = r.domains[j]
            pairs[pair_key(a, b)] = r.cosine[i][j]
            pair_se[pair_key(a, b)] = r.cosine_stderr[i][j] if r.cosine_stderr else None
    row = {"kind": "gradsim", "step": int(step), "mean_cosine": r.mean_offdiag_cosine,
           "mean_cosine_stderr": r.mean_offdiag_stderr, "conflict_rate": r.conflict_rate,
           "pairs": pairs, "pair_stderr": pair_se, "split_half": dict(r.split_half), "norms": dict(r.norms),
           "loss": dict(r.loss), "domains": list(r.domains), "summary_domains": list(r.summary_domains),
           "seed": r.seed}
    if seconds is not None:
        row["seconds"] = float(seconds)
    return row


class GradSimTracker:
    """Measure the domain gradient cosine matrix every `every` optimizer steps of a training loop.

    Usage: ``tracker = GradSimTracker(objective, every=50)``, then after each ``opt.step()``:
    ``tracker(step, model, opt)`` (returns the new row, or None when nothing was measured). `objective`
    supplies the fixed batches, the loss and the domain roles; its model is replaced by the `model` passed
    at call time when they differ (batches are moved to that model's device once). `step` counts optimizer
    (outer) steps; when None it is read from a Nexus optimizer (micro_step // inner_steps) or counted here.
    `domains`, `seed`, `resamples` and `train_mode` are passed to `gradient_similarity` (per_layer off).
    """

    def __init__(self, objective: Objective, *, every: int = DEFAULT_EVERY, seed: int = 0, domains=None,
                 resamples: int = DEFAULT_RESAMPLES, train_mode: bool = False):
        if not isinstance(objective, Objective):
            raise UserError(f"GradSimTracker needs an Objective, got {type(objective).__name__}")
        try:
            every = int(every)
        except (TypeError, ValueError):
            raise UserError(f"every must be a positive integer, got {every!r}") from None
        if every < 1:
            raise UserError(f"every must be at least 1 (measure every N optimizer steps), got {every}")
        self.objective = objective
        self.every = every
        self.seed = check_seed(seed, "seed")
        self.domains = domains
        self.resamples = int(resamples)
        self.train_mode = bool(train_mode)
        self.rows: list[dict] = []
        self.seconds = 0.0  # total (wall-clock) time spent measuring
        self.cpu_seconds = 0.0  # total process CPU time spent measuring
        self.skipped_mid_walk = 0  # calls made while a Nexus inner walk was under way
        self._calls = 0
        self._done: set[int] = set()
        # Validate domains and settings now, not at the first due step.
        objective.resolve_domains(domains, default="each", train="expand")
        if self.resamples < 0 or self.resamples == 1:
            raise UserError(f"resamples must be 0 or at least 2, got {self.resamples}")

    @classmethod
    def from_suite(cls, suite, **kw) -> "GradSimTracker":
        """A tracker over a suite's fixed evaluation batches (the batches `landscape gradsim` uses on a
        checkpoint), OOD domains marked; the model is bound at the first call."""
        placeholder = torch.nn.Identity()  # replaced by the training model at the first call (no RNG draw)
        obj = Objective(placeholder, {d: suite.eval_batches(d) for d in suite.domains}, suite.loss_fn,
                        train_domains=suite.train_domains, weights=suite.weights, ood=suite.ood_domains,
                        meta={"suite": suite.spec()})
        return cls(obj, **kw)

    @classmethod
    def from_suite_spec(cls, spec: Mapping, **kw) -> "GradSimTracker":
        """`from_suite` for the suite that `make_suite(**spec)` rebuilds (a checkpoint manifest's 'suite')."""
        from nexus_opt.suites import make_suite

        return cls.from_suite(make_suite(**{k: spec[k] for k in ("name", "seed", "weights", "options") if k in spec}),
                              **kw)

    # -- binding ------------------------------------------------------------------------------------------
    def _bind(self, model: torch.nn.Module | None) -> Objective:
        """The objective around `model` (built once per model; batches moved to its device and dtype)."""
        obj = self.objective
        if model is None or model is obj.model:
            return obj
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"GradSimTracker: model must be a torch.nn.Module, got {type(model).__name__}")
        p = next((q for q in model.parameters() if q.requires_grad), None)
        dev = p.device if p is not None else torch.device("cpu")
        doms = {d: [move_batch(b, dev) for b in bs] for d, bs in obj.domains.items()}
        self.objective = Objective(model, doms, obj.loss_fn, train_domains=obj.train_domains, weights=obj.weights,
                                   ood=obj.ood, meta=obj.meta)
        return self.objective

    # -- stepping -----------------------------------------------------------------------------------------
    @staticmethod
    def mid_walk(optimizer) -> bool:
        """True when `optimizer` is a Nexus-like optimizer in the middle of an inner walk (model not at the anchor)."""
        return optimizer is not None and not getattr(optimizer, "at_outer_boundary", True)

    def _outer_step(self, step: int | None, optimizer) -> int:
        if step is not None:
            return int(step)
        if optimizer is not None and hasattr(optimizer, "micro_step") and hasattr(optimizer, "inner_steps"):
            return int(optimizer.micro_step) // int(optimizer.inner_steps)
        return self._calls

    def due(self, step: int) -> bool:
        """Whether `step` is a measuring step (a multiple of `every`, not measured yet)."""
        return step % self.every == 0 and step not in self._done

    def __call__(self, step: int | None = None, model: torch.nn.Module | None = None, optimizer=None) -> Optional[dict]:
        """Call after `optimizer.step()`: measures when the (outer) step is due; None otherwise or mid-walk."""
        if self.mid_walk(optimizer):
            self.skipped_mid_walk += 1
            return None
        self._calls += 1
        step = self._outer_step(step, optimizer)
        if not self.due(step):
            return None
        return self.measure(step, model)

    step = __call__

    def measure(self, step: int, model: torch.nn.Module | None = None) -> dict:
        """Measure now (whatever the step) and record the row; the model is assumed to hold the weights to measure."""
        obj = self._bind(model)
        t0, c0 = time.perf_counter(), time.process_time()
        r = gradient_similarity(obj, seed=self.seed, domains=self.domains, resamples=self.resamples,
                                per_layer=False, train_mode=self.train_mode)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.cpu_seconds += time.process_time() - c0
        row = row_from_result(step, r, dt)
        self.rows.append(row)
        self._done.add(int(step))
        return row

    def hook(self) -> Callable[[int, torch.nn.Module, object], Optional[dict]]:
        """The tracker as the trainer's `on_step_record(step, model, optimizer)` hook (rows go to metrics.jsonl)."""
        return lambda step, model, optimizer: self(step, model, optimizer)


def tracker_hook(every: int, out: str, cfg=None, **kw) -> Optional[GradSimTracker]:
    """The trainer's `on_step_record` for `landscape train --gradsim-every N` (None when N is 0): a tracker over
    the run's suite (from `cfg`, a TrainConfig, or for a resumed run from the checkpoint manifest in `out`)."""
    if int(every) < 0:
        raise UserError(f"--gradsim-every must be 0 (off) or a positive number of steps, got {every}")
    if int(every) == 0:
        return None
    if cfg is not None:
        spec = {"name": cfg.suite, "seed": cfg.seed, "weights": cfg.weights, "options": cfg.suite_options}
    else:
        from nexus_opt import checkpoint as ck

        spec = ck.read_checkpoint(out).manifest.get("suite")
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise UserError(f"the checkpoint in {out} names no suite; --gradsim-every cannot rebuild its batches")
    return GradSimTracker.from_suite_spec(spec, every=int(every), **kw)
