"""What a flatness run will cost before it starts: peak memory = model copy + one product's graph and
temporaries + the Lanczos basis (or the trace sketch), and products x the measured seconds of one product."""
from __future__ import annotations

import dataclasses
import time

import torch

from .result import Result

GiB = 2.0 ** 30


@dataclasses.dataclass
class CostEstimate(Result):
    """The memory formula's terms (bytes), the products expected and their measured unit time."""

    num_params: int
    precision: str
    own_weights: bool
    model_bytes: float  # the private copy of the model (0 on its own weights)
    graph_bytes: float  # the cached gradient graph of one domain (measured: tensors saved for backward)
    product_bytes: float  # one product's temporaries (6 n-vectors and about half the graph per vector)
    basis_bytes: float  # the Lanczos basis as the expected run grows it, with the Ritz vectors it returns
    basis_max_bytes: float  # the basis at its largest (a long run)
    trace_bytes: float  # the trace's sketch and probe block (with the block product's extra vectors)
    peak_bytes: float  # model + graph + product + max(basis, trace) + working vectors + 2 basis chunks
    eigen_products: int  # expected for the eigenvalues (a rough figure: it depends on the spectrum)
    eigen_budget: int
    trace_products: int  # at most
    seconds_per_product: float | None
    seconds: float | None  # (eigen_products + trace_products) x seconds_per_product, per domain
    basis_on_disk: bool = False  # the rows in a temporary file (they did not fit in memory)
    basis_rows: int = 0  # the most rows a run keeps before it restarts

    def lines(self) -> list[str]:
        """The estimate as the CLI prints it."""
        out = [f"estimate: {self.num_params:,} parameters, {self.precision} products"
               + (" on the model's own weights" if self.own_weights else " on a private copy"),
               f"  memory ~ {self.peak_bytes / GiB:.2f} GiB = model copy {self.model_bytes / GiB:.2f} + graph "
               f"{self.graph_bytes / GiB:.2f} + product {self.product_bytes / GiB:.2f} + max(basis "
               f"{self.basis_bytes / GiB:.2f} (at most {self.basis_max_bytes / GiB:.2f}; {self.basis_rows} rows"
               f"{' in a temporary file' if self.basis_on_disk else ''}), trace "
               f"{self.trace_bytes / GiB:.2f}) + vectors"]
        t = "" if self.seconds is None else (f"; one product {self.seconds_per_product:.3g} s, about "
                                             f"{self.seconds / 60:.1f} min per domain")
        out.append(f"  products ~ {self.eigen_products} for the eigenvalues (rough: clustered ends take more, up to "
                   f"the budget {self.eigen_budget}) + at most "
                   f"{self.trace_products} for the trace{t}")
        return out


def _saved_bytes(fn) -> float:
    """Bytes of the tensors autograd saves while fn() runs (distinct storages, parameters excluded)."""
    seen, total = set(), [0.0]

    def pack(t):
        try:
            s = t.untyped_storage()
            key = (s.data_ptr(), s.nbytes())
            if key not in seen:
                seen.add(key)
                total[0] += s.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def expected_eigen_products(k: int, which: str) -> int:
    """A rough count for lanczos to tol 1e-4 with its multiplicity check (observed on the bench GPTs: about
    25 for the top one, 50 for 5 at both ends)."""
    kw = k * (2 if which == "both" else 1)
    return int(14 + 3.5 * kw)


def flatness_estimate(obj, *, domain=None, k: int = 5, which: str = "both", trace: bool = True,
                      trace_method: str = "hutch++", trace_probes: int | None = None, trace_max_probes: int = 200,
                      max_hvps: int | None = None, precision: str = "auto", dtype=None, device=None,
                      train_mode: bool = False, basis_bytes: float | None = None, time_one: bool = True,
                      seed: int = 0) -> CostEstimate:
    """The cost of flatness(obj, ...) on one domain (default the training loss), from one gradient graph (its
    saved tensors measured) and, with `time_one`, one timed product; nothing of it is kept."""
    from . import precision as prec
    from .eigen import _ends, run_plan
    from .hvp import HessianOperator
    from .trace import probe_block, sketch_fits

    n = obj.num_params()
    dt = prec.resolve(precision, n, device if device is not None else obj.device, dtype)
    own = obj.dtype == dt and (device is None or torch.device(device) == obj.device)
    item = torch.empty(0, dtype=dt).element_size()
    buffers = sum(b.numel() * b.element_size() for b in obj.model.buffers())
    model_bytes = 0.0 if own else float(n * item + buffers)
    work = obj if own else obj.to(device=device, dtype=dt)
    op = HessianOperator(work, domain, copy=False, train_mode=train_mode, seed=seed)
    with work.preserved(train_mode, seed=None):
        graph, _ = _saved_bytes(op._cached_graph)
        graph += 2 * n * item  # the flat gradient and its per-parameter parts
        sec = None
        if time_one:
            v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            t0 = time.perf_counter()
            op.matvec(v)
            sec = time.perf_counter() - t0
    op.release()
    kw = k * len(_ends(which))
    plan = run_plan(n, kw, dt, basis_bytes)  # lanczos._lanczos_run's
    lean = plan.lean
    row = 0 if plan.disk else plan.row_bytes(n)  # rows in a file take no resident memory
    expect = expected_eigen_products(k, which)
    budget = int(max_hvps) if max_hvps else max(500, 20 * kw)
    rows = min(plan.rows + 1, int(0.6 * expect) + 1)  # the main run's share; the check's own basis is smaller
    basis = float(rows * row + kw * (4 if lean else 8) * n)
    basis_max = float(plan.resident_bytes(n, kw))
    per_vector = 6 * n * item + 0.5 * graph  # a batched backward's buffers per vector (about half the graph)
    product = float(per_vector)  # the eigenvalues multiply one vector at a time
    tr_products = 0 if not trace else int(trace_probes if trace_probes is not None else trace_max_probes)
    tr_bytes = 0.0
    if trace:
        s = max(1, tr_products // 10)
        block = min(probe_block(n, 10), op.max_block)
        tr_bytes = float((4 * s * n * 8 if trace_method == "hutch++" and sketch_fits(n, s) else 0)
                         + 3 * block * n * 8 + (block - 1) * per_vector)  # the probes' block product
    from .basis import Basis
    # + the working vectors (lean: 2 float32; else 4 float64) and the basis's float64 column chunks (two at a time)
    work_vectors = 2 * 4 * n if lean else 4 * 8 * n
    peak = model_bytes + graph + product + max(basis, tr_bytes) + work_vectors + 2 * min(Basis.CHUNK_BYTES, 8 * n)
    return CostEstimate(num_params=n, precision=prec.name(dt), own_weights=bool(own), model_bytes=model_bytes,
                        basis_on_disk=bool(plan.disk), basis_rows=int(plan.rows),
                        graph_bytes=float(graph), product_bytes=product, basis_bytes=basis, basis_max_bytes=basis_max,
                        trace_bytes=tr_bytes, peak_bytes=float(peak), eigen_products=expect, eigen_budget=budget,
                        trace_products=tr_products, seconds_per_product=sec,
                        seconds=None if sec is None else sec * (expect + tr_products))
