"""Reading training runs back: eval curves from metrics.jsonl, and checkpoints matched by training loss."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nexus_opt.checkpoint import checkpoint_name, list_checkpoints
from nexus_opt.errors import UserError


def eval_records(run_dir: str | Path) -> list[dict]:
    """The run's evaluation records (step, per-domain losses, weighted training loss), by step."""
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


def checkpoint_losses(run_dir: str | Path) -> dict[int, dict]:
    """Eval record of every step that has a complete checkpoint."""
    steps = {int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)}
    return {r["step"]: r for r in eval_records(run_dir) if r["step"] in steps}


@dataclasses.dataclass
class MatchedPair:
    """Two checkpoints (one per run) at matched training loss, and the final pair for reference."""

    a: str
    b: str
    a_step: int
    b_step: int
    a_train_loss: float
    b_train_loss: float
    gap: float
    final_a: str
    final_b: str
    final_a_train_loss: float
    final_b_train_loss: float


def match_by_training_loss(run_a: str | Path, run_b: str | Path) -> MatchedPair:
    """Keep the final checkpoint of the run whose final training loss is higher; from the other run take
    the checkpoint whose training loss is closest to it (the better run, stopped where they match)."""
    ca, cb = checkpoint_losses(run_a), checkpoint_losses(run_b)
    if not ca or not cb:
        raise UserError(f"runs '{run_a}' and '{run_b}' need evaluated checkpoints to be matched")
    fa, fb = max(ca), max(cb)
    la, lb = ca[fa]["train_loss"], cb[fb]["train_loss"]
    if la >= lb:
        sa, sb = fa, min(cb, key=lambda s: (abs(cb[s]["train_loss"] - la), -s))
    else:
        sb, sa = fb, min(ca, key=lambda s: (abs(ca[s]["train_loss"] - lb), -s))
    ra, rb = Path(run_a), Path(run_b)
    return MatchedPair(str(ra / checkpoint_name(sa)), str(rb / checkpoint_name(sb)), sa, sb,
                       ca[sa]["train_loss"], cb[sb]["train_loss"], abs(ca[sa]["train_loss"] - cb[sb]["train_loss"]),
                       str(ra / checkpoint_name(fa)), str(rb / checkpoint_name(fb)), la, lb)


def gradsim_records(run_dir: str | Path) -> list[dict]:
    """The run's gradient-similarity tracker rows (step, mean cross-domain cosine, its stderr), by step."""
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
