"""Nexus: normalized-SGD inner walks on single-domain micro-batches, an outer optimizer on the displacement.

Every ``step()`` normalises the current gradient in place (``.grad <- g / ||g||``, global L2 norm) and takes an
inner step ``theta_in -= gamma * .grad`` on the model's live weights; every ``inner_steps``-th call also runs the
outer step: the pseudo-gradient ``anchor - theta_in`` goes into ``.grad``, the weights return to the anchor, the
outer optimizer steps and the anchor becomes the new weights. ``mode="parallel"`` is the first-order control
("Nexus without the walk"): the weights stay at the anchor and the pseudo-gradient is ``gamma * sum_k g_k/||g_k||``.
Only torch and the standard library are used.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
from collections import ChainMap, OrderedDict
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.optim import Optimizer

__all__ = ["Nexus"]

_HAS_FOREACH = all(hasattr(torch, f"_foreach_{n}")
                   for n in ("norm", "mul_", "add_", "copy_", "sub_", "neg_", "div_", "zero_"))
MODES = ("sequential", "parallel")
SYNCS = ("global", "outer", "none")
LOW_PRECISION = (torch.bfloat16, torch.float16)
NONFINITE = ("skip", "raise")
# Per-parameter outer states that always have the parameter's shape (Adam(W), NAdam, RAdam, Adamax, SGD, Muon,
# RMSprop, Adadelta): checked before a load changes anything. Other states (Adafactor's factors) are left to torch.
_FULL_SHAPE_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                      "grad_avg", "exp_inf")


def _by_device(tensors: Sequence[torch.Tensor], *more: Sequence[torch.Tensor]) -> dict:
    """Split parallel tensor lists by (device, dtype) of the first list: foreach kernels need uniform lists."""
    dev, dt = tensors[0].device, tensors[0].dtype
    if all(t.device == dev and t.dtype == dt for t in tensors):  # the usual case, without regrouping
        return {(dev, dt): (tensors, *more)}
    out: dict = {}
    for i, t in enumerate(tensors):
        lists = out.setdefault((t.device, t.dtype), tuple([] for _ in range(1 + len(more))))
        lists[0].append(t)
        for k, m in enumerate(more):
            lists[k + 1].append(m[i])
    return out


def _is_dtensor(t: Any) -> bool:
    """t is a torch.distributed.tensor.DTensor (FSDP2 parameters and gradients); no import unless one exists."""
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def _same_spec(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two DTensors laid out alike (mesh, placements, global shape): their local shards pair element by element."""
    return (_is_dtensor(a) and _is_dtensor(b) and a.device_mesh == b.device_mesh and a.placements == b.placements
            and a.shape == b.shape)


def _local(*lists: Sequence[torch.Tensor]) -> Optional[tuple]:
    """The local shards of parallel lists of tensors, for elementwise kernels: plain tensors pass through; DTensors
    become their local shards when every partner has the same layout (exact, since an elementwise op on a DTensor is
    the op on its shards). None when some DTensor has no same-layout partner (then DTensor dispatch decides)."""
    first = lists[0]
    if not any(_is_dtensor(t) for lst in lists for t in lst):
        return lists
    out = [[] for _ in lists]
    for i, t0 in enumerate(first):
        row = [lst[i] for lst in lists]
        if _is_dtensor(t0):
            if not all(_same_spec(t0, t) for t in row[1:]):
                return None
            for k, t in enumerate(row):
                out[k].append(t.to_local())
        elif any(_is_dtensor(t) for t in row[1:]):
            return None
        else:
            for k, t in enumerate(row):
                out[k].append(t)
    return tuple(out)


def _refuse_compiled_step() -> None:
    """Raise, from the compiled frame at run time, that Nexus.step cannot be compiled. The raise sits in a function
    Dynamo must not trace (a plain raise while tracing falls back to eager silently); it is marked so lazily, since
    torch.compiler.disable imports Dynamo and only a compiling process has it loaded already."""
    _refuser()()


def _refuser() -> Callable[[], None]:
    global _REFUSER
    if _REFUSER is None:
        def refuse() -> None:
            raise RuntimeError("torch.compile(opt.step) is not supported by Nexus: its step keeps host-side counters "
                               "and branches on the gradient norm; compile the model (torch.compile(model)) and call "
                               "opt.step() eagerly")
        _REFUSER = torch.compiler.disable(refuse)
    return _REFUSER


_REFUSER: Optional[Callable[[], None]] = None


def _needs_closure(o: Optimizer) -> bool:
    """o.step() cannot run without a closure (torch.optim.LBFGS): its `closure` argument has no default."""
    import inspect

    try:
        param = inspect.signature(o.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _world_size(group: Any = None) -> int:
    """Processes in `group` (the default group when None), 1 without an initialized process group."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_inner_lr(v: Any, where: str) -> None:
    """gamma must be a finite number > 0: a zero walk is no optimizer, an infinite one writes inf into weights."""
    if not (_is_real(v) and math.isfinite(v) and v > 0):
        raise ValueError(f"{where}inner_lr must be a finite number > 0, got {v!r}")


class Nexus(Optimizer):
    """Wrap an outer optimizer (or a list of them) so that it steps on Nexus pseudo-gradients.

    Args:
        outer: the outer optimizer, e.g. ``AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-10)``,
            or a list/tuple of them (e.g. Muon for 2-D weights + AdamW for the rest).
        inner_lr: gamma > 0, the length of each normalized inner step (default for groups without "inner_lr").
        inner_steps: K, micro-batches (inner steps) per outer step.
        mode: "sequential" (the paper: walk K steps, gradients at the inner weights) or "parallel" (the control:
            every gradient taken at the anchor, pseudo-gradient gamma * sum of the K normalised gradients).
        pseudo_grad_scale: "raw" (paper: anchor - inner weights) or "inner_lr" (divided by the group's gamma,
            the mean of the gammas actually used over the walk).
        inner_lr_follows_schedule: scale gamma by group["lr"] / group["base_lr"] (the lr at construction).
        nonfinite: what a micro-batch with a NaN/Inf gradient does: "skip" (no inner step, counted in
            ``nonfinite_skips``, no host sync) or "raise" (FloatingPointError before anything changes; reads the
            norm on the host, a device sync on accelerators).
        offload_anchor: keep the anchor (parallel: the displacement) on the CPU (pinned for CUDA parameters).
        foreach: use torch._foreach_* kernels (None: when available).
        sync: "global" (every rank sees the same gradients: DDP without no_sync, FSDP, one process; on several
            ranks one 2-number all-reduce per outer step checks it), "outer" (the local walk: each rank walks its
            own micro-batches under no_sync and the pseudo-gradient is averaged in one all-reduce per outer step)
            or "none" (no collectives from Nexus: independent processes).
        sync_group: the process group of sync (None: the default group).
        master_weights: walk bf16/fp16 weights in a float32 copy (None or True; the anchor keeps the weights'
            dtype, which holds the outer weights exactly; parallel mode: a float32 displacement). False walks in the
            weights' dtype and warns once with the fraction of elements an inner step left unmoved.
        shard_group: the process group over which FSDP1 (FullyShardedDataParallel) shards the parameters: the
            squared gradient norm is all-reduced over it, so every rank normalises by the full-gradient norm.
            Required (and refused otherwise) for FSDP1 parameters on more than one rank; not needed for FSDP2.
    """

    def __init__(self, outer: Union[Optimizer, Sequence[Optimizer]], *, inner_lr: float = 0.01, inner_steps: int = 4,
                 mode: str = "sequential", pseudo_grad_scale: str = "raw", inner_lr_follows_schedule: bool = False,
                 nonfinite: str = "skip", offload_anchor: bool = False, foreach: Optional[bool] = None,
                 shard_group: Any = None, sync: str = "global", sync_group: Any = None,
                 master_weights: Optional[bool] = None):
        outers = list(outer) if isinstance(outer, (list, tuple)) else [outer]
        if not outers or not all(isinstance(o, Optimizer) for o in outers):
            raise TypeError("Nexus wraps a torch.optim.Optimizer or a non-empty list of them")
        if any(isinstance(o, Nexus) for o in outers):
            raise TypeError("Nexus cannot wrap another Nexus")
        for o in outers:
            if _needs_closure(o):
                raise TypeError(f"Nexus cannot wrap {type(o).__name__}: its step() needs a closure that re-evaluates "
                                "the loss, and the outer step only has the pseudo-gradient; use a first-order outer "
                                "optimizer (AdamW, SGD, ...)")
        if not _is_int(inner_steps) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        _check_inner_lr(inner_lr, "")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if pseudo_grad_scale not in ("raw", "inner_lr"):
            raise ValueError(f"pseudo_grad_scale must be 'raw' or 'inner_lr', got {pseudo_grad_scale!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE)}, got {nonfinite!r}")
        if sync not in SYNCS:
            raise ValueError(f"sync must be one of {list(SYNCS)}, got {sync!r}")
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got {master_weights!r}")
        if sync == "outer" and shard_group is not None:
            raise ValueError("sync='outer' walks each rank's own full copy of the weights; it does not combine with "
                             "shard_group (FSDP1): use DDP with sync='outer', or sync='global'")
        seen: set = set()
        for o in outers:
            for g in o.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter appears in more than one outer optimizer")
                    seen.add(id(p))
        self._outers = outers
        # The outer's defaults (lr, betas/momentum, ...) so that every torch scheduler accepts Nexus, plus ours.
        self.defaults = {k: v for o in reversed(outers) for k, v in o.defaults.items()}
        self.defaults.update(inner_lr=inner_lr, inner_steps=inner_steps, mode=mode, pseudo_grad_scale=pseudo_grad_scale,
                             inner_lr_follows_schedule=inner_lr_follows_schedule, nonfinite=nonfinite,
                             offload_anchor=offload_anchor)
        self.inner_steps = int(inner_steps)
        self.mode = mode
        self.pseudo_grad_scale = pseudo_grad_scale
        self.inner_lr_follows_schedule = inner_lr_follows_schedule
        self.nonfinite = nonfinite
        self.offload_anchor = offload_anchor
        self.foreach = _HAS_FOREACH if foreach is None else (foreach and _HAS_FOREACH)
        # What torch.optim.Optimizer.__init__ would set up (hooks, profiler step wrapper); its groups live in `outer`.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self._buf: list[list[torch.Tensor]] = []  # sequential: the anchor; parallel: the summed displacement
        self._touched: list[list[bool]] = []  # parameters that had a .grad at some step() of this walk
        self._gamma_mean: list[float] = []  # mean gamma of the steps of this walk, per group
        self._skips = 0  # non-finite micro-batches skipped (host count) ...
        self._skips_pending: Optional[torch.Tensor] = None  # ... plus a device count not yet read (no host sync)
        self._micro_step = 0  # inner steps taken in total
        self._phase = 0  # inner steps taken since the last outer step (0 = just after an outer step)
        self._swapped = False
        self._shard_group = shard_group
        self.sync = sync
        self.sync_group = sync_group
        self.master_weights = master_weights is not False
        self._master: list[list[Optional[torch.Tensor]]] = []  # float32 walks of low-precision weights (sequential)
        self._warned_low_precision = False
        self._collectives = 0  # collectives Nexus itself issued (norm all-reduces, displacement averages)
        self._dtensors = False  # some parameter is a DTensor (FSDP2): elementwise kernels run on local shards
        self._sync_groups()
        self._warn_eps()

    # -- the torch.optim.Optimizer surface, passed through to the outer optimizer(s) ------------------------
    @property
    def param_groups(self) -> list:
        """The outer optimizer's own list (a scheduler on either object drives the real lr, also after loading)."""
        if len(self._outers) == 1:
            return self._outers[0].param_groups
        return [g for o in self._outers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        if len(self._outers) != 1:
            raise AttributeError("param_groups of a Nexus over several outer optimizers is read-only")
        self._outers[0].param_groups = value

    @property
    def state(self):
        """The outer optimizer's per-parameter state (a read-through ChainMap over several outers)."""
        if len(self._outers) == 1:
            return self._outers[0].state
        return ChainMap(*(o.state for o in self._outers))

    @state.setter
    def state(self, value) -> None:
        if len(self._outers) != 1:
            raise AttributeError("state of a Nexus over several outer optimizers is read-only")
        self._outers[0].state = value

    @property
    def outer(self) -> Union[Optimizer, list]:
        """The wrapped outer optimizer (the list when several were given)."""
        return self._outers[0] if len(self._outers) == 1 else list(self._outers)

    @property
    def micro_step(self) -> int:
        """Inner steps (step() calls) taken so far."""
        return self._micro_step

    @property
    def at_outer_boundary(self) -> bool:
        """True right after an outer step (micro_step % inner_steps == 0): the model holds the outer weights."""
        return self._phase == 0

    @property
    def nonfinite_skips(self) -> int:
        """Micro-batches whose gradient was non-finite and whose inner step was skipped (reading it may sync)."""
        pending = 0 if self._skips_pending is None else int(self._skips_pending)
        return self._skips + pending

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        outers = ", ".join(type(o).__name__ for o in self._outers)
        return (f"Nexus({outers}, inner_lr={self.defaults['inner_lr']}, inner_steps={self.inner_steps}, "
                f"mode={self.mode!r}, pseudo_grad_scale={self.pseudo_grad_scale!r}, micro_step={self._micro_step})")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the (last) outer optimizer and give its parameters an anchor."""
        if "inner_lr" in param_group:
            _check_inner_lr(param_group["inner_lr"], "param group: ")
        self._outers[-1].add_param_group(param_group)
        self._sync_groups()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters (through the outer optimizer(s))."""
        for o in self._outers:
            o.zero_grad(set_to_none=set_to_none)

    # -- stepping -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One inner step on the current gradient; every inner_steps-th call also the outer step."""
        if torch.compiler.is_compiling():
            _refuse_compiled_step()
        if self._swapped:
            raise RuntimeError("Nexus.step() inside anchor_weights(): leave the context before stepping")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_groups()
        self._inner_step()
        self._micro_step += 1
        self._phase += 1
        if self._phase >= self.inner_steps:
            self._outer_step()
            self._phase = 0
        return loss

    def _inner_lr(self, group: dict) -> float:
        """gamma for this group, scaled by the lr schedule when inner_lr_follows_schedule is on."""
        lr = group["inner_lr"]
        _check_inner_lr(lr, "param group: ")
        if self.inner_lr_follows_schedule:
            lr = lr * float(group["lr"]) / group["base_lr"]
        return lr

    def _inner_step(self) -> None:
        """.grad <- g/||g|| (global norm over every parameter with a gradient), then theta -= gamma * .grad
        (parallel: displacement += gamma * .grad). A non-finite gradient leaves zeros in .grad and moves nothing."""
        work, grads, lrs = [], [], []
        for gi, group in enumerate(self.param_groups):
            lrs.append(self._inner_lr(group))
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if idx:
                ps = [group["params"][i] for i in idx]
                gs = [p.grad for p in ps]
                work.append((gi, idx, ps, gs))
                grads += gs
        if grads and any(g.is_sparse for g in grads):
            raise RuntimeError("Nexus does not support sparse gradients")
        norm = self._global_norm(grads) if grads else None
        if norm is not None and self.nonfinite == "raise" and not bool(torch.isfinite(norm)):
            raise FloatingPointError(f"non-finite gradient (norm {float(norm)}) at micro_step {self._micro_step}; "
                                     "nothing was changed (nonfinite='raise')")
        # Commit the walk's bookkeeping (after the raise: a refused step changes nothing).
        for gi, lr in enumerate(lrs):
            n = self._phase
            self._gamma_mean[gi] = lr if n == 0 else self._gamma_mean[gi] + (lr - self._gamma_mean[gi]) / (n + 1)
        for gi, idx, _, _ in work:
            flags = self._touched[gi]
            for i in idx:
                flags[i] = True
        if norm is None:
            return
        # The same arithmetic on every device: inv = 1/||g||, or 0 when the norm is zero or non-finite (nothing
        # moves). Where reading the norm costs nothing (CPU) it is read once on the host, which also spares the
        # NaN-clearing pass when the gradient is finite; on an accelerator it stays on the device (no sync).
        if self._host_read_is_free(norm):
            n = float(norm)
            finite = math.isfinite(n)
            known_ok = finite and n > 0
            inv = 1.0 / n if known_ok else 0.0
            self._skips += 0 if finite else 1
        else:
            finite_t = torch.isfinite(norm)
            inv = torch.where(finite_t & (norm > 0), norm.reciprocal(), 0.0)
            known_ok = False
            bad = (~finite_t).to(torch.int64)
            self._skips_pending = bad if self._skips_pending is None else self._skips_pending + bad
        for gi, idx, ps, gs in work:
            lr = lrs[gi]
            bufs = [self._buf[gi][i] for i in idx] if self.mode == "parallel" else None
            extra = bufs if bufs is not None else [self._master[gi][i] for i in idx]
            for (dev, dt), lists in _by_device(gs, ps, extra).items():
                gl, pl = lists[0], lists[1]
                if isinstance(inv, torch.Tensor) and inv.device != dev:
                    inv = inv.to(dev, non_blocking=True)
                self._mul(gl, inv)
                if not known_ok:  # 0 * inf = nan: clear those (no host sync; the step is skipped either way)
                    for g in gl:
                        (g.to_local() if self._dtensors and _is_dtensor(g) else g).nan_to_num_(0.0, 0.0, 0.0)
                if bufs is None and lists[2][0] is not None:  # the float32 walk, then rounded into the weights
                    self._add(lists[2], gl, -lr)
                    self._copy(pl, lists[2])
                elif bufs is None:
                    if dt in LOW_PRECISION and not self._warned_low_precision:
                        self._warn_unmoved(pl, gl, lr)
                    else:
                        self._add(pl, gl, -lr)
                else:
                    self._accumulate(lists[2], gl, lr)

    def _warn_unmoved(self, pl: list, gl: list, lr: float) -> None:
        """The inner step in bf16/fp16 weights (master_weights=False), measuring once how many of the elements it
        should move it leaves unchanged (steps below half the dtype's spacing round away); warns once."""
        before = [p.detach().clone() for p in pl]
        self._add(pl, gl, -lr)
        moving = sum(int((g != 0).sum()) for g in gl)
        stuck = sum(int(((p == b) & (g != 0)).sum()) for p, b, g in zip(pl, before, gl))
        self._warned_low_precision = True
        if moving:
            warnings.warn(f"Nexus(master_weights=False): the inner walk runs in {pl[0].dtype} weights and one inner "
                          f"step left {stuck / moving:.1%} of the elements it should move unchanged (below half the "
                          "dtype's spacing); use master_weights=True for a float32 walk", stacklevel=4)

    @staticmethod
    def _host_read_is_free(t: torch.Tensor) -> bool:
        """Reading t on the host costs no device sync (CPU tensors)."""
        return t.device.type == "cpu"

    @staticmethod
    def _offloaded(ps: list, anchors: list) -> bool:
        """Some anchor lives on another device than its parameter."""
        return any(a.device != p.device for a, p in zip(anchors, ps))

    def _global_norm(self, grads: list) -> torch.Tensor:
        """L2 norm of all gradients as one vector (float64 if any is float64, else float32), a plain tensor.
        DTensor gradients (FSDP2) are reduced by DTensor itself (one scalar all-reduce); plain gradients that are
        shards of a parameter (FSDP1: shard_group set) have their squared norm all-reduced over shard_group."""
        acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        dts = [g for g in grads if _is_dtensor(g)] if self._dtensors else []
        plain = [g for g in grads if not _is_dtensor(g)] if dts else grads
        dev = grads[0].device
        parts = []
        if plain:
            norms = []
            for (d, dt), (gl,) in _by_device(plain).items():
                ns = torch._foreach_norm(gl) if self.foreach else [torch.linalg.vector_norm(g) for g in gl]
                norms += ns if (d, dt) == (dev, acc) else [n.to(device=dev, dtype=acc) for n in ns]
            total = torch.linalg.vector_norm(torch.stack(norms))
            if self._shard_group is not None:
                import torch.distributed as dist

                sq = total.square()
                dist.all_reduce(sq, group=self._shard_group)
                self._collectives += 1
                total = sq.sqrt()
            parts.append(total)
        if dts:
            ns = torch._foreach_norm(dts) if self.foreach else [torch.linalg.vector_norm(g) for g in dts]
            t = torch.linalg.vector_norm(torch.stack([n.to(dtype=acc) for n in ns]))
            parts.append(t.full_tensor() if _is_dtensor(t) else t)
            self._collectives += 1
        return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack([x.to(dev) for x in parts]))

    # -- small in-place kernels (foreach when available; DTensors through their local shards) --------------
    def _loc(self, *lists: Sequence[torch.Tensor]) -> Optional[tuple]:
        """_local(*lists), skipped (the lists as they are) when no parameter is a DTensor."""
        return _local(*lists) if self._dtensors else lists

    def _mul(self, ts: list, s) -> None:
        loc = self._loc(ts)
        if loc is None:
            for t in ts:
                t.mul_(s)
            return
        (ts,) = loc
        if self.foreach:
            torch._foreach_mul_(ts, s)
        else:
            for t in ts:
                t.mul_(s)

    def _add(self, dst: list, src: list, alpha: float = 1.0) -> None:
        """dst[i] += alpha * src[i] (same device)."""
        loc = self._loc(dst, src)
        if loc is None or not self.foreach:
            for d, s in zip(dst, src):
                d.add_(s, alpha=alpha)
            return
        dst, src = loc
        for (dl, sl) in _by_device(dst, src).values():
            torch._foreach_add_(dl, sl, alpha=alpha)

    def _accumulate(self, bufs: list, gl: list, lr: float) -> None:
        """bufs += lr * gl, also when the displacement is offloaded (then a blocking device-to-host copy)."""
        if self._offloaded(gl, bufs):
            for b, g in zip(bufs, gl):
                b.add_(g.to(b.device), alpha=lr)
        else:
            self._add(bufs, gl, lr)

    def _copy(self, dst: list, src: list, non_blocking: bool = True) -> None:
        """dst[i] <- src[i] (non-blocking across devices: the anchor may sit in pinned CPU memory)."""
        same = all(d.device == s.device for d, s in zip(dst, src))
        loc = self._loc(dst, src) if dst else None
        if self.foreach and same and loc is not None:
            for _, (dl, sl) in _by_device(*loc).items():
                torch._foreach_copy_(dl, sl)
        else:
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=non_blocking)

    def _sub(self, dst: list, src: list) -> None:
        """dst[i] -= src[i]."""
        if not dst:
            return
        loc = self._loc(dst, src)
        if loc is None:
            for d, s in zip(dst, src):
                d.sub_(s)
            return
        for (dl, sl) in _by_device(*loc).values():
            if self.foreach:
                torch._foreach_sub_(dl, sl)
            else:
                for d, s in zip(dl, sl):
                    d.sub_(s)

    def _zero(self, ts: list) -> None:
        if not ts:
            return
        loc = self._loc(ts)
        ts = ts if loc is None else loc[0]
        for (tl,) in _by_device(ts).values():
            if self.foreach and loc is not None:
                torch._foreach_zero_(tl)
            else:
                for t in tl:
                    t.zero_()

    def _scale(self, grads: list, scales: list) -> None:
        """grads[i] /= scales[i] (per group gamma), or negate where scales are -1."""
        by_scale: dict = {}
        for g, s in zip(grads, scales):
            by_scale.setdefault(s, []).append(g)
        for s, gl in by_scale.items():
            loc = self._loc(gl)
            for (tl,) in _by_device(gl if loc is None else loc[0]).values():
                if self.foreach and loc is not None:
                    torch._foreach_div_(tl, s)
                else:
                    for t in tl:
                        t.div_(s)

    # -- the outer step -------------------------------------------------------------------------------------
    def _walk(self) -> tuple[list, list, list, list]:
        """(parameters, buffers, group indices, touched flags) of every parameter that requires grad."""
        ps, bufs, gis, touched = [], [], [], []
        for gi, (group, gbuf, gt) in enumerate(zip(self.param_groups, self._buf, self._touched)):
            for p, b, t in zip(group["params"], gbuf, gt):
                if p.requires_grad:
                    ps.append(p)
                    bufs.append(b)
                    gis.append(gi)
                    touched.append(t)
        return ps, bufs, gis, touched

    def _outer_step(self) -> None:
        """Pseudo-gradient into .grad (in place) of the parameters that had a gradient in this walk (the others
        keep .grad = None, as the outer optimizer alone would see them), outer step, buffers refreshed.
        sync="outer": every rank's pseudo-gradient (and which parameters it touched) is averaged in one all-reduce;
        sync="global" on several ranks: one 2-number all-reduce checks that the ranks walked the same walk."""
        ps, bufs, gis, touched = self._walk()
        local = self.sync == "outer" and _world_size(self.sync_group) > 1
        mine = touched
        if local:  # a parameter touched on any rank is touched: decided after the average
            touched = [True] * len(ps)
        tp = [p for p, t in zip(ps, touched) if t]
        tb = [b for b, t in zip(bufs, touched) if t]
        tg = [gi for gi, t in zip(gis, touched) if t]
        for p, t in zip(ps, touched):
            if not t:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format)
        grads = [p.grad for p in tp]
        sign = 1.0
        if self.mode == "parallel":  # .grad <- gamma * sum_k g_k/||g_k||; the weights never left the anchor
            self._copy(grads, tb, non_blocking=not self._offloaded(tp, tb))
        elif not self._offloaded(ps, bufs):
            walks = self._walk_masters(touched)
            mg = [g for g, w in zip(grads, walks) if w is not None]
            if mg:  # float32 master walk: w <- anchor - w, then .grad <- w (one rounding to the weights' dtype)
                mw = [w for w in walks if w is not None]
                mb = [b for b, w in zip(tb, walks) if w is not None]
                self._mul(mw, -1.0)
                self._add(mw, mb)
                self._copy(mg, mw)
            pg = [g for g, w in zip(grads, walks) if w is None]
            if pg:
                pb = [b for b, w in zip(tb, walks) if w is None]
                pp = [p for p, w in zip(tp, walks) if w is None]
                self._copy(pg, pb)  # grad <- anchor
                self._sub(pg, pp)  # grad <- anchor - inner
            self._copy(ps, bufs)  # weights <- anchor
        else:  # offloaded anchor: a single host-to-device transfer
            self._copy(grads, tp)  # grad <- inner
            self._copy(ps, bufs)  # weights <- anchor
            self._sub(grads, tp)  # grad <- inner - anchor
            sign = -1.0
        if local:
            flags = self._average(grads, mine)
            for p, f in zip(tp, flags):
                if not f:  # no rank had a gradient for it: the outer optimizer skips it, as it would alone
                    p.grad = None
            grads = [g for g, f in zip(grads, flags) if f]
            tg = [gi for gi, f in zip(tg, flags) if f]
        elif self.sync == "global":
            self._check_same_walk(grads)
        if self.pseudo_grad_scale == "inner_lr":  # divided by the gamma actually used (its mean over the walk)
            self._scale(grads, [sign * self._gamma_mean[gi] for gi in tg])
        elif sign < 0:
            self._scale(grads, [-1.0] * len(grads))
        for o in self._outers:
            o.step()
        if self.mode == "parallel":
            self._zero(tb)
        else:
            self._copy(bufs, ps)  # anchor <- new outer weights
            walks = self._walk_masters([True] * len(ps))
            if any(w is not None for w in walks):
                self._copy([w for w in walks if w is not None], [p for p, w in zip(ps, walks) if w is not None])
        for gt in self._touched:
            gt[:] = [False] * len(gt)

    # -- collectives of the outer step ----------------------------------------------------------------------
    def _average(self, grads: list, touched: list) -> list:
        """Average the pseudo-gradients over sync_group in one all-reduce per dtype (the touched flags ride along
        in the first); returns, per gradient, whether any rank touched that parameter."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        world = _world_size(self.sync_group)
        flags_out = list(touched)
        first = True
        for (_, dt), (gl,) in _by_device(grads).items():
            flat = _flatten_dense_tensors(gl)
            if first:
                f = torch.tensor([1.0 if t else 0.0 for t in touched], dtype=flat.dtype, device=flat.device)
                flat = torch.cat([flat, f])
            dist.all_reduce(flat, group=self.sync_group)
            self._collectives += 1
            if first:
                flags_out = [bool(x > 0) for x in flat[-len(touched):].tolist()] if touched else []
                flat = flat[:-len(touched)] if touched else flat
                first = False
            flat.div_(world)
            torch._foreach_copy_(gl, list(_unflatten_dense_tensors(flat, gl)))
        return flags_out

    def _check_same_walk(self, grads: list) -> None:
        """With sync="global" every rank must have walked the same walk (the gradients all-reduced at every
        micro-batch): compare the squared pseudo-gradient norm across ranks (one all-reduce of 2 numbers; parameters
        that are shards, DTensor or FSDP1, are left out). Drift (DDP's no_sync) raises instead of going on."""
        if self._shard_group is not None or _world_size(self.sync_group) < 2:
            return
        plain = [g for g in grads if not _is_dtensor(g)]
        if not plain:
            return
        import torch.distributed as dist

        sq = self._global_norm(plain).square()
        t = torch.stack([sq, -sq]).to(torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.sync_group)
        self._collectives += 1
        hi, lo = float(t[0]), -float(t[1])
        if not hi - lo <= 1e-6 * max(abs(hi), 1e-30):
            raise RuntimeError(f"Nexus(sync='global'): the ranks walked different inner walks (squared displacement "
                               f"{lo:.6g} to {hi:.6g} across ranks), so their gradients were not all-reduced at every "
                               "micro-batch (DDP no_sync?); drop no_sync, or use Nexus(..., sync='outer') for one "
                               "all-reduce per outer step")

    # -- anchor bookkeeping ---------------------------------------------------------------------------------
    def _uses_master(self, p: torch.Tensor) -> bool:
        """p is bf16/fp16 and master_weights is on: its walk (sequential) or displacement (parallel) is float32."""
        return self.master_weights and p.dtype in LOW_PRECISION

    def _new_master(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        if self.mode != "sequential" or not self._uses_master(p):
            return None
        return p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    def _walk_masters(self, flags: list) -> list:
        """The float32 walks (or None) aligned with _walk()'s parameters, kept where flags is True."""
        out = []
        for group, gm in zip(self.param_groups, self._master):
            out += [w for p, w in zip(group["params"], gm) if p.requires_grad]
        return [w for w, f in zip(out, flags) if f]

    def _new_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """The anchor (a copy of p) or the zero displacement, on p's device or in (pinned) CPU memory."""
        if self.mode == "parallel" and self._uses_master(p):
            return torch.zeros_like(p.detach(), dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.offload_anchor and p.device.type != "cpu":
            a = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=p.device.type == "cuda")
        else:
            a = torch.empty_like(p.detach(), memory_format=torch.contiguous_format)
        if self.mode == "parallel":
            return a.zero_()
        return a.copy_(p.detach())

    def _sync_groups(self) -> None:
        """Give new groups (or groups added to the outer optimizer directly) their Nexus keys and buffers."""
        groups = self.param_groups
        for gi, group in enumerate(groups):
            if "inner_lr" not in group:
                group["inner_lr"] = self.defaults["inner_lr"]
            if "base_lr" not in group:  # the schedule's base: a scheduler's initial_lr if one exists already
                group["base_lr"] = float(group.get("initial_lr", group["lr"]))
            if gi >= len(self._buf) or len(self._buf[gi]) != len(group["params"]):
                self._check_group(gi, group)
                if not self.at_outer_boundary:
                    raise RuntimeError("parameter groups changed in the middle of an inner walk; "
                                       "add groups at an outer boundary (opt.at_outer_boundary)")
                self._dtensors = self._dtensors or any(_is_dtensor(p) for p in group["params"])
                with torch.no_grad():
                    bufs = [self._new_buffer(p) for p in group["params"]]
                    masters = [self._new_master(p) for p in group["params"]]
                if gi < len(self._buf):
                    self._buf[gi] = bufs
                    self._master[gi] = masters
                    self._touched[gi] = [False] * len(bufs)
                else:
                    self._buf.append(bufs)
                    self._master.append(masters)
                    self._touched.append([False] * len(bufs))
                    self._gamma_mean.append(float(group["inner_lr"]))

    def _check_group(self, gi: int, group: dict) -> None:
        """One-line ValueErrors for settings that cannot work."""
        _check_inner_lr(group["inner_lr"], f"param group {gi}: ")
        params = group["params"]
        if self._shard_group is None and any(getattr(p, "_fsdp_flattened", False) and not _is_dtensor(p)
                                             for p in params) and _world_size() > 1:
            raise ValueError("Nexus over FSDP1 (FullyShardedDataParallel) parameters: each rank holds a shard, so "
                             "its gradient norm is not the full one; pass shard_group=fsdp_model.process_group, "
                             "or use FSDP2 (torch.distributed.fsdp.fully_shard)")
        if self.sync == "outer" and any(_is_dtensor(p) for p in params):
            raise ValueError("sync='outer' needs every rank to hold the full weights; DTensor (FSDP2) parameters "
                             "are shards: use sync='global' with FSDP2, or DDP with sync='outer'")
        if self.offload_anchor and self.master_weights and any(p.dtype in LOW_PRECISION and p.device.type != "cpu"
                                                               for p in params):
            raise ValueError("offload_anchor with bf16/fp16 weights needs master_weights=False (the float32 walk "
                             "stays on the device); or keep the anchor on the device")
        if self.offload_anchor and any(_is_dtensor(p) for p in params):
            raise ValueError("offload_anchor is not supported for DTensor (FSDP2) parameters: the anchor is "
                             "sharded like them already; drop offload_anchor")
        if self.inner_lr_follows_schedule and not (_is_real(group["base_lr"]) and group["base_lr"] > 0):
            raise ValueError(f"param group {gi}: inner_lr_follows_schedule needs a base lr > 0, "
                             f"got {group['base_lr']!r}")

    def _warn_eps(self) -> None:
        """Adam's eps >= 1e-8 damps the tiny raw pseudo-gradient (its norm is at most K * gamma)."""
        if self.pseudo_grad_scale != "raw":
            return
        for g in self.param_groups:
            if "betas" in g and isinstance(g.get("eps"), float) and g["eps"] >= 1e-8:
                warnings.warn(f"outer eps={g['eps']:g} damps the raw Nexus pseudo-gradient; use eps=1e-10 or "
                              "pseudo_grad_scale='inner_lr'", stacklevel=3)
                return

    @contextlib.contextmanager
    def anchor_weights(self) -> Iterator[None]:
        """Swap the outer (anchor) weights into the model for evaluation or saving; restore the inner ones after.
        In parallel mode (and at an outer boundary) the model already holds them."""
        if self.mode == "parallel" or self.at_outer_boundary or self._swapped:
            yield
            return
        ps, anchors, _, _ = self._walk()
        with torch.no_grad():
            saved = [p.detach().to(a.device, copy=True) for p, a in zip(ps, anchors)]
            self._copy(ps, anchors)
        self._swapped = True
        try:
            yield
        finally:
            with torch.no_grad():
                self._copy(ps, saved)
            self._swapped = False

    def _wait_for_buffers(self) -> None:
        """Finish non-blocking device-to-host copies into a pinned buffer before the host touches it."""
        if self.offload_anchor and torch.cuda.is_available() and any(a.is_pinned() for g in self._buf for a in g):
            torch.cuda.synchronize()

    # -- checkpoints: tensors, scalars, strings, lists and dicts only -----------------------------------------
    def _has_master(self) -> bool:
        return any(w is not None for g in self._master for w in g)

    @property
    def _buf_key(self) -> str:
        return "anchor" if self.mode == "sequential" else "displacement"

    def state_dict(self) -> dict:
        """Outer state(s), the anchor (parallel: the displacement so far) per group and parameter, the walk's
        bookkeeping and the step counters."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._sync_groups()
        self._wait_for_buffers()
        sd = {"outer": [o.state_dict() for o in self._outers], "mode": self.mode,
              self._buf_key: [list(g) for g in self._buf], "micro_step": self._micro_step, "phase": self._phase,
              "inner_steps": self.inner_steps, "touched": [list(t) for t in self._touched],
              "gamma_mean": list(self._gamma_mean), "nonfinite_skips": self.nonfinite_skips}
        if self._has_master():
            sd["walk"] = [list(g) for g in self._master]  # float32 walks of bf16/fp16 weights (None elsewhere)
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict(): everything is validated first (keys, counters, structure, shapes, dtypes,
        finiteness); on any error a one-line ValueError is raised and nothing has changed."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        self._sync_groups()
        v = self._validate(state_dict)
        snapshots = [o.state_dict() for o in self._outers]
        loaded = []
        try:
            for o, sd in zip(self._outers, v["outer"]):
                o.load_state_dict(sd)
                loaded.append(o)
        except Exception as e:  # torch found something the checks above did not: put back what was loaded
            for o, snap in zip(loaded, snapshots):
                o.load_state_dict(snap)
            raise ValueError(f"outer optimizer state does not load: {str(e).splitlines()[0] if str(e) else e!r}") \
                from None
        self._wait_for_buffers()
        with torch.no_grad():
            for saved, mine in zip(v["buf"], self._buf):
                for s, m in zip(saved, mine):
                    m.copy_(s)
            for saved, mine, group in zip(v["walk"], self._master, self.param_groups):
                for s, m, p in zip(saved, mine, group["params"]):
                    if m is not None:
                        m.copy_(p.detach() if s is None else s)
        self._micro_step, self._phase = v["micro_step"], v["phase"]
        self._touched = v["touched"]
        self._gamma_mean = v["gamma_mean"]
        self._skips, self._skips_pending = v["nonfinite_skips"], None
        self._sync_groups()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _validate(self, sd: Any) -> dict:
        """Everything load_state_dict needs, checked and normalised; raises a one-line ValueError otherwise."""
        if not isinstance(sd, dict):
            raise ValueError(f"not a Nexus state_dict: a {type(sd).__name__}, not a dict")
        mode = sd.get("mode", "sequential")
        if mode not in MODES:
            raise ValueError(f"state_dict mode must be one of {list(MODES)}, got {mode!r}")
        if mode != self.mode:
            raise ValueError(f"state_dict is from a Nexus with mode={mode!r}; this one has mode={self.mode!r}")
        key = self._buf_key
        missing = [k for k in ("outer", key, "micro_step", "phase", "inner_steps") if k not in sd]
        if missing:
            raise ValueError(f"not a Nexus state_dict: missing {', '.join(missing)}")
        micro, phase, k = sd["micro_step"], sd["phase"], sd["inner_steps"]
        if not _is_int(k) or k < 1:
            raise ValueError(f"state_dict inner_steps must be an integer >= 1, got {k!r}")
        if not _is_int(micro) or micro < 0:
            raise ValueError(f"state_dict micro_step must be an integer >= 0, got {micro!r}")
        if not _is_int(phase) or not 0 <= phase < k or phase > micro:
            raise ValueError(f"state_dict phase must be an integer in [0, min(inner_steps - 1, micro_step)] = "
                             f"[0, {min(k - 1, micro) if _is_int(micro) else k - 1}], got {phase!r}")
        if phase != 0 and k != self.inner_steps:
            raise ValueError(f"state_dict was saved mid-walk with inner_steps={k}; resume with inner_steps={k} "
                             "or from an outer boundary")
        outer_sds = sd["outer"]
        if not isinstance(outer_sds, (list, tuple)) or len(outer_sds) != len(self._outers):
            n = len(outer_sds) if isinstance(outer_sds, (list, tuple)) else type(outer_sds).__name__
            raise ValueError(f"state_dict has {n} outer optimizer state(s), this Nexus has {len(self._outers)}")
        for oi, (o, osd) in enumerate(zip(self._outers, outer_sds)):
            self._validate_outer(oi, o, osd)
        buf = sd[key]
        if not isinstance(buf, (list, tuple)) or len(buf) != len(self._buf):
            n = len(buf) if isinstance(buf, (list, tuple)) else type(buf).__name__
            raise ValueError(f"state_dict {key} has {n} param groups, the optimizer has {len(self._buf)}")
        for gi, (saved, mine) in enumerate(zip(buf, self._buf)):
            if not isinstance(saved, (list, tuple)) or len(saved) != len(mine):
                n = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
                raise ValueError(f"param group {gi}: state_dict {key} has {n} parameters, "
                                 f"the optimizer has {len(mine)}")
            for pi, (s, m) in enumerate(zip(saved, mine)):
                where = f"{key} of param group {gi} parameter {pi}"
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(m.shape):
                    shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                    raise ValueError(f"{where} has shape {shape}, the parameter has {tuple(m.shape)}")
                if s.dtype != m.dtype:
                    raise ValueError(f"{where} has dtype {s.dtype}, the parameter has {m.dtype}")
                if s.is_floating_point() and not bool(torch.isfinite(s).all()):
                    raise ValueError(f"{where} holds non-finite values")
        touched = sd.get("touched")
        if touched is None:  # older checkpoints: mid-walk, every parameter counts as having had a gradient
            touched = [[phase > 0] * len(g) for g in self._buf]
        elif (not isinstance(touched, (list, tuple)) or len(touched) != len(self._buf)
              or any(not isinstance(t, (list, tuple)) or len(t) != len(g) or not all(isinstance(x, bool) for x in t)
                     for t, g in zip(touched, self._buf))):
            raise ValueError("state_dict touched must be one list of booleans per param group, one per parameter")
        gm = sd.get("gamma_mean")
        if gm is None:
            gm = [self._inner_lr(g) for g in self.param_groups]
        elif (not isinstance(gm, (list, tuple)) or len(gm) != len(self._buf)
              or not all(_is_real(x) and math.isfinite(x) and x > 0 for x in gm)):
            raise ValueError(f"state_dict gamma_mean must be one finite number > 0 per param group, got {gm!r}")
        skips = sd.get("nonfinite_skips", 0)
        if not _is_int(skips) or skips < 0:
            raise ValueError(f"state_dict nonfinite_skips must be an integer >= 0, got {skips!r}")
        walk = sd.get("walk")
        if self._has_master():
            if walk is None:
                if phase != 0:
                    raise ValueError("state_dict was saved mid-walk without the float32 walk of the bf16/fp16 "
                                     "weights; resume from an outer boundary")
                walk = [[None] * len(g) for g in self._buf]  # at a boundary the walk starts at the weights
            elif not isinstance(walk, (list, tuple)) or len(walk) != len(self._master) or any(
                    not isinstance(w, (list, tuple)) or len(w) != len(m) for w, m in zip(walk, self._master)):
                raise ValueError("state_dict walk must be one list per param group, one entry per parameter")
            for gi, (saved, mine) in enumerate(zip(walk, self._master)):
                for pi, (w, m) in enumerate(zip(saved, mine)):
                    if m is None or w is None:
                        continue
                    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(m.shape) or w.dtype != m.dtype \
                            or not bool(torch.isfinite(w).all()):
                        raise ValueError(f"walk of param group {gi} parameter {pi} must be a finite {m.dtype} "
                                         f"tensor of shape {tuple(m.shape)}")
        else:
            walk = [[None] * len(g) for g in self._buf]
        return {"outer": list(outer_sds), "buf": buf, "walk": walk, "micro_step": int(micro), "phase": int(phase),
                "touched": [list(t) for t in touched], "gamma_mean": [float(x) for x in gm],
                "nonfinite_skips": int(skips)}

    def _validate_outer(self, oi: int, o: Optimizer, osd: Any) -> None:
        """What torch's load_state_dict checks (groups, parameter counts) plus Nexus's group keys, the lrs and the
        shapes of full-size per-parameter states, so that loading the outer optimizer(s) cannot fail halfway."""
        where = f"outer optimizer {oi}"
        if not isinstance(osd, dict) or not isinstance(osd.get("param_groups"), (list, tuple)) \
                or not isinstance(osd.get("state"), dict):
            raise ValueError(f"{where}: state_dict must be a dict with 'state' and 'param_groups'")
        groups = osd["param_groups"]
        if len(groups) != len(o.param_groups):
            raise ValueError(f"{where}: state_dict has {len(groups)} param groups, the optimizer has "
                             f"{len(o.param_groups)}")
        params: dict = {}
        for gi, (sg, mg) in enumerate(zip(groups, o.param_groups)):
            if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)) \
                    or len(sg["params"]) != len(mg["params"]) or not all(_is_int(i) for i in sg["params"]):
                n = len(sg["params"]) if isinstance(sg, dict) and isinstance(sg.get("params"), (list, tuple)) else "?"
                raise ValueError(f"{where} param group {gi}: state_dict has {n} parameters, the optimizer has "
                                 f"{len(mg['params'])}")
            params.update(zip(sg["params"], mg["params"]))
            if "inner_lr" in sg:
                _check_inner_lr(sg["inner_lr"], f"{where} param group {gi}: ")
            lr = sg.get("lr")
            bad_lr = not (_is_real(lr) and math.isfinite(lr) and lr >= 0)
            if lr is not None and not isinstance(lr, torch.Tensor) and bad_lr:
                raise ValueError(f"{where} param group {gi}: lr must be a finite number >= 0, got {lr!r}")
            base = sg.get("base_lr")
            if base is not None and not (_is_real(base) and math.isfinite(base) and base > 0):
                raise ValueError(f"{where} param group {gi}: base_lr must be a finite number > 0, got {base!r}")
        for pid, st in osd["state"].items():
            if pid not in params:
                raise ValueError(f"{where}: state for unknown parameter id {pid!r}")
            if not isinstance(st, dict):
                raise ValueError(f"{where}: state of parameter {pid!r} is a {type(st).__name__}, not a dict")
            p = params[pid]
            for name in _FULL_SHAPE_STATES:
                t = st.get(name)
                if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{where}: state '{name}' of parameter {pid!r} has shape {tuple(t.shape)}, "
                                     f"the parameter has {tuple(p.shape)}")
