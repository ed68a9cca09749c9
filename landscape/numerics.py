"""The numerical context of curvature work: TF32 off, the math attention kernel (double backward), and the
CPU thread count for small models."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SMALL_MODEL = 100_000  # parameters: below this a CPU product is too small to share across threads


@contextlib.contextmanager
def numerics() -> Iterator[None]:
    """TF32 off and the math attention kernel (the fused ones have no double backward); restored after."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with math_sdpa():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


def math_sdpa():
    """The context that restricts scaled_dot_product_attention to its math backend (any torch >= 2.1)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)




@contextlib.contextmanager
def cpu_threads_for(n_params: int, device) -> Iterator[None]:
    """One intra-op thread for curvature work on a small model on the CPU, restored after: thread barriers
    dominate products this small (flatness of a 1,377-parameter MLP took 4.5 s on one thread and 153 s on
    two busy cores). `LANDSCAPE_THREADS=N` sets the count instead."""
    import os

    want = os.environ.get("LANDSCAPE_THREADS")
    cpu = torch.device(device).type == "cpu" if device is not None else True
    n = int(want) if want and want.isdigit() and int(want) > 0 else (1 if cpu and n_params < SMALL_MODEL else None)
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
