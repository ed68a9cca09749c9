"""The output rule and bounded reads: nothing a user owns is overwritten, no read runs unbounded.

Output rule (every command that writes): an output path is refused, in one line, when it resolves (symlinks
followed) to a file the command reads, to any file of a run directory it reads (its checkpoints, latest.json,
metrics.jsonl, its lock), to something that is not a regular file (a FIFO, a device, a directory: '-' is the
only stream), or to the same file as another output of the same command; two outputs on stdout are refused.
Files are written atomically (a temporary file beside the target, then a rename), so a failed write leaves
the old file. `check_outputs` applies the rule up front; `write_atomic` / `atomic_path` re-check every file
at the moment it is written (derived files, e.g. a surface's figures), against the reads of the command
registered with `reading(...)`.

Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

from .errors import UserError

RUN_FILES = ("latest.json", "metrics.jsonl", ".lock")  # a run directory's own files besides its checkpoints
MAX_WALK = 20000       # files of an input directory listed to protect them; beyond that the whole tree is
MAX_ECHO = 200         # characters of user input echoed in an error message
_CKPT = re.compile(r"^\.?ckpt-\d+")


def short(text, limit: int = MAX_ECHO) -> str:
    """`text` (any value, as str) cut to `limit` characters, with its full length, for an error message."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} characters)"


def real(path) -> str:
    """The absolute path with every symlink followed (a dangling link resolves to where it points)."""
    return os.path.realpath(os.path.expanduser(str(path)))


def is_run_dir(d: str | Path) -> bool:
    """A directory written by the trainer: latest.json, metrics.jsonl or ckpt-* directories in it."""
    d = Path(d)
    if not d.is_dir():
        return False
    if any((d / n).exists() for n in RUN_FILES[:2]):
        return True
    try:
        return any(_CKPT.match(e.name) for e in os.scandir(d))
    except OSError:
        return False


class Protected:
    """What a command reads: exact files (real paths) and trees (real directory paths) nothing may be written in."""

    def __init__(self):
        self.files: dict[str, str] = {}   # real path -> the input it belongs to
        self.trees: dict[str, str] = {}   # real dir -> the input; no output anywhere under it
        self.runs: dict[str, str] = {}    # real run dir -> the input; its RUN_FILES and ckpt-* are protected

    def add(self, path) -> None:
        if path is None or str(path) in ("", "-"):
            return
        r = real(path)
        if not os.path.exists(r):
            return
        if os.path.isdir(r):
            run = r if is_run_dir(r) else (os.path.dirname(r) if _CKPT.match(os.path.basename(r))
                                            and is_run_dir(os.path.dirname(r)) else None)
            if run is not None:
                self.runs[run] = str(path)
            if _CKPT.match(os.path.basename(r)):
                self.trees[r] = str(path)
            self._walk(r, str(path))
        else:
            self.files[r] = str(path)
            parent = os.path.dirname(r)
            if _CKPT.match(os.path.basename(parent)) and is_run_dir(os.path.dirname(parent)):
                self.runs[os.path.dirname(parent)] = str(path)  # a file of a checkpoint: its run is read

    def _walk(self, root: str, label: str) -> None:
        n = 0
        for d, subdirs, names in os.walk(root):
            for name in names:
                n += 1
                if n > MAX_WALK:
                    self.trees[root] = label  # too many files to list: the whole tree is off limits
                    return
                self.files[real(os.path.join(d, name))] = label
            for s in subdirs:  # symlinked directories are not walked by os.walk: protect their targets
                p = os.path.join(d, s)
                if os.path.islink(p) and os.path.isdir(p):
                    self.trees[real(p)] = label

    def owner(self, r: str) -> Optional[str]:
        """The input an output's real path `r` would overwrite (or be written inside), else None."""
        if r in self.files:
            return self.files[r]
        for t, label in self.trees.items():
            if r == t or r.startswith(t.rstrip(os.sep) + os.sep):
                return label
        for run, label in self.runs.items():
            rel = os.path.relpath(r, run)
            first = rel.split(os.sep)[0]
            if rel != "." and not rel.startswith("..") and (first in RUN_FILES or _CKPT.match(first)):
                return label
        return None


_READS: contextvars.ContextVar[Optional[Protected]] = contextvars.ContextVar("nexus_reads", default=None)


@contextlib.contextmanager
def reading(paths: Iterable) -> Iterator[Protected]:
    """Register what the current command reads for the duration of the block (every write checks against it)."""
    prot = Protected()
    outer = _READS.get()
    if outer is not None:
        prot.files.update(outer.files), prot.trees.update(outer.trees), prot.runs.update(outer.runs)
    for p in paths:
        prot.add(p)
    token = _READS.set(prot)
    try:
        yield prot
    finally:
        _READS.reset(token)


def add_reads(paths: Iterable) -> None:
    """Add inputs to the reads registered by the enclosing `reading(...)` (no-op outside one)."""
    prot = _READS.get()
    if prot is not None:
        for p in paths:
            prot.add(p)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output(path, option: str = "output", reads: Iterable = ()) -> str:
    """The real path an output may be written to, or a UserError (the output rule, one file)."""
    prot = _READS.get()
    extra = Protected()
    for p in reads:
        extra.add(p)
    r = real(path)
    shown = short(path)
    try:
        st = os.stat(r)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{option} {shown} is {_kind(st.st_mode)}; an output must be a regular file "
                        "('-' is the only stream: stdout)")
    for pr in (prot, extra):
        owner = pr.owner(r) if pr is not None else None
        if owner is not None:
            what = "a file this command reads" if real(owner) == r else \
                f"a file of {short(owner, 120)}, which this command reads"
            raise UserError(f"{option} {shown} would overwrite {what}; write the output somewhere else")
    return r


def check_outputs(outputs: Mapping[str, object], reads: Iterable = (), dirs: Mapping[str, object] | None = None) -> None:
    """The output rule for all outputs of one command, before any work: `outputs` maps an option name to a file
    path (None: not given; '-': stdout), `dirs` an option to an output directory; `reads` adds inputs to those
    registered with `reading(...)`. Refused: an input or a run's file, a non-regular file, one file named twice,
    two outputs on stdout, a directory inside a run's checkpoint."""
    reads = list(reads)
    given = [(o, p) for o, p in outputs.items() if p is not None and str(p) != ""]
    streams = [o for o, p in given if str(p) == "-"]
    if len(streams) > 1:
        raise UserError(f"{' and '.join(f'{o} -' for o in streams)}: only one output can go to stdout ('-'); "
                        "write the others to files")
    seen: dict[str, str] = {}
    for option, p in given:
        if str(p) == "-":
            continue
        r = check_output(p, option, reads)
        if r in seen:
            raise UserError(f"{seen[r]} and {option} name the same file ({short(p)}); give each output its own file")
        seen[r] = option
    for option, d in (dirs or {}).items():
        if d is None:
            continue
        r = real(d)
        for pr in (_READS.get(), _protected(reads)):
            owner = pr.owner(os.path.join(r, "x")) if pr is not None else None
            if owner is not None:
                raise UserError(f"{option} {short(d)} is inside {short(owner, 120)}, which this command reads; "
                                "write the outputs somewhere else")


def _protected(paths) -> Protected:
    p = Protected()
    for x in paths:
        p.add(x)
    return p


@contextlib.contextmanager
def atomic_path(path, option: str = "output") -> Iterator[Path]:
    """A temporary path beside `path` (same extension) to write; renamed over `path` when the block succeeds,
    removed when it fails. The output rule is checked first; a symlinked output replaces its target."""
    r = Path(check_output(path, option))
    r.parent.mkdir(parents=True, exist_ok=True)
    tmp = r.with_name(f".{r.stem}.tmp-{os.getpid()}{r.suffix}")
    try:
        yield tmp
        os.replace(tmp, r)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: str | bytes, option: str = "output") -> Path:
    """Write text or bytes to `path` under the output rule, atomically (fsync before the rename)."""
    try:
        with atomic_path(path, option) as tmp:
            with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else
                                                                          {"newline": "", "encoding": "utf-8"})) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    return Path(path)


def check_regular_input(path, what: str, max_bytes: int) -> int:
    """The size of an input that must be a regular file of at most `max_bytes` (symlinks followed), else a
    UserError: FIFOs and devices (/dev/zero, /dev/urandom) would block or never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{what} {short(path)}: {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {short(path)} is {_kind(st.st_mode)}; give a regular file")
    if st.st_size > max_bytes:
        raise UserError(f"{what} {short(path)} is {_human(st.st_size)}, more than the {_human(max_bytes)} limit; "
                        "give a smaller file (or raise LANDSCAPE_MAX_INPUT)")
    return st.st_size


def read_bounded(path, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, checked again while reading (a growing file)."""
    check_regular_input(path, what, max_bytes)
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise UserError(f"{what} {short(path)} is more than the {_human(max_bytes)} limit; give a smaller file")
    return raw


def max_input_bytes(default: int = 1 << 30) -> int:
    """The size cap of a data file: LANDSCAPE_MAX_INPUT (bytes, K/M/G suffix allowed) or 1 GiB."""
    env = os.environ.get("LANDSCAPE_MAX_INPUT")
    if env:
        from .limits import parse_bytes

        return parse_bytes(env)
    return default


def _human(n: int) -> str:
    from .limits import human

    return human(n)
