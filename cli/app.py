"""The typer application `landscape` and its single error boundary: bad input of any kind is one line, exit 2.

The boundary (`LandscapeGroup.main`) turns every `UserError`, click/typer usage error, OSError, allocation
failure and RecursionError into `error: ...` on stderr with exit status 2. Anything else is a bug: one line
with exit status 1, or its full traceback under the global `--debug` (or LANDSCAPE_DEBUG=1).
Nothing here imports torch: `landscape --help` stays fast.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Optional

import typer

try:  # typer >= 0.2x vendors its own click: its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click
from typer.core import TyperCommand, TyperGroup

from nexus_opt.errors import UserError
from nexus_opt.limits import is_allocation_failure

_STATE = {"debug": False}


MAX_LINE = 1000  # characters of an error line: echoed input (a 100 KB option, a million names) is cut


def _one_line(message) -> str:
    """One line, at most MAX_LINE characters (with the full length when cut), printable whatever it echoes
    (lone surrogates and undecodable bytes escaped)."""
    s = " ".join(str(message).split())
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= MAX_LINE else f"{s[:MAX_LINE - 60]}... (cut; {len(s)} characters in all)"


def error_message(e: BaseException) -> Optional[str]:
    """The one-line message of an expected failure (bad input, files, memory, nesting); None for a bug."""
    if isinstance(e, UserError):
        return _one_line(e)
    if isinstance(e, click.exceptions.ClickException):
        msg = e.format_message()
        ctx = getattr(e, "ctx", None)
        where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        return _one_line(msg).rstrip(".") + where
    if is_allocation_failure(e):
        first = (str(e).splitlines() or [""])[0][:160]
        return (f"out of memory ({type(e).__name__}{': ' + first if first else ''}); the model, batch, grid or "
                "iteration count is too large for this machine: choose smaller settings")
    if isinstance(e, UnicodeError):  # text that is not valid UTF-8 (or a lone surrogate) in an input file
        return _one_line(f"an input holds text that is not valid UTF-8 ({type(e).__name__}: {str(e)[:160]}); "
                         "fix or re-save the file")
    if isinstance(e, RecursionError):
        return "input nested too deeply (RecursionError); a manifest or option must be a flat, small structure"
    if isinstance(e, OSError):
        what = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or type(e).__name__
        if e.filename is not None:
            target = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
            return _one_line(f"{what}: {target}; check the path, its permissions and free space")
        return _one_line(f"{what} (errno {e.errno}); check the output location, its permissions and free space")
    return None


# Readable help: metavars that say what a value is (typer would print <bool>, <str>, <list[str]>, {checkpoints}),
# and docstrings shown as sentences (their hard line breaks removed).
_METAVARS = {"json": "PATH", "csv": "PATH", "plot": "FILE", "out": "PATH", "from": "FILE.npz", "data": "NAME=PATH",
             "ood": "NAME=PATH", "domains": "DOMAINS", "pair": "A,B", "device": "DEVICE", "params": "REGEX",
             "factory": "MOD:FUNC", "factory-config": "JSON", "checkpoints": "CKPT"}  # short: the help column stays wide
_TYPES = {"int": "N", "float": "X", "str": "TEXT"}


def _metavar(param) -> str:
    """A short, readable metavar for an option or argument: by its name, else by its type; '' for a flag."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    name = max(param.opts, key=len).lstrip("-") if param.opts else param.name
    if name in _METAVARS:
        return _METAVARS[name]
    desc = getattr(param, "type_descriptor", None)
    ann = getattr(desc, "annotation", None)
    kinds = [a for a in (getattr(ann, "__args__", None) or (ann,)) if a is not type(None)]
    return next((_TYPES[k.__name__] for k in kinds if getattr(k, "__name__", "") in _TYPES), "VALUE")


def readable_params(params) -> None:
    """Give every parameter without a metavar a readable one (arguments: NAME..., shown once)."""
    for p in params:
        if p.metavar is not None:
            continue
        mv = _metavar(p)
        if p.param_type_name == "argument":
            p.metavar = mv + ("..." if p.nargs != 1 else "")
            p.display_type_rich = lambda ctx: None  # the name column already says it
            p.get_usage_pieces = lambda ctx, p=p: [p.metavar if p.required else f"[{p.metavar}]"]
        else:
            p.metavar = mv


def _sentences(text):
    """Help text with each paragraph's hard line breaks joined into one line (typer's rich mode keeps them)."""
    return text if not text else "\n\n".join(" ".join(par.split()) for par in text.split("\n\n"))


class ReadableHelp:
    """Mixin of the app's commands: readable metavars and help paragraphs that read as sentences."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.help, self.short_help = _sentences(self.help), _sentences(self.short_help)
        readable_params(self.params)

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            readable_params([opt])
        return opt


class LandscapeCommand(ReadableHelp, TyperCommand):
    """A subcommand of `landscape` (see ReadableHelp)."""


class LandscapeGroup(ReadableHelp, TyperGroup):
    """The root command group: runs the app in non-standalone mode and owns every exit path."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `landscape` alone: the help text, as before
            click.echo(e.ctx.get_help())
            code = 2
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            code = 130
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            code = 1
        except Exception as e:  # noqa: BLE001 -- the boundary: classify, then one line
            msg = error_message(e)
            if msg is None:
                if _STATE["debug"] or os.environ.get("LANDSCAPE_DEBUG"):
                    raise
                msg = (f"internal error ({type(e).__name__}: {_one_line(e)[:200]}); this is a bug: "
                       "rerun with --debug for the traceback and report it")
                code = 1
            else:
                code = 2
            sys.stderr.write(f"error: {msg}\n")
        else:
            code = rv if isinstance(rv, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="landscape",
    cls=LandscapeGroup,
    help="Train with Nexus or AdamW and measure where the optimizer lands: flatness, closeness of "
         "per-domain minima, gradient similarity, loss surfaces.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> None:
    """Print `error: message` on one line to stderr and exit with status 2."""
    sys.stderr.write(f"error: {_one_line(message)}\n")
    raise typer.Exit(2)


def command(name: str, **kw):
    """Register a subcommand; its failures are handled by the app's single error boundary."""

    def deco(fn):
        return app.command(name, cls=LandscapeCommand, **kw)(fn)

    return deco


def _version(value: bool) -> None:
    if value:
        from nexus_opt import __version__

        typer.echo(f"landscape {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an unexpected error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Train with Nexus or AdamW and measure where the optimizer lands."""
    _STATE["debug"] = debug
