"""Generalised Gauss-Newton curvature G = sum_b c_b J_b^T H_b J_b as a linear operator (float64, TF32 off).

J_b is the Jacobian of the model outputs on batch b w.r.t. the parameters (products by torch.func jvp/vjp)
and H_b the loss's analytic Hessian in the outputs (softmax for cross-entropy, 2/M I for the mean squared
error). Same interface as HessianOperator (matvec/matmat over flat vectors, n, hvps, loss, to_dense,
to_scipy, release), so every spectral method takes either. G is positive semi-definite.
"""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call, jvp, vjp

from nexus_opt.errors import UserError

from .hvp import CurvatureOperator, numerics
from .losses import output_loss
from .objective import Objective, reseed
from .params import unflatten

CURVATURES = ("hessian", "ggn")


class GGNOperator(CurvatureOperator):
    """The GGN of one domain's loss (None/'train' = training loss), weighted over batches like the loss.

    Works on a private copy of the objective in `dtype` unless copy=False. The loss must expose its outputs
    (landscape.losses.output_loss); `cache=True` keeps each batch's vjp graph between products.
    """

    kind = "GGN"

    def __init__(self, obj: Objective, domain: str | None = None, dtype: torch.dtype | None = torch.float64,
                 train_mode: bool = False, *, cache: bool = True, device=None, copy: bool = True, seed: int = 0,
                 **_ignored):
        names = obj.resolve(domain)
        if len(names) != 1:
            raise UserError("a GGN operator takes one domain (a name or 'train'), not 'each'")
        self.loss_obj = output_loss(obj.loss_fn)
        self.domain = names[0]
        self.obj = obj.to(device=device, dtype=dtype) if copy else obj
        self.train_mode, self.cache, self.seed = bool(train_mode), bool(cache), int(seed)
        params = self.obj.params()
        if not params:
            raise UserError("the model has no trainable parameters (requires_grad=True); nothing to differentiate")
        self._theta = {k: p.detach() for k, p in params.items()}
        self._keys = list(self._theta)
        first = next(iter(self._theta.values()))
        self.dtype, self.device = first.dtype, first.device
        self.n = sum(t.numel() for t in self._theta.values())
        self.terms = self.obj.keyed_terms(self.domain)  # (key, coefficient, batch): the key seeds train mode
        self.hvps = 0
        self._vjps: dict[int, tuple] = {}
        self._vmap_ok = True

    @contextlib.contextmanager
    def _ctx(self):
        with self.obj.evaluating(self.train_mode), numerics():
            if not self.train_mode:
                yield
                return
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                yield

    def _reseed(self, key: int) -> None:
        """Train mode: the same dropout masks for a batch in every forward (jvp and the cached vjp)."""
        if self.train_mode:
            reseed(self.seed, key, self.device)

    def _f(self, batch):
        model, lo = self.obj.model, self.loss_obj

        def f(*ps):
            return lo.outputs(_Bound(model, dict(zip(self._keys, ps))), batch)
        return f

    def _vjp(self, i: int, key: int, batch):
        if i in self._vjps:
            return self._vjps[i]
        self._reseed(key)
        out, fn = vjp(self._f(batch), *self._theta.values())
        if self.cache:
            self._vjps[i] = (out, fn)
        return out, fn

    def _column(self, v: torch.Tensor) -> torch.Tensor:
        """G v = sum_b c_b J_b^T H_b J_b v (a pure function of v, so it can be vmapped over columns)."""
        tangents = tuple(unflatten(v, self._theta).values())
        primals = tuple(self._theta.values())
        parts = []
        for i, (key, c, batch) in enumerate(self.terms):
            self._reseed(key)
            out, jv = jvp(self._f(batch), primals, tangents)
            u = self.loss_obj.hessian_vp(out, jv, batch)
            _, fn = self._vjp(i, key, batch)
            parts.append(c * torch.cat([t.reshape(-1) for t in fn(u.to(out.dtype))]))
        return sum(parts) if parts else torch.zeros_like(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """G V for an (n, b) block of columns: vmapped over the columns (a loop where vmap is unsupported)."""
        if V.dim() != 2 or V.shape[0] != self.n:
            raise UserError(f"GGN products take (n={self.n}, b) blocks, got shape {tuple(V.shape)}")
        V = V.detach().to(device=self.device, dtype=self.dtype)
        with self._ctx():
            for i, (key, _, batch) in enumerate(self.terms):  # build the cached vjp graphs outside vmap
                self._vjp(i, key, batch)
            out = None
            if V.shape[1] > 1 and self.cache and self._vmap_ok and not self.train_mode:
                try:
                    out = torch.func.vmap(self._column)(V.T.contiguous()).T
                except (RuntimeError, NotImplementedError, ValueError):
                    self._vmap_ok = False
            if out is None:
                out = torch.stack([self._column(V[:, j]) for j in range(V.shape[1])], dim=1)
        self.hvps += V.shape[1]
        return out

    def loss(self) -> float:
        """The loss over the operator's batches (weighted like the curvature)."""
        total = 0.0
        with torch.no_grad(), self._ctx():
            for key, c, b in self.terms:
                self._reseed(key)
                total += c * float(self.obj.functional_loss(self._theta, b))
        return total

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the loss (detached)."""
        total = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for key, c, b in self.terms:
            leaves = {k: t.detach().requires_grad_(True) for k, t in self._theta.items()}
            with self._ctx():
                self._reseed(key)
                g = torch.autograd.grad(self.obj.functional_loss(leaves, b) * c, list(leaves.values()),
                                        allow_unused=True)
            total += torch.cat([(x if x is not None else torch.zeros_like(t)).reshape(-1)
                                for x, t in zip(g, leaves.values())])
        return total

    def release(self) -> None:
        self._vjps = {}


class _Bound(torch.nn.Module):
    """A model called with some parameters replaced (functional_call), so OutputLoss.outputs can call it."""

    def __init__(self, model, params):
        super().__init__()
        self._m, self._p = model, params

    def forward(self, *a, **kw):
        return functional_call(self._m, self._p, a, kw, tie_weights=True, strict=False)

    def parameters(self, recurse: bool = True):
        yield from self._p.values()


def check_curvature(curvature: str, backend: str = "lanczos", which: str = "both") -> str:
    """Validate a curvature choice for flatness; returns `which` ('both' becomes 'top' for the GGN: it is
    positive semi-definite and rank-deficient, so its bottom end is a cluster at zero)."""
    if curvature not in CURVATURES:
        raise UserError(f"unknown curvature '{curvature}'; choose one of {list(CURVATURES)}")
    if curvature == "ggn" and backend == "pyhessian":
        raise UserError("the pyhessian backend computes Hessian products only; use backend lanczos or eigsh with ggn")
    return "top" if curvature == "ggn" and which == "both" else which


def make_operator(obj: Objective, domain: str | None = None, curvature: str = "hessian", **kw):
    """The curvature operator of a domain: 'hessian' (HessianOperator) or 'ggn' (GGNOperator); under an
    initialised torch.distributed group of several processes, sharded over ranks and all-reduced."""
    if curvature not in CURVATURES:
        raise UserError(f"unknown curvature '{curvature}'; choose one of {list(CURVATURES)}")
    from . import distributed

    if curvature == "ggn":
        kw.pop("mode", None)
        kw.pop("batched", None)
        kw.pop("max_block", None)
        op = GGNOperator(obj, domain, **kw)
    else:
        from .hvp import HessianOperator
        op = HessianOperator(obj, domain, **kw)
    return distributed.shard_operator(op) if distributed.active() else op
