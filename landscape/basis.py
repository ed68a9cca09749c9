"""The Lanczos basis: rows in memory (float64, or float32 where memory requires) or in a temporary file when
even float32 rows do not fit; every inner product, update and restart is done in float64 (float32 rows a
column chunk at a time), so no full-length float64 temporary beyond one vector is ever made."""
from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import torch

DOT_STEP = 2 ** 16  # entries per chunk of dot64, converted into two reused 512 KiB float64 buffers
_LOCAL = threading.local()  # the reused float64 chunk buffers, per thread


def _as64(x: torch.Tensor, a: int, slot: int, b: int | None = None) -> torch.Tensor:
    """x[a:b] (default a chunk of DOT_STEP) in float64: a view where x is float64, else a copy in reused buffer
    `slot` (a fresh block per chunk would cost allocations; slots 0 and 1 serve dot64, 2 the basis)."""
    xs = x[a:a + DOT_STEP if b is None else b]
    if xs.dtype == torch.float64:
        return xs
    bufs = getattr(_LOCAL, "chunks", None)
    if bufs is None:
        bufs = _LOCAL.chunks = [None, None, None]
    if bufs[slot] is None or bufs[slot].numel() < xs.numel():
        bufs[slot] = torch.empty(max(xs.numel(), DOT_STEP), dtype=torch.float64)
    return bufs[slot][:xs.numel()].copy_(xs)


def dot64(x: torch.Tensor, y: torch.Tensor) -> float:
    """x . y in float64 for CPU vectors of any float dtype, a chunk at a time (no n-length float64 temporary):
    a float32 dot over millions of entries loses digits the Lanczos recurrence needs. Float64 and accelerator
    tensors: one dot."""
    if (x.dtype == torch.float64 and y.dtype == torch.float64) or x.device.type != "cpu":
        return float(torch.dot(x.double(), y.double()))  # an accelerator: one kernel beats a loop of syncs
    return float(sum(float(torch.dot(_as64(x, a, 0), _as64(y, a, 1))) for a in range(0, x.numel(), DOT_STEP)))


def norm64(x: torch.Tensor) -> float:
    return dot64(x, x) ** 0.5


def dots64(w: torch.Tensor, rows) -> np.ndarray:
    """[r . w for r in rows] + [w . w] in float64, in one sweep over w (each chunk of w converted once)."""
    out = np.zeros(len(rows) + 1)
    for a in range(0, w.numel(), DOT_STEP):
        c = _as64(w, a, 0)
        for i, r in enumerate(rows):
            out[i] += float(torch.dot(_as64(r, a, 1), c))
        out[-1] += float(torch.dot(c, c))
    return out


class Basis:
    """At most `cap` basis rows of n entries. In memory the rows are one torch.empty block (pages become resident
    only as rows are written, so a run that converges early holds only what it used); on disk (`disk=True`)
    they are float32 rows of a temporary file read and written a column chunk at a time (pread/pwrite: the
    process's resident memory stays one chunk). Inner products, updates and restarts are float64 either way."""

    CHUNK_BYTES = 2 ** 22  # the float64 column chunk of all rows that one operation holds at a time

    def __init__(self, n: int, dtype: torch.dtype, cap: int, disk: bool = False, directory: str | None = None):
        self.n, self.cap, self.count = int(n), int(cap), 0
        self.disk = bool(disk)
        self.dtype = dtype if dtype == torch.float64 or not self.disk else torch.float32  # a file: float32 or 64
        self._item = self.dtype.itemsize
        self._fd = self.X = self._buf = self._buf32 = None
        self._pending = None  # the background write of the last appended row (disk), joined before any read
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
        self._join()
        self.X = self._buf = self._buf32 = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- storage ------------------------------------------------------------------------------
    def _chunk_bytes(self) -> int:
        """CHUNK_BYTES, or half a float32 row's worth where that is less (a small model's chunk stays small:
        beside two float32 vectors, a lean run's whole resident share)."""
        return max(2 ** 16, min(self.CHUNK_BYTES, 2 * self.n))

    def _chunks(self, rows: int):
        step = max(1024, int(self._chunk_bytes() // (8 * max(rows, 1))))
        for a in range(0, self.n, step):
            yield a, min(self.n, a + step)

    def _scratch(self, rows: int, cols: int) -> torch.Tensor:
        """A float64 (rows, cols) view of one reused chunk buffer (fresh chunks would cost page faults)."""
        need = rows * cols
        if self._buf is None or self._buf.numel() < need:
            self._buf = torch.empty(max(need, self._chunk_bytes() // 8), dtype=torch.float64)
        return self._buf[:need].view(rows, cols)

    def _join(self) -> None:
        """Wait for the background write (and raise what it raised)."""
        t, self._pending = self._pending, None
        if t is not None:
            t.join()
            if t.error is not None:
                raise t.error

    def _read(self, lo: int, hi: int, a: int, b: int) -> np.ndarray:
        """Rows lo..hi-1, columns a..b-1 of the file, in its dtype, in the reused read buffer."""
        need, item = (hi - lo) * (b - a), self._item
        np_dt = np.float32 if item == 4 else np.float64
        if self._buf32 is None or self._buf32.size < need or self._buf32.dtype != np_dt:
            self._buf32 = np.empty(max(need, self._chunk_bytes() // 8), dtype=np_dt)
        buf = self._buf32[:need].reshape(hi - lo, b - a)
        for r in range(lo, hi):
            got = os.preadv(self._fd, [memoryview(buf[r - lo])], item * (r * self.n + a))
            if got != item * (b - a):
                raise OSError(f"short read from the basis file ({got} of {item * (b - a)} bytes)")
        return buf

    def _get(self, lo: int, hi: int, a: int, b: int) -> torch.Tensor:
        """Rows lo..hi-1, columns a..b-1, as float64 (hi - lo, b - a): a view of the rows where they are float64
        in memory, else the reused chunk buffer (valid until the next call)."""
        if not self.disk and self.dtype == torch.float64:
            return self.X[lo:hi, a:b]
        self._join()
        out = self._scratch(hi - lo, b - a)
        if not self.disk:
            return out.copy_(self.X[lo:hi, a:b])
        return out.copy_(torch.from_numpy(self._read(lo, hi, a, b)))

    def _put(self, lo: int, a: int, b: int, T: torch.Tensor) -> None:
        """Rows lo.. (as many as T has), columns a..b-1, from the float64 block T."""
        if not self.disk:
            self.X[lo:lo + T.shape[0], a:b] = T
            return
        self._join()
        self._pwrite(lo, a, T)

    def _pwrite(self, lo: int, a: int, T: torch.Tensor) -> None:
        blk = np.ascontiguousarray(T.to(self.dtype).numpy())
        for r in range(T.shape[0]):
            data, at = memoryview(blk[r]).cast("B"), self._item * ((lo + r) * self.n + a)
            while len(data):
                done = os.pwrite(self._fd, data, at)
                if done <= 0:
                    raise OSError("short write to the Lanczos basis file (disk full?)")
                data, at = data[done:], at + done

    # -- the operations Lanczos needs ------------------------------------------------------------
    def append(self, v: torch.Tensor, background: bool = False) -> None:
        """Add a unit row (any float dtype in; stored in the basis dtype). `background` (a float32 row on disk):
        written by a thread while the caller goes on (its next product), so v must not change until the next
        call on the basis."""
        if self.count >= self.cap:
            raise IndexError("the Lanczos basis is full")
        row = v.reshape(1, -1)
        if background and self.disk and row.dtype == torch.float32 and row.is_contiguous():
            self._join()
            self._pending = _Writer(self, self.count, row)
        else:
            self._put(self.count, 0, self.n, row)
        self.count += 1

    def add_row(self, w: torch.Tensor, i: int, alpha: float) -> None:
        """w += alpha * row i in w's dtype, streamed a column chunk at a time from the file (the row is never
        held whole: the lean recurrence keeps only its current vector in memory)."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        if not self.disk:
            w.add_(self.X[i], alpha=alpha)
            return
        self._join()
        for a, b in self._chunks(1):
            w[a:b].add_(torch.from_numpy(self._read(i, i + 1, a, b)[0]), alpha=alpha)

    def write(self, i: int, a: int, values: torch.Tensor) -> None:
        """Row i, columns a.. (as many as `values` has) from a 1-D tensor: rows written piecewise (gradients
        parameter by parameter), in any order; the basis then holds rows 0..max(i)."""
        if not 0 <= i < self.cap:
            raise IndexError(i)
        self._put(i, a, a + values.numel(), values.detach().reshape(1, -1).cpu())
        self.count = max(self.count, i + 1)

    def gram(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """B[:, a:b] B[:, a:b]^T in float64 (count x count), a column chunk at a time."""
        b = self.n if b is None else b
        G = torch.zeros(self.count, self.count, dtype=torch.float64)
        step = max(1024, int(self._chunk_bytes() // (8 * max(self.count, 1))))
        for c in range(a, b, step):
            X = self._get(0, self.count, c, min(b, c + step))
            G += X @ X.T
        return G.numpy()

    def row(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self._get(i, i + 1, 0, self.n)[0]

    def _whole(self) -> torch.Tensor | None:
        """The rows themselves where they are float64 in memory (no chunked conversion needed), else None."""
        return self.X[:self.count] if not self.disk and self.dtype == torch.float64 else None

    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """B w (float64, one entry per row; w float64 or float32)."""
        X = self._whole()
        if X is not None and w.dtype == torch.float64:
            return X @ w
        h = torch.zeros(self.count, dtype=torch.float64)
        for a, b in self._chunks(self.count):
            h += self._get(0, self.count, a, b) @ _as64(w, a, 2, b)
        return h

    def subtract(self, w: torch.Tensor, h: torch.Tensor) -> None:
        """w -= B^T h, in place (computed in float64; a float32 w is rounded once per entry)."""
        X = self._whole()
        if X is not None and w.dtype == torch.float64:
            w.addmv_(X.T, h, alpha=-1.0)
            return
        for a, b in self._chunks(self.count):
            if w.dtype == torch.float64:
                w[a:b].addmv_(self._get(0, self.count, a, b).T, h, alpha=-1.0)
            else:
                t = _as64(w, a, 2, b).addmv_(self._get(0, self.count, a, b).T, h, alpha=-1.0)
                w[a:b].copy_(t)

    def combine(self, S: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """B^T S: the (n, c) combinations of the rows with the columns of S (rows of S = basis rows), computed in
        float64 and stored in `dtype`."""
        S = torch.from_numpy(np.ascontiguousarray(S, dtype=np.float64))
        out = torch.empty(self.n, S.shape[1], dtype=dtype)
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


class _Writer(threading.Thread):
    """One row written to the basis file in the background (pwrite releases the GIL)."""

    def __init__(self, basis: Basis, index: int, row: torch.Tensor):
        super().__init__(daemon=True)
        self.basis, self.index, self.row, self.error = basis, index, row, None
        self.start()

    def run(self) -> None:
        try:
            self.basis._pwrite(self.index, 0, self.row)
        except BaseException as e:  # re-raised by Basis._join in the caller's thread
            self.error = e
        finally:
            self.row = None
