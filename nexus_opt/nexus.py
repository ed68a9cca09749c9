"""Nexus: normalized-SGD inner walks on single-domain micro-batches, an outer optimizer on the displacement.

Every ``step()`` is an inner step ``theta_in -= gamma * g / ||g||`` (global L2 norm, no momentum) on the
model's live weights; every ``inner_steps``-th call also runs the outer step: the pseudo-gradient
``anchor - theta_in`` goes into ``.grad``, the weights return to the anchor, the outer optimizer steps and
the anchor becomes the new weights. Only torch and the standard library are used.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import ChainMap, OrderedDict
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.optim import Optimizer

__all__ = ["Nexus"]

_HAS_FOREACH = all(hasattr(torch, f"_foreach_{n}") for n in ("norm", "mul_", "add_", "copy_", "sub_", "neg_", "div_"))


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


class Nexus(Optimizer):
    """Wrap an outer optimizer (or a list of them) so that it steps on Nexus pseudo-gradients.

    Args:
        outer: the outer optimizer, e.g. ``AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-10)``,
            or a list/tuple of them (e.g. Muon for 2-D weights + AdamW for the rest).
        inner_lr: gamma, the length of each normalized inner step (default for groups without "inner_lr").
        inner_steps: K, micro-batches (inner steps) per outer step.
        pseudo_grad_scale: "raw" (paper: anchor - inner weights) or "inner_lr" (divided by the group's inner_lr).
        inner_lr_follows_schedule: scale gamma by group["lr"] / group["base_lr"] (the lr at construction).
        offload_anchor: keep the anchor copy on the CPU (pinned, non-blocking copies for CUDA parameters).
        foreach: use torch._foreach_* kernels (None: when available).
    """

    def __init__(self, outer: Union[Optimizer, Sequence[Optimizer]], inner_lr: float = 0.01, inner_steps: int = 4,
                 pseudo_grad_scale: str = "raw", inner_lr_follows_schedule: bool = False,
                 offload_anchor: bool = False, foreach: Optional[bool] = None):
        outers = list(outer) if isinstance(outer, (list, tuple)) else [outer]
        if not outers or not all(isinstance(o, Optimizer) for o in outers):
            raise TypeError("Nexus wraps a torch.optim.Optimizer or a non-empty list of them")
        if any(isinstance(o, Nexus) for o in outers):
            raise TypeError("Nexus cannot wrap another Nexus")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not inner_lr >= 0.0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr!r}")
        if pseudo_grad_scale not in ("raw", "inner_lr"):
            raise ValueError(f"pseudo_grad_scale must be 'raw' or 'inner_lr', got {pseudo_grad_scale!r}")
        seen: set = set()
        for o in outers:
            for g in o.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter appears in more than one outer optimizer")
                    seen.add(id(p))
        self._outers = outers
        self.defaults = dict(inner_lr=inner_lr, inner_steps=inner_steps, pseudo_grad_scale=pseudo_grad_scale,
                             inner_lr_follows_schedule=inner_lr_follows_schedule, offload_anchor=offload_anchor)
        self.inner_steps = inner_steps
        self.pseudo_grad_scale = pseudo_grad_scale
        self.inner_lr_follows_schedule = inner_lr_follows_schedule
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
        self._anchor: list[list[torch.Tensor]] = []
        self._micro_step = 0  # inner steps taken in total
        self._phase = 0  # inner steps taken since the last outer step (0 = model holds the outer weights)
        self._swapped = False
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
        """True when the model holds the outer (anchor) weights: micro_step % inner_steps == 0."""
        return self._phase == 0

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        outers = ", ".join(type(o).__name__ for o in self._outers)
        return (f"Nexus({outers}, inner_lr={self.defaults['inner_lr']}, inner_steps={self.inner_steps}, "
                f"pseudo_grad_scale={self.pseudo_grad_scale!r}, micro_step={self._micro_step})")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the (last) outer optimizer and give its parameters an anchor."""
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
        if self.inner_lr_follows_schedule:
            lr = lr * float(group["lr"]) / group["base_lr"]
        return lr

    def _inner_step(self) -> None:
        """theta -= gamma * g / ||g|| with the global norm over every parameter that has a gradient."""
        work, grads = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                gs = [p.grad for p in ps]
                work.append((ps, gs, self._inner_lr(group)))
                grads += gs
        if not grads:
            return
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Nexus does not support sparse gradients")
        norm = self._global_norm(grads)
        if self._host_read_is_free(norm):
            # A host read costs nothing here: one fused pass p += (-gamma/||g||) g, and .grad stays untouched.
            n = norm.item()
            if n == 0.0:
                return
            for ps, gs, lr in work:
                for (gl, pl) in _by_device(gs, ps).values():
                    if self.foreach:
                        torch._foreach_add_(pl, gl, alpha=-lr / n)
                    else:
                        for g, p in zip(gl, pl):
                            p.add_(g, alpha=-lr / n)
            return
        for ps, gs, lr in work:
            # On an accelerator no host sync: scale = -gamma/||g||, or 0 when ||g|| == 0 (the step is skipped);
            # .grad is rescaled in place (as clip_grad_norm_ does) to avoid a temporary.
            scale = torch.where(norm > 0, -lr / norm, 0.0)
            for (dev, _), (gl, pl) in _by_device(gs, ps).items():
                s = scale.to(dev, non_blocking=True)
                if self.foreach:
                    torch._foreach_mul_(gl, s)
                    torch._foreach_add_(pl, gl)
                else:
                    for g, p in zip(gl, pl):
                        p.add_(g.mul_(s))

    @staticmethod
    def _host_read_is_free(t: torch.Tensor) -> bool:
        """Reading t on the host costs no device sync (CPU tensors)."""
        return t.device.type == "cpu"

    @staticmethod
    def _offloaded(ps: list, anchors: list) -> bool:
        """Some anchor lives on another device than its parameter."""
        return any(a.device != p.device for a, p in zip(anchors, ps))

    def _global_norm(self, grads: list) -> torch.Tensor:
        """L2 norm of all gradients as one vector (float64 if any is float64, else float32)."""
        buckets = _by_device(grads)
        acc = torch.float64 if any(dt == torch.float64 for _, dt in buckets) else torch.float32
        dev = grads[0].device
        norms = []
        for (d, dt), (gl,) in buckets.items():
            ns = torch._foreach_norm(gl) if self.foreach else [torch.linalg.vector_norm(g) for g in gl]
            norms += ns if (d, dt) == (dev, acc) else [n.to(device=dev, dtype=acc) for n in ns]
        return torch.linalg.vector_norm(torch.stack(norms))

    def _pairs(self) -> tuple[list, list, list]:
        """(parameters, anchors, group inner lrs) of every parameter that requires grad."""
        ps, anchors, lrs = [], [], []
        for group, ganchor in zip(self.param_groups, self._anchor):
            for p, a in zip(group["params"], ganchor):
                if p.requires_grad:
                    ps.append(p)
                    anchors.append(a)
                    lrs.append(group["inner_lr"])
        return ps, anchors, lrs

    def _copy(self, dst: list, src: list) -> None:
        """dst[i] <- src[i] (non-blocking across devices: the anchor may sit in pinned CPU memory)."""
        same = all(d.device == s.device for d, s in zip(dst, src))
        if self.foreach and same:
            for _, (dl, sl) in _by_device(dst, src).items():
                torch._foreach_copy_(dl, sl)
        else:
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)

    def _outer_step(self) -> None:
        """Pseudo-gradient into .grad (in place), weights back to the anchor, outer step, anchor refresh."""
        ps, anchors, lrs = self._pairs()
        for p in ps:
            if p.grad is None:
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format)
        grads = [p.grad for p in ps]
        if not self._offloaded(ps, anchors):
            self._copy(grads, anchors)  # grad <- anchor
            self._sub(grads, ps)  # grad <- anchor - inner
            self._copy(ps, anchors)  # weights <- anchor
            sign = 1.0
        else:  # offloaded anchor: a single host-to-device transfer
            self._copy(grads, ps)  # grad <- inner
            self._copy(ps, anchors)  # weights <- anchor
            self._sub(grads, ps)  # grad <- inner - anchor
            sign = -1.0
        if self.pseudo_grad_scale == "inner_lr":  # (anchor - inner) / gamma, exactly as the paper's ratio
            for g, lr in zip(grads, lrs):
                g.div_(sign * lr)
        elif sign < 0:
            for (gl,) in _by_device(grads).values():
                if self.foreach:
                    torch._foreach_neg_(gl)
                else:
                    for g in gl:
                        g.neg_()
        for o in self._outers:
            o.step()
        self._copy(anchors, ps)  # anchor <- new outer weights

    def _sub(self, dst: list, src: list) -> None:
        """dst[i] -= src[i]."""
        for (dl, sl) in _by_device(dst, src).values():
            if self.foreach:
                torch._foreach_sub_(dl, sl)
            else:
                for d, s in zip(dl, sl):
                    d.sub_(s)

    # -- anchor bookkeeping ---------------------------------------------------------------------------------
    def _new_anchor(self, p: torch.Tensor) -> torch.Tensor:
        """A copy of p on its device, or in (pinned, for CUDA) CPU memory when offloading."""
        if self.offload_anchor and p.device.type != "cpu":
            pin = p.device.type == "cuda"
            a = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
            a.copy_(p.detach())
            return a
        return p.detach().clone(memory_format=torch.contiguous_format)

    def _sync_groups(self) -> None:
        """Give new groups (or groups added to the outer optimizer directly) their Nexus keys and anchors."""
        groups = self.param_groups
        for gi, group in enumerate(groups):
            if "inner_lr" not in group:
                group["inner_lr"] = self.defaults["inner_lr"]
            if "base_lr" not in group:  # the schedule's base: a scheduler's initial_lr if one exists already
                group["base_lr"] = float(group.get("initial_lr", group["lr"]))
            if gi >= len(self._anchor) or len(self._anchor[gi]) != len(group["params"]):
                self._check_group(gi, group)
                if not self.at_outer_boundary:
                    raise RuntimeError("parameter groups changed in the middle of an inner walk; "
                                       "add groups at an outer boundary (opt.at_outer_boundary)")
                with torch.no_grad():
                    anchors = [self._new_anchor(p) for p in group["params"]]
                if gi < len(self._anchor):
                    self._anchor[gi] = anchors
                else:
                    self._anchor.append(anchors)

    def _check_group(self, gi: int, group: dict) -> None:
        """One-line ValueErrors for settings that cannot work."""
        if not group["inner_lr"] >= 0:
            raise ValueError(f"param group {gi}: inner_lr must be >= 0, got {group['inner_lr']!r}")
        if self.pseudo_grad_scale == "inner_lr" and group["inner_lr"] == 0:
            raise ValueError(f"param group {gi}: pseudo_grad_scale='inner_lr' needs inner_lr > 0")
        if self.inner_lr_follows_schedule and not group["base_lr"] > 0:
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
        """Swap the outer (anchor) weights into the model for evaluation or saving; restore the inner ones after."""
        if self.at_outer_boundary or self._swapped:
            yield
            return
        ps, anchors, _ = self._pairs()
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

    def _wait_for_anchor(self) -> None:
        """Finish non-blocking device-to-host copies into a pinned anchor before the host touches it."""
        if self.offload_anchor and torch.cuda.is_available() and any(a.is_pinned() for g in self._anchor for a in g):
            torch.cuda.synchronize()

    # -- checkpoints: tensors, scalars, strings, lists and dicts only -----------------------------------------
    def state_dict(self) -> dict:
        """Outer state(s), the anchor as anchor[group][param], and the step counters."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._sync_groups()
        self._wait_for_anchor()
        sd = {"outer": [o.state_dict() for o in self._outers], "anchor": [list(g) for g in self._anchor],
              "micro_step": self._micro_step, "phase": self._phase, "inner_steps": self.inner_steps}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict(); the parameter structure and shapes are checked before anything changes."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        self._sync_groups()
        missing = [k for k in ("outer", "anchor", "micro_step", "phase", "inner_steps") if k not in state_dict]
        if missing:
            raise ValueError(f"not a Nexus state_dict: missing {', '.join(missing)}")
        outer_sds, anchor = list(state_dict["outer"]), list(state_dict["anchor"])
        if len(outer_sds) != len(self._outers):
            raise ValueError(f"state_dict has {len(outer_sds)} outer optimizer(s), this Nexus has {len(self._outers)}")
        if len(anchor) != len(self._anchor):
            raise ValueError(f"state_dict anchor has {len(anchor)} param groups, the optimizer has {len(self._anchor)}")
        for gi, (saved, mine) in enumerate(zip(anchor, self._anchor)):
            if len(saved) != len(mine):
                raise ValueError(f"param group {gi}: state_dict anchor has {len(saved)} parameters, "
                                 f"the optimizer has {len(mine)}")
            for pi, (s, m) in enumerate(zip(saved, mine)):
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(m.shape):
                    shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                    raise ValueError(f"anchor of param group {gi} parameter {pi} has shape {shape}, "
                                     f"the parameter has {tuple(m.shape)}")
        phase, k = int(state_dict["phase"]), int(state_dict["inner_steps"])
        if phase != 0 and k != self.inner_steps:
            raise ValueError(f"state_dict was saved mid-walk with inner_steps={k}; resume with inner_steps={k} "
                             "or from an outer boundary")
        for o, sd in zip(self._outers, outer_sds):
            o.load_state_dict(sd)
        self._wait_for_anchor()
        with torch.no_grad():
            for saved, mine in zip(anchor, self._anchor):
                for s, m in zip(saved, mine):
                    m.copy_(s)
        self._micro_step, self._phase = int(state_dict["micro_step"]), phase
        self._sync_groups()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
