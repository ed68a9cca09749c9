"""The Lanczos basis: rows on the CPU grown as a run needs them, float64 (or float32 where memory requires),
with float64 inner products; released whole at a restart."""
from __future__ import annotations

import numpy as np
import torch


class Basis:
    """The Lanczos basis rows on the CPU, grown as the run needs them (blocks of 32 float64 rows, or single
    float32 rows when memory requires them) and released whole at a restart: nothing is allocated ahead of
    use. Inner products and updates are in float64 either way."""

    BLOCK = 32

    def __init__(self, n: int, dtype: torch.dtype, cap: int):
        self.n, self.dtype, self.cap = int(n), dtype, int(cap)
        self.blocks: list[torch.Tensor] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _rows(self):
        left = self.count
        for b in self.blocks:
            take = min(left, b.shape[0])
            if take <= 0:
                return
            yield b[:take]
            left -= take

    def append(self, v: torch.Tensor) -> None:
        """Add a unit row (float64 in; stored in the basis dtype)."""
        used = sum(b.shape[0] for b in self.blocks)
        if self.count == used:
            size = 1 if self.dtype != torch.float64 else max(1, min(self.BLOCK, self.cap - used))
            self.blocks.append(torch.empty(size, self.n, dtype=self.dtype))
        row, b = self.count, 0
        while row >= self.blocks[b].shape[0]:
            row -= self.blocks[b].shape[0]
            b += 1
        self.blocks[b][row] = v
        self.count += 1

    def row(self, i: int) -> torch.Tensor:
        for b in self._rows():
            if i < b.shape[0]:
                return b[i].to(torch.float64)
            i -= b.shape[0]
        raise IndexError(i)

    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """B w (float64, one entry per row)."""
        if self.dtype == torch.float64:
            return torch.cat([b @ w for b in self._rows()])
        return torch.stack([torch.dot(r.to(torch.float64), w) for b in self._rows() for r in b])

    def subtract(self, w: torch.Tensor, h: torch.Tensor) -> None:
        """w -= B^T h, in place."""
        s = 0
        for b in self._rows():
            if self.dtype == torch.float64:
                w -= b.T @ h[s:s + b.shape[0]]
            else:
                for i, r in enumerate(b):
                    w.add_(r, alpha=-float(h[s + i]))
            s += b.shape[0]

    def combine(self, S: np.ndarray) -> torch.Tensor:
        """B^T S: the (n, c) float64 combinations of the rows with the columns of S (rows of S = basis rows)."""
        S = torch.from_numpy(np.ascontiguousarray(S, dtype=np.float64))
        out = torch.zeros(self.n, S.shape[1], dtype=torch.float64)
        s = 0
        for b in self._rows():
            if self.dtype == torch.float64:
                out += b.T @ S[s:s + b.shape[0]]
            else:
                for i, r in enumerate(b):
                    for c in range(S.shape[1]):
                        out[:, c].add_(r, alpha=float(S[s + i, c]))
            s += b.shape[0]
        return out

    def reset(self, Y: torch.Tensor) -> None:
        """Release every row and start again from the columns of Y (n, c)."""
        self.blocks, self.count = [], 0
        for c in range(Y.shape[1]):
            self.append(Y[:, c])
