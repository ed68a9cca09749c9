"""The typer application `landscape` and the wrapper that turns bad input into one line + exit 2."""
from __future__ import annotations

import functools
import sys

import typer

from nexus_opt.errors import UserError

app = typer.Typer(
    name="landscape",
    help="Train with Nexus or AdamW and measure where the optimizer lands: flatness, closeness of "
         "per-domain minima, gradient similarity, loss surfaces.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> None:
    """Print `error: message` on one line to stderr and exit with status 2."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise typer.Exit(2)


def command(name: str, **kw):
    """Register a subcommand whose UserError (and bad files) end as one line, exit 2, no traceback."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except UserError as e:
                fail(str(e))
            except OSError as e:  # a path that cannot be read or written: missing, a file, no permission, ...
                if e.filename is None:  # not about a named path: a genuine failure, keep its traceback
                    raise
                fail(f"{e.strerror or e}: {e.filename}; check the path and its permissions")
            except KeyboardInterrupt:
                sys.stderr.write("interrupted\n")
                raise typer.Exit(130)

        return app.command(name, **kw)(wrapper)

    return deco


@app.callback()
def _root() -> None:
    """Train with Nexus or AdamW and measure where the optimizer lands."""
