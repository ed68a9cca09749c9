"""The Lanczos basis: rows in memory (float64, or float32 where memory requires) or in a temporary file when
even float32 rows do not fit; every inner product, update and restart is done in float64 (float32 rows a
column chunk at a time), so no full-length float64 temporary beyond one vector is ever made."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


class Basis:
    """At most `cap` basis rows of n entries. In memory the rows are one torch.empty block (pages become resident
    only as rows are written, so a run that converges early holds only what it used); on disk (`disk=True`)
    they are float32 rows of a temporary file read and written a column chunk at a time (pread/pwrite: the
    process's resident memory stays one chunk). Inner products, updates and restarts are float64 either way."""

    CHUNK_BYTES = 2 ** 24  # the float64 column chunk of all rows that one operation holds at a time

    def __init__(self, n: int, dtype: torch.dtype, cap: int, disk: bool = False, directory: str | None = None):
        self.n, self.cap, self.count = int(n), int(cap), 0
        self.disk = bool(disk)
        self.dtype = torch.float32 if self.disk else dtype
        self._fd = self.X = self._buf = self._buf32 = None
        if self.disk:  # unlinked at once: the open descriptor keeps it, and no kill leaves gigabytes behind
            folder = tempfile.mkdtemp(prefix="landscape-basis-", dir=directory)
            path = os.path.join(folder, "rows.f32")
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(path)
            os.rmdir(folder)
        else:
            self.X = torch.empty(self.cap, self.n, dtype=self.dtype)

    def __len__(self) -> int:
        return self.count

    def __del__(self):
        self.close()

    def close(self) -> None:
        """Release the rows (closing the file frees its blocks)."""
        self.X = self._buf = self._buf32 = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- storage ------------------------------------------------------------------------------
    def _chunks(self, rows: int):
        step = max(1024, int(self.CHUNK_BYTES // (8 * max(rows, 1))))
        for a in range(0, self.n, step):
            yield a, min(self.n, a + step)

    def _scratch(self, rows: int, cols: int) -> torch.Tensor:
        """A float64 (rows, cols) view of one reused chunk buffer (fresh chunks would cost page faults)."""
        need = rows * cols
        if self._buf is None or self._buf.numel() < need:
            self._buf = torch.empty(max(need, self.CHUNK_BYTES // 8), dtype=torch.float64)
        return self._buf[:need].view(rows, cols)

    def _get(self, lo: int, hi: int, a: int, b: int) -> torch.Tensor:
        """Rows lo..hi-1, columns a..b-1, as float64 (hi - lo, b - a): a view of the rows where they are float64
        in memory, else the reused chunk buffer (valid until the next call)."""
        if not self.disk and self.dtype == torch.float64:
            return self.X[lo:hi, a:b]
        out = self._scratch(hi - lo, b - a)
        if not self.disk:
            return out.copy_(self.X[lo:hi, a:b])
        if self._buf32 is None or self._buf32.size < out.numel():
            self._buf32 = np.empty(self._buf.numel(), dtype=np.float32)
        buf = self._buf32[:out.numel()].reshape(hi - lo, b - a)
        for r in range(lo, hi):
            got = os.preadv(self._fd, [memoryview(buf[r - lo])], 4 * (r * self.n + a))
            if got != 4 * (b - a):
                raise OSError(f"short read from the Lanczos basis file ({got} of {4 * (b - a)} bytes)")
        return out.copy_(torch.from_numpy(buf))

    def _put(self, lo: int, a: int, b: int, T: torch.Tensor) -> None:
        """Rows lo.. (as many as T has), columns a..b-1, from the float64 block T."""
        if not self.disk:
            self.X[lo:lo + T.shape[0], a:b] = T
            return
        blk = np.ascontiguousarray(T.to(torch.float32).numpy())
        for r in range(T.shape[0]):
            data = memoryview(blk[r]).cast("B")
            done = os.pwrite(self._fd, data, 4 * ((lo + r) * self.n + a))
            if done != len(data):
                raise OSError("short write to the Lanczos basis file (disk full?)")

    # -- the operations Lanczos needs ------------------------------------------------------------
    def append(self, v: torch.Tensor) -> None:
        """Add a unit row (float64 in; stored in the basis dtype)."""
        if self.count >= self.cap:
            raise IndexError("the Lanczos basis is full")
        self._put(self.count, 0, self.n, v.reshape(1, -1))
        self.count += 1

    def row(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self._get(i, i + 1, 0, self.n)[0]

    def _whole(self) -> torch.Tensor | None:
        """The rows themselves where they are float64 in memory (no chunked conversion needed), else None."""
        return self.X[:self.count] if not self.disk and self.dtype == torch.float64 else None

    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """B w (float64, one entry per row)."""
        X = self._whole()
        if X is not None:
            return X @ w
        h = torch.zeros(self.count, dtype=torch.float64)
        for a, b in self._chunks(self.count):
            h += self._get(0, self.count, a, b) @ w[a:b]
        return h

    def subtract(self, w: torch.Tensor, h: torch.Tensor) -> None:
        """w -= B^T h, in place."""
        X = self._whole()
        if X is not None:
            w.addmv_(X.T, h, alpha=-1.0)
            return
        for a, b in self._chunks(self.count):
            w[a:b].addmv_(self._get(0, self.count, a, b).T, h, alpha=-1.0)

    def combine(self, S: np.ndarray) -> torch.Tensor:
        """B^T S: the (n, c) float64 combinations of the rows with the columns of S (rows of S = basis rows)."""
        S = torch.from_numpy(np.ascontiguousarray(S, dtype=np.float64))
        out = torch.empty(self.n, S.shape[1], dtype=torch.float64)
        for a, b in self._chunks(self.count):
            out[a:b] = self._get(0, self.count, a, b).T @ S
        return out

    def restart(self, S: np.ndarray) -> None:
        """Replace the rows by the combinations B^T S (thick restart), in place a column chunk at a time: no
        (n, c) temporary."""
        S = torch.from_numpy(np.ascontiguousarray(S, dtype=np.float64))
        m, c = self.count, S.shape[1]
        for a, b in self._chunks(m):
            self._put(0, a, b, S.T @ self._get(0, m, a, b))
        self.count = c
