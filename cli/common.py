"""Small helpers shared by the CLI commands: options, loading, JSON output, rich progress."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

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
