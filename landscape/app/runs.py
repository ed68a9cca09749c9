"""Reading training runs back: evaluation curves and gradient-similarity tracker rows from metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from nexus_opt.errors import UserError


def eval_records(run_dir: str | Path) -> list[dict]:
    """The run's evaluation records (step, per-domain losses, weighted training loss), by step."""
    from nexus_opt.checkpoint import check_closed

    check_closed(run_dir)  # metrics.jsonl and the checkpoints must be the run's own, not links out of it
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in '{run_dir}'; pass a run directory written by `landscape train`")
    recs = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "eval":
            recs[r["step"]] = r
    return [recs[s] for s in sorted(recs)]


def gradsim_records(run_dir: str | Path) -> list[dict]:
    """The run's gradient-similarity tracker rows (step, mean cross-domain cosine, its stderr), by step."""
    from nexus_opt.checkpoint import check_closed

    check_closed(run_dir)  # metrics.jsonl and the checkpoints must be the run's own, not links out of it
    path = Path(run_dir) / "metrics.jsonl"
    recs = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "gradsim":
            recs[r["step"]] = {"step": r["step"], "mean_cosine": r.get("mean_cosine"),
                               "mean_cosine_stderr": r.get("mean_cosine_stderr"),
                               "conflict_rate": r.get("conflict_rate")}
    return [recs[s] for s in sorted(recs)]
