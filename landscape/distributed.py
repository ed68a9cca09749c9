"""Curvature and gradients beyond one process: batches sharded across torch.distributed ranks, all-reduced.

Every loss here is a weighted sum of batch terms c_b L_b (Objective.terms). Rank r keeps the terms with
index = r mod world_size, with their global coefficients, so the all-reduced sum of the ranks' partial
products, losses and gradients is the one-process value (up to summation order). Every rank then runs the
same (deterministic) eigensolver on identical products; only rank 0 should write or print.
"""
from __future__ import annotations

import os

import torch

from nexus_opt.errors import UserError

from .gradients import domain_gradient  # noqa: F401  (sharded here; one implementation)
from .hvp import CurvatureOperator


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files and prints tables."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env() -> bool:
    """Initialise the process group from torchrun's environment (gloo on CPU, nccl with CUDA); False if not
    launched by torchrun or already initialised."""
    import torch.distributed as dist
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise UserError("launched by torchrun but torch.distributed has no gloo backend; run without torchrun")
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def allreduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over every rank (every rank gets it): how sharded products, losses and gradients combine."""
    import torch.distributed as dist
    t = t.contiguous()
    dist.all_reduce(t)
    return t


def broadcast_choice(value: str, choices) -> str:
    """Rank 0's `value` (one of `choices`) on every rank: a choice made once (e.g. by timing) for the run."""
    import torch.distributed as dist
    choices = list(choices)
    nccl = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([choices.index(value) if dist.get_rank() == 0 else 0], dtype=torch.int64, device=dev)
    dist.broadcast(t, src=0)
    return choices[int(t.item())]


def shard(terms: list) -> list:
    """This rank's share of the terms ((coefficient, batch) or keyed (key, coefficient, batch)), unchanged."""
    import torch.distributed as dist
    r, w = dist.get_rank(), dist.get_world_size()
    return [t for i, t in enumerate(terms) if i % w == r]


class ShardedOperator(CurvatureOperator):
    """Wraps a curvature operator (HessianOperator or GGNOperator): its terms cut to this rank's share, each
    product, loss and gradient all-reduced (sum) over ranks."""

    def __init__(self, op):
        self.op = op
        op.terms = shard(list(op.terms))
        op.release()

    @property
    def kind(self) -> str:
        return self.op.kind

    def __getattr__(self, name):  # n, dtype, device, domain, hvps, ... come from the wrapped operator
        return getattr(self.op, name)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return allreduce(self.op.matmat(V))

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The lean Lanczos's product into `out`, all-reduced in place (defined here: __getattr__ would hand
        out the wrapped operator's, this rank's share only)."""
        inner = getattr(self.op, "matvec_into", None)
        return allreduce(inner(v, out) if inner is not None else out.copy_(self.op.matvec(v)))

    def loss(self) -> float:
        return float(allreduce(torch.tensor([self.op.loss()], dtype=torch.float64))[0])

    def gradient(self) -> torch.Tensor:
        return allreduce(self.op.gradient())

    def release(self):
        self.op.release()


def shard_operator(op):
    return ShardedOperator(op)


def gradient_cosines(obj, domains=None) -> dict:
    """Cosines between full-batch domain gradients, batches sharded over ranks (all-reduced): {"domains",
    "cosine" (K x K), "norms", "loss"}; the same numbers on every rank."""
    names = list(obj.domains) if domains is None else list(domains)
    gs, losses = {}, {}
    for d in names:
        gs[d], losses[d] = domain_gradient(obj, d, train_mode=False)
    G = torch.stack([gs[d] for d in names])
    nrm = G.norm(dim=1)
    C = (G @ G.T) / torch.outer(nrm, nrm)
    return {"domains": names, "cosine": C.clamp(-1, 1).tolist(), "norms": dict(zip(names, nrm.tolist())),
            "loss": losses}
