"""Pieces of the demo's controlled comparison, fast: paired statistics and the trainer's stop-at-loss option."""
from __future__ import annotations

import json
import re

import pytest
from scipy import stats

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
