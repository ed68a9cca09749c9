"""PyHessian (Yao et al. 2020) as an independent cross-check of the top eigenvalues and the trace.

What is compared: PyHessian differentiates the same loss as our operator -- the objective's domain loss, the
obj.terms() weighted sum of batch losses -- at the same parameters, in the same dtype and train/eval mode (train mode: each batch's dropout masks
seeded by objective.batch_seed(seed, key), as ours).
One batch uses its single-batch path (one retained graph); several batches use its dataloader path, with
each batch's loss scaled so that PyHessian's size-weighted mean equals the weighted sum. Its defects on
torch 2.x are worked around: it gets a private copy (its model.eval() cannot touch the caller's model),
unused parameters are kept in the graph by a term 0 * sum(p^2) (its float 0 gradients crash autograd), its
trace runs a fixed probe count (its stopping rule divides by the signed mean) and we compute the standard
error; density() (which calls the removed torch.eig) is never called. Its power iteration finds the top
eigenvalues by magnitude, to its own tolerance (relative change between iterations, default 1e-3).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import warnings

import numpy as np
import torch

from nexus_opt.errors import UserError

from .hvp import HessianOperator, numerics
from .lanczos import EigenResult
from .objective import Objective, batch_rng
from .trace import TraceEstimate


def _import():
    try:  # the module, not the class that pyhessian/__init__ re-exports under the same name
        return importlib.import_module("pyhessian.hessian")
    except ImportError:
        raise UserError("the pyhessian backend needs PyHessian: pip install pyhessian") from None


class _LossModel(torch.nn.Module):
    """Presents (model, loss_fn, batches) as PyHessian's model: input = batch index, output = scaled loss."""

    def __init__(self, obj: Objective, keyed_terms, scale: float, train_mode: bool, seed: int):
        super().__init__()
        self.inner, self.loss_fn = obj.model, obj.loss_fn
        self.keys = [k for k, _, _ in keyed_terms]
        self.batches = [b for _, _, b in keyed_terms]
        self.coefs = [c * scale for _, c, _ in keyed_terms]
        self.mode, self.seed, self.device = train_mode, int(seed), obj.device
        self.inner.train(train_mode)

    def train(self, mode: bool = True):  # PyHessian calls model.eval(): keep the requested mode instead
        self.inner.train(self.mode)
        return self

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        i = int(index.reshape(-1)[0])
        # train mode: the masks of our operators, on a forked RNG (PyHessian draws its probes from the global one)
        with batch_rng(self.seed if self.mode else None, self.keys[i], self.device):
            loss = self.loss_fn(self.inner, self.batches[i]) * self.coefs[i]
        keep = sum((p * p).sum() for p in self.inner.parameters() if p.requires_grad)
        return loss + 0.0 * keep  # every parameter reaches the loss; its Hessian is unchanged


class _Session:
    """One PyHessian `hessian` object on a private copy, counting its Hessian-vector products."""

    def __init__(self, obj: Objective, domain, dtype, train_mode: bool, device=None, seed: int = 0):
        ph = _import()
        self.ph = ph
        work = obj.to(device=device, dtype=dtype)
        self.work, self.domain = work, work.resolve(domain)
        if len(self.domain) != 1:
            raise UserError("the pyhessian backend takes one domain at a time")
        self.terms = work.keyed_terms(self.domain[0])
        self.dtype = work.dtype
        self.hvps = 0
        single = len(self.terms) == 1
        self.model = _LossModel(work, self.terms, 1.0 if single else float(len(self.terms)), train_mode, seed)
        cuda = work.device.type == "cuda"
        counter = self

        class Counting(ph.hessian):
            def dataloader_hv_product(self, v):
                counter.hvps += 1
                return super().dataloader_hv_product(v)

        target = torch.zeros(1, dtype=self.dtype)
        with self.context():
            if single:
                self.h = Counting(self.model, lambda out, y: out, data=(torch.zeros(1, dtype=torch.long), target),
                                  cuda=cuda)
            else:
                loader = [(torch.full((1,), i, dtype=torch.long), target) for i in range(len(self.terms))]
                self.h = Counting(self.model, lambda out, y: out, dataloader=loader, cuda=cuda)

    @contextlib.contextmanager
    def context(self, seed: int | None = None):
        """Default dtype = the work dtype (its random vectors), TF32 off, HVP counting, a seeded RNG."""
        ph = self.ph
        orig = ph.hessian_vector_product
        old_dtype = torch.get_default_dtype()

        def counted(gradsH, params, v):
            self.hvps += 1
            return orig(gradsH, params, v)

        devices = [self.work.device] if self.work.device.type == "cuda" else []
        ph.hessian_vector_product = counted
        if self.dtype in (torch.float32, torch.float64):
            torch.set_default_dtype(self.dtype)
        try:
            with numerics(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*create_graph=True.*")
                if seed is not None:
                    torch.manual_seed(seed)
                yield
        finally:
            ph.hessian_vector_product = orig
            torch.set_default_dtype(old_dtype)


def pyhessian_eigen(obj: Objective, k: int = 5, domain=None, *, seed: int = 0, max_iter: int = 100,
                    tol: float = 1e-3, dtype=torch.float64, train_mode: bool = False, device=None,
                    check: bool = True) -> EigenResult:
    """PyHessian's top-k eigenvalues (deflated power iteration, by magnitude), its HVP count, and (check)
    residuals ||Hv - lambda v|| of its vectors measured with our operator (not counted in hvps); `converged`
    is our test of its vectors: residual <= sqrt(tol) |lambda| (power iteration stalls at eigenvalue changes
    of tol)."""
    s = _Session(obj, domain, dtype, train_mode, device, seed)
    with s.context(seed):
        vals, vecs = s.h.eigenvalues(maxIter=max_iter, tol=tol, top_n=int(k))
    order = np.argsort(-np.asarray(vals), kind="stable")
    vals = [float(vals[i]) for i in order]
    V = torch.stack([torch.cat([t.detach().reshape(-1) for t in vecs[i]]) for i in order], dim=1)
    hvps = s.hvps
    del s
    res = [float("nan")] * len(vals)
    if check:
        op = HessianOperator(obj, domain, dtype=dtype, train_mode=train_mode, device=device, seed=seed)
        V = V.to(device=op.device, dtype=op.dtype)
        V = V / V.norm(dim=0, keepdim=True)
        R = op.matmat(V) - V * torch.tensor(vals, dtype=op.dtype, device=op.device)[None, :]
        res = R.norm(dim=0).cpu().tolist()
    return EigenResult(which="top", eigenvalues=vals, residuals=res,
                       converged=[bool(r <= math.sqrt(tol) * abs(v)) if not math.isnan(r) else False
                                  for v, r in zip(vals, res)],
                       errors=list(res), hvps=hvps, iterations=hvps, backend="pyhessian",
                       vectors=V.detach().to("cpu", torch.float64) if check else None)


def pyhessian_trace(obj: Objective, domain=None, probes: int = 100, *, seed: int = 0, dtype=torch.float64,
                    train_mode: bool = False, device=None) -> TraceEstimate:
    """PyHessian's Hutchinson trace with a fixed probe count (tol=-inf disables its stopping rule) and our
    standard error (sample std / sqrt(probes))."""
    if probes < 2:
        raise UserError(f"the trace needs at least 2 probes for an error bar, got {probes}")
    s = _Session(obj, domain, dtype, train_mode, device, seed)
    with s.context(seed):
        x = np.asarray(s.h.trace(maxIter=int(probes), tol=-math.inf), dtype=float)
    return TraceEstimate(method="pyhessian-hutchinson", estimate=float(x.mean()),
                         stderr=float(x.std(ddof=1) / math.sqrt(len(x))), probes=len(x), hvps=s.hvps, seed=seed,
                         samples=x.tolist())
