"""Equal-training-loss matching of several runs: dense checkpoints around where each run reaches a common target,
then one checkpoint per run chosen jointly so that every pair agrees within a tolerance."""
from __future__ import annotations

import filecmp
import itertools
import shutil
from pathlib import Path
from typing import Callable

from nexus_opt.checkpoint import list_checkpoints, read_checkpoint
from nexus_opt.train import resume

from .runs import eval_records

MATCH_TOL = 0.002    # training losses of compared checkpoints must agree within this (else the pair is flagged)
MATCH_WINDOW = 0.01  # candidates: every-step checkpoints with |training loss - target| <= this (doubled up to 4x
#                      while no triple agrees within MATCH_TOL)
AFTER_CROSSING = 3   # every-step checkpoints kept past the first step at or below the target
MAX_CANDIDATES = 12  # per run, the ones nearest the target (bounds the joint search to 12^runs tuples)


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def _loss(ckpt: Path) -> float:
    return float(read_checkpoint(ckpt).manifest["metrics"]["train_loss"])


def _candidate(ckpt: Path) -> dict:
    return {"path": str(ckpt), "step": _step(ckpt), "train_loss": _loss(ckpt)}


def dense_window(run: Path, target: float, device: str, log: Callable, window: float = MATCH_WINDOW) -> list[dict]:
    """Every-step checkpoints of `run` around its first evaluation at or below `target`, written into a copy of
    the run (`<run>-match`) resumed from its last regular checkpoint above target + window and stopped
    AFTER_CROSSING steps past the crossing (or below target - window, or at the run's end). Returns the
    candidates (path, step, train_loss) within the window, or the two around the crossing if a step jumps it.
    An earlier copy that starts at or before that checkpoint and goes as far is reused."""
    run = Path(run)
    recs = eval_records(run)
    cross = next((r["step"] for r in recs if r["train_loss"] <= target), None)
    if cross is None:  # never reaches the target: only its final checkpoint is a candidate (flagged by the gap)
        return [_candidate(list_checkpoints(run)[-1])]
    above = {r["step"] for r in recs if r["step"] < cross and r["train_loss"] > target + window}
    ckpts = [c for c in list_checkpoints(run) if _step(c) < cross]
    start = next((c for c in reversed(ckpts) if _step(c) in above), ckpts[0] if ckpts else None)
    if start is None:  # crossed at its first checkpoint (step 0)
        return [_candidate(list_checkpoints(run)[0])]
    mdir = Path(str(run) + "-match")
    done = list_checkpoints(mdir) if mdir.exists() else []
    final = read_checkpoint(list_checkpoints(run)[-1]).step
    if not (done and _step(done[0]) <= _step(start) and _copied_from(done[0], run)
            and _complete(done, target, final, window)):
        shutil.rmtree(mdir, ignore_errors=True)
        mdir.mkdir(parents=True)
        shutil.copytree(start, mdir / start.name)
        log(f"match {run.name}: every step from {start.name} around training loss {target:.5f}")
        crossed = []

        def stop(rec: dict) -> bool:
            if rec["train_loss"] <= target and not crossed:
                crossed.append(rec["step"])
            return (rec["train_loss"] <= target - window
                    or bool(crossed) and rec["step"] >= crossed[0] + AFTER_CROSSING)

        resume(mdir, device=device, stop_when=stop)
        done = list_checkpoints(mdir)
    cands = [_candidate(c) for c in done]
    near = [c for c in cands if abs(c["train_loss"] - target) <= window]
    if not near:  # one step jumped over the whole window: the last checkpoint above and the first at or below
        below = next((i for i, c in enumerate(cands) if c["train_loss"] <= target), len(cands) - 1)
        near = cands[max(below - 1, 0):below + 1]
    return sorted(near, key=lambda c: abs(c["train_loss"] - target))[:MAX_CANDIDATES]


def _copied_from(ckpt: Path, run: Path) -> bool:
    """The dense copy starts from this run's own checkpoint, byte for byte (not a stale copy of another run)."""
    orig = run / ckpt.name
    files = sorted(p.name for p in ckpt.iterdir())
    return orig.is_dir() and files == sorted(p.name for p in orig.iterdir()) and all(
        filecmp.cmp(ckpt / f, orig / f, shallow=False) for f in files)


def _complete(done: list[Path], target: float, final: int, window: float) -> bool:
    """An earlier dense window that went as far as dense_window would go (reused, not retrained)."""
    losses = [_loss(c) for c in done]
    if losses[-1] <= target - window or _step(done[-1]) >= final:
        return True
    cross = next((i for i, v in enumerate(losses) if v <= target), None)
    return cross is not None and _step(done[-1]) >= _step(done[cross]) + AFTER_CROSSING


def choose_jointly(cands: dict[str, list[dict]], target: float, tol: float = MATCH_TOL) -> dict[str, dict]:
    """One candidate per run: among the tuples whose training losses all lie within `tol` of each other, the one
    whose losses stay closest to `target` (smallest largest |loss - target|); if no tuple agrees within `tol`,
    the one with the smallest spread of losses."""
    names = list(cands)
    best, key_best = None, None
    for combo in itertools.product(*(cands[n] for n in names)):
        losses = [c["train_loss"] for c in combo]
        spread = max(losses) - min(losses)
        off = max(abs(v - target) for v in losses)
        key = (0, off, spread) if spread <= tol else (1, spread, off)
        if key_best is None or key < key_best:
            best, key_best = combo, key
    return dict(zip(names, best))


def match_runs(runs: dict[str, Path], target: float, device: str, log: Callable,
               tol: float = MATCH_TOL) -> dict[str, dict]:
    """One checkpoint per run at equal training loss (path, step, train_loss, and the window used): dense windows
    of MATCH_WINDOW around the target, doubled (up to 4x) while no choice agrees within `tol`."""
    window = MATCH_WINDOW
    while True:
        cands = {k: dense_window(r, target, device, log, window) for k, r in runs.items()}
        best = choose_jointly(cands, target, tol)
        losses = [c["train_loss"] for c in best.values()]
        if max(losses) - min(losses) <= tol or window >= 4 * MATCH_WINDOW:
            return {k: {**c, "window": window} for k, c in best.items()}
        window *= 2
