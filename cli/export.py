"""The output contract shared by every analyzer command: one JSON envelope and one long-format CSV.

JSON: `{"command", "version", "results": [{"checkpoint": path, "step": int|null, "result": {...}}]}`.
CSV: header `checkpoint,step,domain,metric,value`, one row per numeric scalar of each result (see `flatten`).
A path of '-' means stdout; then stdout carries only that document (tables and logs go to stderr).
Nothing here imports torch.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

CSV_COLUMNS = ("checkpoint", "step", "domain", "metric", "value")

# Fields left out of the CSV: bulky arrays (density grids, per-layer matrices, minima, plane coordinates), run
# settings and provenance. They stay in the JSON.
SKIP = frozenset({"settings", "density", "per_layer", "per_layer_norms", "minima", "theta", "origin", "directions",
                  "x", "y", "losses_grid", "versions", "meta", "normalization", "fingerprint",
                  "split_half_reason", "barrier_profile"})
MAX_LIST = 64  # longer numeric lists (traces, profiles) stay in the JSON only


def package_version() -> str:
    from nexus_opt import __version__

    return __version__


def checkpoint_step(obj) -> Optional[int]:
    """The training step of a loaded checkpoint (None for a model trained elsewhere)."""
    step = (getattr(obj, "meta", None) or {}).get("step")
    try:
        return None if step is None else int(step)
    except (TypeError, ValueError):
        return None


def envelope(command: str, entries: Sequence[tuple[str, Optional[int], dict]]) -> dict:
    """The JSON document of a command: its name, the package version and one entry per checkpoint."""
    return {"command": command, "version": package_version(),
            "results": [{"checkpoint": str(p), "step": s, "result": r} for p, s, r in entries]}


def to_stdout(*paths: Optional[str]) -> bool:
    """True when one of the outputs is '-' (stdout): tables must then go to stderr."""
    return any(p == "-" for p in paths)


def _domain_names(d: dict) -> set[str]:
    names: set[str] = set()
    for key in ("domains", "columns", "train_domains", "ood"):
        v = d.get(key)
        if isinstance(v, list):
            names.update(x for x in v if isinstance(x, str))
    if isinstance(d.get("domain"), str):
        names.add(d["domain"])
    if isinstance(d.get("results"), dict):
        names.update(d["results"])
    names.add("train")
    return names


def _value(v: Any) -> Optional[str]:
    """A CSV cell of a scalar: numbers as repr, booleans as 1/0, null as empty; None for a non-scalar."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, float)):
        return repr(v)
    return None


def flatten(result: dict) -> list[tuple[str, str, str]]:
    """(domain, metric, value) rows of one result's dict, generically.

    A dict key that names a domain of the result (its `domains`, `columns`, `ood`, a flatness report's `results`
    keys, 'train') becomes the row's domain; the other keys join into the dotted metric name. A K x K matrix over
    the result's `domains` (rows) and `columns` or `domains` (columns) gives domain = row and metric = name.column.
    Short numeric lists give name.index (e.g. eigenvalues.0 is the largest). Numbers, booleans (1/0) and nulls
    (empty value: not measured or not converged) are exported; strings and the SKIP fields are not.
    Rows without a domain (whole-result summaries) have an empty domain."""
    names = _domain_names(result)
    rows_dom = result.get("domains") if isinstance(result.get("domains"), list) else []
    cols_dom = result.get("columns") if isinstance(result.get("columns"), list) and result.get("columns") else rows_dom
    out: list[tuple[str, str, str]] = []

    def walk(v, domain: str, path: list[str]):
        if isinstance(v, dict):
            if "domain" in v and isinstance(v["domain"], str) and not domain:
                domain = v["domain"]
            for k, x in v.items():
                if k in SKIP or (k == "domain" and isinstance(x, str)):
                    continue
                if not domain and k in names and path[-1:] != ["split_half_reason"]:
                    walk(x, k, path if path[-1:] != ["results"] else path[:-1])
                else:
                    walk(x, domain, path + [k])
            return
        if isinstance(v, list):
            cols = next((c for c in (cols_dom, rows_dom) if v and all(isinstance(r, list) and len(r) == len(c)
                                                                          for r in v)), None)
            if not domain and rows_dom and len(v) == len(rows_dom) and cols:
                for dname, row in zip(rows_dom, v):
                    for cname, x in zip(cols, row):
                        cell = _value(x)
                        if cell is not None:
                            out.append((dname, ".".join(path + [cname]), cell))
                return
            if len(v) > MAX_LIST or not all(_value(x) is not None for x in v):
                return
            for i, x in enumerate(v):
                out.append((domain, ".".join(path + [str(i)]), _value(x)))
            return
        cell = _value(v)
        if cell is not None and path:
            out.append((domain, ".".join(path), cell))

    walk(result, "", [])
    return out


def csv_text(entries: Iterable[tuple[str, Optional[int], dict]]) -> str:
    """The long-format CSV of (checkpoint, step, result dict) entries."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for path, step, result in entries:
        for domain, metric, value in flatten(result):
            w.writerow([str(path), "" if step is None else step, domain, metric, value])
    return buf.getvalue()


def _write(text: str, path: str, log) -> None:
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from nexus_opt.files import write_atomic

    write_atomic(path, text)  # the output rule (never over an input or a run's file), atomically
    log(f"wrote {path}")


def emit(command: str, entries: Sequence[tuple[str, Optional[int], dict]], json_out: Optional[str] = None,
         csv_out: Optional[str] = None) -> None:
    """Write the envelope to `json_out` and the long CSV to `csv_out` ('-': stdout; None: not at all)."""
    from .common import console

    if json_out:
        _write(json.dumps(envelope(command, entries), indent=2, allow_nan=False) + "\n", json_out, console.print)
    if csv_out:
        _write(csv_text(entries), csv_out, console.print)
