"""Pieces of the demo's controlled comparison, fast: paired statistics, the trainer's stop-at-loss option and the
equal-loss matching of runs."""
from __future__ import annotations

import itertools
import json
import re

import pytest
from scipy import stats

from landscape.app.matching import (AFTER_CROSSING, MATCH_TOL, MATCH_WINDOW, MAX_CANDIDATES, choose_jointly,
                                    dense_window)
from landscape.app.stats import paired
from nexus_opt.checkpoint import list_checkpoints, read_checkpoint
from nexus_opt.train import TrainConfig, train


def test_paired_interval_matches_scipy_and_reads_the_same_either_way():
    a, b = [1.0, 2.0, 3.5, 2.2, 0.9], [0.5, 1.2, 3.0, 2.5, 0.1]
    p = paired("m", "nexus", "adamw", range(5), a, b)
    d = [x - y for x, y in zip(a, b)]
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / 5, scale=stats.sem(d))
    assert (p.ci_low, p.ci_high) == pytest.approx((lo, hi), rel=1e-12)
    assert (p.positive, p.negative, p.n, p.verdict) == (4, 1, 5, "includes zero")
    up = paired("m", "x", "y", [0, 1, 2], [1.0, 1.1, 1.2], [0.0, 0.0, 0.0])
    down = paired("m", "x", "y", [0, 1, 2], [0.0, 0.0, 0.0], [1.0, 1.1, 1.2])
    assert up.verdict == "above zero" and down.verdict == "below zero"
    def template(r):  # the sentence with its numbers and its direction words blanked
        t = re.sub(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", r)
        return re.sub(r"above|below|higher|lower", "_", t)

    assert template(up.reading) == template(down.reading)
    assert "lies above zero: x is higher" in up.reading and "lies below zero: x is lower" in down.reading
    assert json.loads(json.dumps(up.to_dict()))["reading"] == up.reading  # serialisable, reading included
    miss = paired("m", "x", "y", [0, 1], [1.0, None], [0.0, 2.0])
    assert miss.n == 1 and miss.ci_low is None and "fewer than 2" in miss.reading


def test_stop_at_loss_checkpoints_the_first_step_at_or_below_the_target(tmp_path):
    kw = dict(suite="bowls", optimizer="adamw", lr=0.05, steps=60, accum=2, batch_size=4, warmup=0, eval_every=60,
              ckpt_every=60, seed=0, device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "full"), **kw))
    recs = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    start = [r for r in recs if r.get("kind") == "eval"][0]["train_loss"]
    target = 0.5 * (start + full["train_loss"])
    res = train(TrainConfig(out=str(tmp_path / "stop"), **kw), stop_at_loss=target)
    cks = list_checkpoints(tmp_path / "stop")
    losses = [read_checkpoint(c).manifest["metrics"]["train_loss"] for c in cks]
    assert res["stopped_at"] == read_checkpoint(cks[-1]).step < 60
    assert losses[-1] <= target < losses[-2]  # every step kept, the run stopped at the first crossing
    assert len(cks) == res["stopped_at"] + 1


def test_choose_jointly_picks_the_agreeing_tuple_nearest_the_target():
    def c(*losses):
        return [{"path": f"p{v}", "step": i, "train_loss": v} for i, v in enumerate(losses)]

    cands = {"a": c(1.000, 1.0015, 1.007), "b": c(0.9974, 1.0022, 1.0068), "c": c(1.0049, 0.9951, 1.0083)}
    got = choose_jointly(cands, 1.0, tol=0.002)
    # brute-force truth: of the 27 tuples, those with spread <= 0.002, then the smallest largest |loss - 1|
    best = min((t for t in itertools.product(*cands.values())
                if max(x["train_loss"] for x in t) - min(x["train_loss"] for x in t) <= 0.002),
               key=lambda t: max(abs(x["train_loss"] - 1.0) for x in t))
    assert [got[k]["train_loss"] for k in "abc"] == [x["train_loss"] for x in best] == [1.007, 1.0068, 1.0083]
    # no tuple within tol: the one with the smallest spread, which is then flagged by the caller
    far = choose_jointly({"a": c(1.0, 1.01), "b": c(1.005, 1.02)}, 1.0, tol=0.002)
    assert (far["a"]["train_loss"], far["b"]["train_loss"]) == (1.0, 1.005)


def test_dense_window_every_step_around_the_first_crossing(tmp_path):
    """Candidates are every-step checkpoints within the window of the target, resumed bit-for-bit from the run
    (their losses equal a full every-step run's), and a second call reuses them."""
    kw = dict(suite="bowls", optimizer="adamw", lr=0.05, steps=40, accum=2, batch_size=4, warmup=0, eval_every=10,
              ckpt_every=10, seed=0, device="cpu")
    train(TrainConfig(out=str(tmp_path / "run"), **kw))
    dense = train(TrainConfig(out=str(tmp_path / "dense"), **kw), stop_at_loss=-1.0)  # every step, to the end
    truth = {read_checkpoint(c).step: read_checkpoint(c).manifest["metrics"]["train_loss"]
             for c in list_checkpoints(tmp_path / "dense")}
    assert dense.get("stopped_at") is None and len(truth) == 41
    target = truth[25] + 1e-9  # crossed first between regular evaluations (20 and 30)
    logs = []
    cands = dense_window(tmp_path / "run", target, "cpu", logs.append)
    assert cands and len(logs) == 1
    for c in cands:
        assert abs(c["train_loss"] - target) <= MATCH_WINDOW
        assert c["train_loss"] == truth[c["step"]]  # resumed exactly
    first = next(s for s in sorted(truth) if truth[s] <= target)
    near = {s for s, v in truth.items() if abs(v - target) <= MATCH_WINDOW and s <= first + AFTER_CROSSING
            and s > max(s2 for s2 in (0, 10, 20) if truth[s2] > target + MATCH_WINDOW)}
    assert {c["step"] for c in cands} == set(sorted(near, key=lambda s: abs(truth[s] - target))[:MAX_CANDIDATES])
    mtime = (tmp_path / "run-match").stat().st_mtime_ns
    assert dense_window(tmp_path / "run", target, "cpu", logs.append) == cands and len(logs) == 1
    assert (tmp_path / "run-match").stat().st_mtime_ns == mtime
    # a copy whose first checkpoint is not the run's own (another run's, a retrained run) is rebuilt
    first = list_checkpoints(tmp_path / "run-match")[0] / "manifest.json"
    first.write_text(first.read_text().replace('"seed": 0', '"seed": 1', 1))
    assert dense_window(tmp_path / "run", target, "cpu", logs.append) == cands and len(logs) == 2


def test_match_runs_widens_the_window_until_a_triple_agrees(monkeypatch):
    """Losses that move by more than the tolerance per step within the first window: the window doubles until
    some triple agrees (and stops doubling at 4x, returning the best triple, flagged by the caller)."""
    from landscape.app import matching

    def fake(run, target, device, log, window):
        steps = {"a": [0.0, 0.008, 0.017], "b": [-0.003, 0.005, 0.0165], "c": [0.004, -0.004, 0.018]}[run]
        return [{"path": f"{run}{i}", "step": i, "train_loss": 1.0 + v} for i, v in enumerate(steps)
                if abs(v) <= window]

    monkeypatch.setattr(matching, "dense_window", fake)
    got = matching.match_runs({"a": "a", "b": "b", "c": "c"}, 1.0, "cpu", print)
    # no triple within 0.002 at the 0.01 window (the 8 triples spread >= 0.004); at 0.02 the steps-2 triple
    assert {k: v["step"] for k, v in got.items()} == {"a": 2, "b": 2, "c": 2}
    assert {v["window"] for v in got.values()} == {2 * MATCH_WINDOW} == {0.02}
    spread = max(v["train_loss"] for v in got.values()) - min(v["train_loss"] for v in got.values())
    assert spread <= MATCH_TOL
    monkeypatch.setattr(matching, "MATCH_WINDOW", 0.004)  # 0.004, 0.008, 0.016: never a triple within 0.002
    got = matching.match_runs({"a": "a", "b": "b", "c": "c"}, 1.0, "cpu", print)
    assert {v["window"] for v in got.values()} == {0.016}
    spread = max(v["train_loss"] for v in got.values()) - min(v["train_loss"] for v in got.values())
    assert MATCH_TOL < spread == pytest.approx(0.004)  # the smallest spread of the 8 triples
