"""Hessian-vector products of an Objective's loss on its fixed batches, as a linear operator (float64, TF32 off)."""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from nexus_opt.errors import UserError

from .numerics import cpu_threads_for, math_sdpa, numerics  # noqa: F401  (re-exported)
from .objective import Objective, reseed
from .params import flatten, unflatten

MODES = ("double_backward", "finite_difference")
BATCHED = ("auto", "grads_batched", "fwd_rev", "loop")
BLOCK_BYTES = 2 ** 28  # the most memory one batched product block may take (HessianOperator.max_block)


class CurvatureOperator:
    """The linear-operator surface shared by every curvature matrix (Hessian, GGN, sharded): subclasses give
    `n`, `dtype`, `device`, `matmat(V)` and `release()`; this gives matvec, @, shape, dense and scipy views."""

    kind = "curvature"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """M v for a flat vector v (any device/dtype); returns a flat vector on the operator's device."""
        return self.matmat(v.reshape(-1, 1))[:, 0]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def to_dense(self, max_n: int = 20000) -> torch.Tensor:
        """The full matrix from n products, symmetrised (for small models and tests)."""
        if self.n > max_n:
            raise UserError(f"dense {self.kind} of {self.n} parameters is too large (limit {max_n}); use Lanczos")
        M = self.matmat(torch.eye(self.n, dtype=self.dtype, device=self.device))
        return 0.5 * (M + M.T)

    def to_scipy(self):
        """A scipy.sparse.linalg.LinearOperator view (numpy in, numpy out) for eigsh and friends."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = np.float64  # ARPACK in float64 whatever the products' dtype (float32 products are cast up)

        def mv(x):
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype)).reshape(-1)
            return self.matvec(v).to("cpu", torch.float64).numpy()

        def mm(X):
            return self.matmat(torch.from_numpy(np.ascontiguousarray(X, dtype=np_dtype))).to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np_dtype)

    def release(self) -> None:
        """Drop cached graphs (rebuilt on the next product)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class HessianOperator(CurvatureOperator):
    """The Hessian of one domain's loss (None/'train' = the training loss), summed over batches like the loss.

    Works on a private copy of the objective in `dtype` (the caller's model is never touched). `matvec(v)`
    and `matmat(V)` (columns of an (n, b) block) count products in `.hvps`; `to_scipy()` gives a scipy
    LinearOperator. Parameters that do not reach the loss give zero rows. `cache=True` keeps one gradient
    graph (create_graph) for all products; `cache=False` rebuilds it per call (less memory). `train_mode`: the
    modules' training flags on, each batch's RNG seeded by objective.batch_seed(seed, key) in every evaluation, so
    dropout masks are fixed and H is the Hessian of one deterministic function. `precision` ('auto', 'float64',
    'float32'; landscape.precision) picks the dtype by the policy instead of `dtype`.
    """

    kind = "Hessian"

    def __init__(self, obj: Objective, domain: str | None = None, dtype: torch.dtype | None = torch.float64,
                 mode: str = "double_backward", train_mode: bool = False, *, cache: bool = True,
                 batched: str = "auto", max_block: int = 64, device=None, copy: bool = True, seed: int = 0,
                 precision: str | None = None):
        if precision is not None:  # the policy of landscape.precision instead of a fixed dtype
            from .precision import resolve
            dtype = resolve(precision, obj.num_params(), device if device is not None else obj.device)
        if mode not in MODES:
            raise UserError(f"unknown HVP mode '{mode}'; choose one of {list(MODES)}")
        if batched not in BATCHED:
            raise UserError(f"unknown batched-product method '{batched}'; choose one of {list(BATCHED)}")
        names = obj.resolve(domain)
        if len(names) != 1:
            raise UserError("a Hessian operator takes one domain (a name or 'train'), not 'each'; loop over obj.domains")
        self.domain = names[0]
        self.obj = obj.to(device=device, dtype=dtype) if copy else obj
        self.mode, self.train_mode, self.cache, self.seed = mode, bool(train_mode), bool(cache), int(seed)
        self.max_block = max(1, int(max_block))
        self.batched = batched
        params = self.obj.params()
        if not params:
            raise UserError("the model has no trainable parameters (requires_grad=True); nothing to differentiate")
        self._theta = {k: p.detach() for k, p in params.items()}
        self.dtype = next(iter(self._theta.values())).dtype
        self.device = next(iter(self._theta.values())).device
        self.n = sum(t.numel() for t in self._theta.values())
        # a block's products live together (inputs, outputs and the batched backward's temporaries, about 6
        # n-vectors each): keep a block within BLOCK_BYTES, so a large model multiplies one vector at a time
        per = 6 * self.n * self.dtype.itemsize
        self.max_block = max(1, min(self.max_block, int(BLOCK_BYTES // max(per, 1))))
        self.terms = self.obj.keyed_terms(self.domain)  # (key, coefficient, batch): the key seeds train mode
        self.hvps = 0
        self._graph: tuple[dict[str, torch.Tensor], torch.Tensor | None] | None = None
        self._timing: dict[str, float] = {}  # seconds per vector of each batched method ('auto')

    # -- public products ---------------------------------------------------------------------
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for an (n, b) block of column vectors, computed in batches; returns (n, b)."""
        if V.dim() != 2:
            raise UserError(f"matmat takes an (n, b) block, got shape {tuple(V.shape)}")
        return self._products(self._as_block(V))

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """H v written into `out` (n entries in the operator's dtype, on its device): a product without a fresh
        n-vector, whose page faults cost a large model more than the copy (the lean Lanczos recycles its
        vectors). Falls back to matvec where the product does not come from the cached graph."""
        if self.mode != "double_backward" or not self.cache or out.dtype != self.dtype or out.device != self.device:
            return out.copy_(self.matvec(v))
        self.hvps += 1
        leaves, g = self._cached_graph()
        return self._from_graph(leaves, g, self._as_block(v.reshape(-1, 1)), "loop", out=out)

    def loss(self) -> float:
        """The loss over the operator's batches (weighted like the Hessian), in the operator's mode."""
        total = 0.0
        with torch.no_grad():
            for k, c, batch in self.terms:
                with self._ctx(k):
                    total += c * float(self.obj.functional_loss(self._theta, batch))
        return total

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the loss at the current parameters (detached; free once the graph is cached)."""
        if self.mode == "double_backward" and self.cache:
            _, g = self._cached_graph()
            return torch.zeros(self.n, dtype=self.dtype, device=self.device) if g is None else g.detach().clone()
        return self._grad_at(self._theta)

    def release(self) -> None:
        """Drop the cached gradient graph (it is rebuilt on the next product)."""
        self._graph = None

    # -- internals -----------------------------------------------------------------------------
    def _as_block(self, V: torch.Tensor) -> torch.Tensor:
        if V.shape[0] != self.n:
            raise UserError(f"vector has {V.shape[0]} entries but the model has {self.n} parameters")
        return V.detach().to(device=self.device, dtype=self.dtype)

    @contextlib.contextmanager
    def _ctx(self, key: int | None = None):
        """Eval/train mode, TF32 off, math attention, and (train mode) a forked RNG seeded for batch `key`
        (objective.reseed; None: forked only, the caller reseeds per batch), so dropout masks are fixed."""
        with self.obj.evaluating(self.train_mode), numerics():
            if not self.train_mode:
                yield
                return
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                if key is not None:
                    reseed(self.seed, key, self.device)
                yield

    def _flat(self, grads: Sequence[torch.Tensor | None], like: dict[str, torch.Tensor], batch_shape=(),
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Flatten per-parameter tensors into (*batch_shape, n) (into `out` when given), zeros where unused."""
        parts = [(torch.zeros(*batch_shape, t.numel(), dtype=self.dtype, device=self.device) if g is None
                  else g.reshape(*batch_shape, -1)) for g, t in zip(grads, like.values())]
        return torch.cat(parts, dim=-1) if out is None else torch.cat(parts, dim=-1, out=out)

    def _leaves(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().requires_grad_(True) for k, t in self._theta.items()}

    def _graph_for(self, terms) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Leaves and the flat gradient (with create_graph) of the weighted loss over `terms`."""
        leaves = self._leaves()
        total = None
        for k, c, batch in terms:
            with self._ctx(k):
                loss = self.obj.functional_loss(leaves, batch) * c
                g = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
            flat = self._flat(g, leaves)
            total = flat if total is None else total + flat
        return leaves, (total if total is not None and total.requires_grad else None)

    def _cached_graph(self):
        if self._graph is None:
            self._graph = self._graph_for(self.terms)
        return self._graph

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        b = V.shape[1]
        self.hvps += b
        if b <= self.max_block:  # one block: no output copy (fresh n-vectors cost page faults on large models)
            return self._block(V)
        out = torch.empty_like(V)
        for s in range(0, b, self.max_block):
            out[:, s:s + self.max_block] = self._block(V[:, s:s + self.max_block])
        return out

    def _block(self, V: torch.Tensor) -> torch.Tensor:
        if self.mode == "finite_difference":
            return torch.stack([self._fd(V[:, j]) for j in range(V.shape[1])], dim=1)
        method = self._method(V.shape[1])
        calibrating = self.batched == "auto" and method in ("grads_batched", "fwd_rev") and method not in self._timing
        if calibrating and self.cache:
            self._cached_graph()  # build the graph outside the measurement
        t0 = self._clock()
        out = None
        if method == "fwd_rev":
            try:
                out = self._fwd_rev(V)
            except Exception:  # a model or loss without functorch support: the retained graph instead
                self._timing["fwd_rev"] = math.inf
                if self.batched == "fwd_rev":
                    self.batched = "grads_batched"
                method = "grads_batched"
                calibrating = False
        if out is None:
            if self.cache:
                leaves, g = self._cached_graph()
                out = self._from_graph(leaves, g, V, method)
            else:
                out = torch.zeros_like(V)
                for term in self.terms:
                    leaves, g = self._graph_for([term])
                    out += self._from_graph(leaves, g, V, method)
        if calibrating:
            self._timing[method] = (self._clock() - t0) / V.shape[1]
        return out

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _method(self, b: int) -> str:
        """The product method for a block of b vectors; 'auto' times both batched methods once, then keeps the
        faster (double backward on a retained graph with is_grads_batched, or vmapped forward-over-reverse)."""
        if b == 1 or self.batched == "loop":
            return "loop"
        if self.batched != "auto":
            return self.batched
        if self.train_mode:  # dropout masks must match the cached graph's
            return "grads_batched"
        if self.device.type == "cpu" and self.cache and self._timing.get("grads_batched") != math.inf:
            # on CPUs double backward on the retained graph is the faster one (anchors.md), and trying
            # forward-over-reverse costs seconds of torch.func warm-up per process
            return "grads_batched"
        for m in ("grads_batched", "fwd_rev"):
            if m not in self._timing:
                return m
        best = min(self._timing, key=self._timing.get)
        return "loop" if math.isinf(self._timing[best]) else best

    def _from_graph(self, leaves, g, V: torch.Tensor, method: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """H V from a flat gradient graph: one batched backward, or a loop of backwards; `out` (one vector, the
        loop): H v written into it (an n-vector) and returned."""
        if g is None:  # the loss is (at most) linear in the parameters
            return torch.zeros_like(V) if out is None else out.zero_()
        inputs = list(leaves.values())
        with numerics():
            if method == "grads_batched":
                try:
                    hv = torch.autograd.grad(g, inputs, grad_outputs=V.T.contiguous(), retain_graph=True,
                                             allow_unused=True, is_grads_batched=True)
                    return self._flat(hv, leaves, (V.shape[1],)).T
                except RuntimeError:  # an op without a batching rule: loop instead from now on
                    self._timing["grads_batched"] = math.inf
                    if self.batched == "grads_batched":
                        self.batched = "loop"
            cols = []
            for j in range(V.shape[1]):
                hv = torch.autograd.grad(g, inputs, grad_outputs=V[:, j], retain_graph=True, allow_unused=True)
                cols.append(self._flat(hv, leaves, out=out))
            if out is not None:
                return out
            return cols[0][:, None] if len(cols) == 1 else torch.stack(cols, dim=1)

    def _fwd_rev(self, V: torch.Tensor) -> torch.Tensor:
        """H V by vmapped forward-over-reverse (torch.func): no retained graph, one pass per block."""
        from torch.func import grad, jvp, vmap

        keys = list(self._theta)
        primals = tuple(self._theta[k] for k in keys)
        def loss(*ps):
            p = dict(zip(keys, ps))
            total = 0
            for k, c, b in self.terms:
                if self.train_mode:
                    reseed(self.seed, k, self.device)  # the masks of the graph-based products (vmap: randomness="same")
                total = total + self.obj.functional_loss(p, b) * c
            return total

        def hv(v):
            tangents = tuple(unflatten(v, self._theta).values())
            out = jvp(grad(loss, argnums=tuple(range(len(keys)))), primals, tangents)[1]
            return torch.cat([o.reshape(-1) for o in out])

        with self._ctx(None), warnings.catch_warnings():
            # torch's own forward-AD decompositions call the deprecated torch.jit.script: not the user's concern
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
            return vmap(hv, randomness="same")(V.T.contiguous()).T

    def _grad_at(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat gradient of the weighted loss at parameters `theta` (no graph kept)."""
        total = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for key, c, batch in self.terms:
            leaves = {k: t.detach().requires_grad_(True) for k, t in theta.items()}
            with self._ctx(key):
                loss = self.obj.functional_loss(leaves, batch) * c
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            total += self._flat(g, leaves)
        return total

    def _fd(self, v: torch.Tensor) -> torch.Tensor:
        """Central difference of gradients: (g(theta + h v) - g(theta - h v)) / 2h, h ~ eps^(1/3)."""
        vn = float(v.norm())
        if vn == 0.0:
            return torch.zeros_like(v)
        theta = flatten(self._theta)
        eps = torch.finfo(self.dtype).eps
        h = eps ** (1.0 / 3.0) * max(1.0, float(theta.norm())) / vn
        plus = self._grad_at(unflatten(theta + h * v, self._theta))
        minus = self._grad_at(unflatten(theta - h * v, self._theta))
        return (plus - minus) / (2.0 * h)


def curvature_along(obj: Objective, directions: Sequence[torch.Tensor], domain: str | None = None, *,
                    dtype: torch.dtype = torch.float64, train_mode: bool = False,
                    mode: str = "double_backward", seed: int = 0) -> list[float]:
    """u^T H u / u^T u for each flat direction u (obj.params() order): the curvature of the loss along u.

    A zero direction has no curvature and gives NaN (null in JSON). train_mode: the Hessian of the train-mode
    loss with each batch's dropout masks fixed by `seed` (HessianOperator).
    """
    if not len(directions):
        return []
    op = HessianOperator(obj, domain, dtype=dtype, train_mode=train_mode, mode=mode, seed=seed)
    from . import distributed
    if distributed.active():  # under torchrun: this rank's batches, the products all-reduced
        op = distributed.shard_operator(op)
    U = torch.stack([torch.as_tensor(u).reshape(-1).to(device=op.device, dtype=op.dtype) for u in directions], dim=1) \
        if all(torch.as_tensor(u).numel() == op.n for u in directions) else None
    if U is None:
        bad = [torch.as_tensor(u).numel() for u in directions]
        raise UserError(f"directions have {bad} entries but the model has {op.n} parameters")
    HU = op.matmat(U)
    op.release()
    num = (U * HU).sum(0)
    den = (U * U).sum(0)
    return [float(a / b) if float(b) > 0 else float("nan") for a, b in zip(num, den)]
