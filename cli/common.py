"""Small helpers shared by the CLI commands: options, loading, JSON output, rich progress."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
out = Console()


def parse_kv(text: str | None, what: str) -> dict:
    """'a=1,b=2.5' -> {'a': 1, 'b': 2.5} (JSON values where they parse, strings otherwise)."""
    from nexus_opt.errors import UserError

    if not text:
        return {}
    res = {}
    for part in text.split(","):
        if "=" not in part:
            raise UserError(f"{what} must look like key=value[,key=value...], got '{text}'")
        k, v = part.split("=", 1)
        try:
            res[k.strip()] = json.loads(v)
        except ValueError:
            res[k.strip()] = v.strip()
    return res


def write_json(data: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"wrote {path}")


def label(path: str) -> str:
    """A short name for a checkpoint path: its last two components."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(path)


@contextlib.contextmanager
def progress_bar(unit: str = "") -> Iterator:
    """A transient rich progress bar on stderr; yields `progress(done, total, what)` for the analyzers."""
    count = "{task.completed}/{task.total}" + (f" {unit}" if unit else "")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(count), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as p:
        task = p.add_task("", total=1)

        def update(done, total, what):
            p.update(task, completed=done, total=total, description=what)

        yield update
