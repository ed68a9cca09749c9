"""Small helpers shared by the CLI commands: options, loading, JSON output, rich progress."""
from __future__ import annotations

import contextlib
import sys
import json
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Where a stream is a file or a pipe (a log, `| less`), nothing is cut to 80 columns: tables keep every column at
# full width and log lines are never wrapped; a terminal gets its own width.
UNBOUNDED_WIDTH = 100_000


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr): the terminal's width, or unbounded when the stream is not a terminal."""
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=UNBOUNDED_WIDTH)


console = make_console(stderr=True)  # logs, progress, "wrote X"
out = make_console()                 # tables

# Caps of analyzer iteration counts: beyond these the answer does not change, only the time and memory grow.
MAX_GRID = 1001          # plot-surface --grid: a million loss evaluations
MAX_RESAMPLES = 100_000  # gradsim --resamples: the bootstrap stderr is settled long before
MAX_LANCZOS_STEPS = 100_000  # flatness --density-steps before the parameter count is known (then <= n)


def check_range(value, option: str, lo, hi, why: str = ""):
    """A numeric option within [lo, hi] (and finite), else a UserError naming the option and the limits; None
    passes. The checks are nexus_opt.limits' (check_int for integer limits, check_float otherwise)."""
    from nexus_opt.limits import check_float, check_int

    if value is None:
        return value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (value, lo, hi)):
        return check_int(value, option, lo, hi, why=why)
    return check_float(value, option, lo, hi, why=why)


def merge_alias(value, old, param: str, option: str, old_option: str):
    """The value of an option whose old spelling is kept, hidden from --help, for compatibility: `old` (the hidden
    option's value, None when absent) when only it was given, else `value`; both given and different: a UserError."""
    from nexus_opt.errors import UserError

    if old is None:
        return value
    try:  # typer >= 0.2x vendors its own click
        from typer._click.core import ParameterSource
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click.core import ParameterSource
        from click.globals import get_current_context
    ctx = get_current_context(silent=True)
    source = ctx.get_parameter_source(param) if ctx is not None else None
    given = source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    if given and value != old:
        raise UserError(f"{option} {value} and {old_option} {old} (its old spelling) disagree; give {option} once")
    return old


def parse_kv(text: str | None, what: str) -> dict:
    """'a=1,b=2.5' -> {'a': 1, 'b': 2.5} (JSON values where they parse, strings otherwise)."""
    from nexus_opt.errors import UserError

    if not text:
        return {}
    res = {}
    for part in text.split(","):
        if "=" not in part:
            from nexus_opt.files import short

            raise UserError(f"{what} must look like key=value[,key=value...], got '{short(text)}'")
        k, v = part.split("=", 1)
        try:
            res[k.strip()] = json.loads(v)
        except ValueError:
            res[k.strip()] = v.strip()
    return res


def check_output_file(path: str | None, option: str, formats: Sequence[str] | None = None) -> None:
    """Refuse, before any work is done, an output file that could not be written afterwards: an unsupported
    or missing extension (when `formats` is given), a directory, or a location that is not writable."""
    from nexus_opt.errors import UserError

    if path is None or path == "-":
        return
    p = Path(path)
    if formats is not None:
        ext = p.suffix.lower().lstrip(".")
        if ext not in formats:
            what = f"unsupported file type '.{ext}'" if ext else "no file extension"
            raise UserError(f"{option} {path}: {what}; end the name with one of "
                            f"{', '.join('.' + f for f in formats)}")
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    _check_writable(p.parent, option, path)


def check_output_dir(path: str, option: str) -> None:
    """Refuse, before any work is done, an output directory that is a file or cannot be created or written."""
    from nexus_opt.errors import UserError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {path} is a file; give a directory (it is created if missing)")
    _check_writable(p, option, path)


def _check_writable(d: Path, option: str, path) -> None:
    """The nearest existing ancestor of directory `d` must be a directory in which a file can be created."""
    from nexus_opt.errors import UserError

    a = d
    while not a.exists():
        a = a.parent
    if not a.is_dir():
        raise UserError(f"{option} {path}: '{a}' is a file, not a directory; choose another location")
    try:
        with tempfile.TemporaryFile(dir=a):  # an anonymous file where the OS supports it; removed at once
            pass
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in '{a}' ({e.strerror or type(e).__name__}); "
                        "choose a writable location") from None


def figure_formats(html: bool = False) -> list[str]:
    """File extensions a --plot can take: what matplotlib writes (plus html where an interactive one exists)."""
    from matplotlib.backend_bases import FigureCanvasBase

    known = set(FigureCanvasBase.get_supported_filetypes()) | ({"html"} if html else set())
    first = [f for f in ("png", "svg", "pdf", "html") if f in known]
    return first + sorted(known - set(first))


def write_json(data: dict, path: str | Path) -> None:
    """Write JSON to `path`; a failure (disk full, a device like /dev/full, permissions) names the path."""
    from nexus_opt.files import write_atomic

    write_atomic(path, json.dumps(data, indent=2) + "\n")  # the output rule, atomically
    console.print(f"wrote {path}")


def label(path: str) -> str:
    """A short name for a checkpoint path: its last two components."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(path)


PROGRESS_SECONDS = 5.0  # without a terminal: one progress line per this many seconds (LANDSCAPE_PROGRESS_SECONDS)


@contextlib.contextmanager
def progress_bar(unit: str = "") -> Iterator:
    """A transient rich progress bar on stderr; yields `progress(done, total, what)` for the analyzers. When
    stderr is not a terminal (a file, a pipe) it prints a plain line every PROGRESS_SECONDS instead."""
    if not console.is_terminal:
        with _progress_lines(unit) as update:
            yield update
        return
    count = "{task.completed}/{task.total}" + (f" {unit}" if unit else "")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(count), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as p:
        task = p.add_task("", total=1)

        def update(done, total, what):
            p.update(task, completed=done, total=total, description=what)

        yield update


@contextlib.contextmanager
def _progress_lines(unit: str) -> Iterator:
    """progress(done, total, what), printed as `what: done/total unit (elapsed)` on stderr every
    PROGRESS_SECONDS by a timer thread (so a long single product still shows the run is alive)."""
    import os
    import threading
    import time

    try:
        every = max(0.05, float(os.environ.get("LANDSCAPE_PROGRESS_SECONDS", PROGRESS_SECONDS)))
    except ValueError:
        every = PROGRESS_SECONDS
    t0 = time.monotonic()
    state: dict = {}
    stop = threading.Event()

    def update(done, total, what):
        state.update(done=done, total=total, what=what)

    def tick():
        while not stop.wait(every):
            if state:
                print(f"{state['what']}: {state['done']}/{state['total']}{' ' + unit if unit else ''} "
                      f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield update
    finally:
        stop.set()
        thread.join()


def write_results(command: str, checkpoints, results, path, steps=None) -> None:
    """The JSON envelope of a command (see cli/export.py): {"command", "version", "results": [...]}."""
    from .export import emit

    steps = steps if steps is not None else [None] * len(checkpoints)
    emit(command, [(str(p), s, r.to_dict()) for p, s, r in zip(checkpoints, steps, results)], json_out=path)


def tables(*outputs) -> Console:
    """Where tables go: stdout, unless a --json/--csv output is '-' (stdout then carries only that)."""
    return console if any(o == "-" for o in outputs) else out


def parse_names(text: Optional[str], option: str) -> Optional[list[str]]:
    """'a, b' -> ['a', 'b']; None -> None (the default); a UserError when the text names nothing."""
    from nexus_opt.errors import UserError

    if text is None:
        return None
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names:
        raise UserError(f"{option} '{text[:200]}' names no domain; give comma-separated domain names or leave it out")
    return names


def analyse_each(checkpoints: Sequence[str], analyse: Callable, device: str, trust_remote_code: bool,
                 unit: str = ""):
    """Load each checkpoint and run `analyse(obj, progress)` under a progress bar; (results, labels, steps)."""
    from .export import checkpoint_step
    from .sources import load_target as load  # [ownmodel] run dirs and models trained elsewhere

    results, labels, steps = [], [], []
    for path in checkpoints:
        obj = load(path, device=device, trust_remote_code=trust_remote_code)
        with progress_bar(unit) as bar:
            results.append(analyse(obj, bar))
        labels.append(label(path))
        steps.append(checkpoint_step(obj))
        del obj
    return results, labels, steps


def unique_labels(checkpoints: Sequence[str]) -> list[str]:
    """Short, distinct column names for checkpoints (the full path where two short names would clash)."""
    short = [label(p) for p in checkpoints]
    return [str(p) if short.count(s) > 1 else s for p, s in zip(checkpoints, short)]


def comparison_table(title: str, results: list, labels: list[str], first: str = "metric"):
    """A table with one column per result; returns it and `row(name, fn, style=None)` adding fn(result) cells."""
    t = Table(title=title, title_style="bold")
    t.add_column(first)
    for lab in labels:
        t.add_column(lab, justify="right")

    def row(name, fn, style=None):
        t.add_row(name, *[fn(r) for r in results], style=style)

    return t, row

