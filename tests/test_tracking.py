"""GradSimTracker: rows equal a direct gradient_similarity call at the same (outer) weights; hygiene; trainer/CLI."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_TEXT, assert_one_line_error, invoke_cli, read_metrics, tiny_config
from landscape import Objective, load
from landscape.gradsim import gradient_similarity
from landscape.tracking import GradSimTracker, row_from_result
from nexus_opt import Nexus
from nexus_opt.models import build_model
from nexus_opt.suites import make_suite
from nexus_opt.train import train

TEXT_SUITE = dict(name="text", seed=0, weights=None, options=TINY_TEXT["suite_options"])


def _same(row: dict, direct: dict) -> None:
    """Every cosine, floor, stderr, norm and loss of two rows agree to 1e-10."""
    assert row["step"] == direct["step"] and row["domains"] == direct["domains"]
    for key in ("pairs", "pair_stderr", "split_half", "norms", "loss"):
        assert row[key].keys() == direct[key].keys()
        for k in row[key]:
            a, b = row[key][k], direct[key][k]
            assert (a is None) == (b is None), (key, k)
            if a is not None:
                assert a == pytest.approx(b, abs=1e-10, rel=1e-10), (key, k)
    for key in ("mean_cosine", "mean_cosine_stderr", "conflict_rate"):
        assert row[key] == pytest.approx(direct[key], abs=1e-10)


def test_trainer_rows_equal_direct_call_on_the_checkpoint(tmp_path, optimizer="nexus"):
    """Rows written by train(on_step_record=tracker) equal gradient_similarity on the checkpoint of that step
    (for Nexus: the outer/anchor weights the checkpoint holds)."""
    tracker = GradSimTracker.from_suite_spec(TEXT_SUITE, every=2, seed=3, resamples=20)
    train(tiny_config(TINY_TEXT, tmp_path / "run", optimizer=optimizer), on_step_record=tracker)
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "gradsim"]
    assert [r["step"] for r in rows] == [2, 4] and rows == tracker.rows
    for row in rows:
        obj = load(tmp_path / "run" / f"ckpt-{row['step']:06d}")
        direct = row_from_result(row["step"], gradient_similarity(obj, seed=3, resamples=20, per_layer=False))
        _same(row, direct)
        assert row["split_half"] and all(v is not None for v in row["split_half"].values())
        assert row["mean_cosine_stderr"] is not None and row["seconds"] > 0


def _tiny_model_and_suite(seed=0):
    s = make_suite(**TEXT_SUITE)
    name, cfg = s.default_model()
    torch.manual_seed(seed)
    return build_model(name, {**cfg, **TINY_TEXT["model_config"]}), s


def test_nexus_loop_measures_only_at_outer_boundaries_at_the_anchor_weights():
    """A plain loop calling the tracker after every inner step: mid-walk calls are skipped, rows come at outer
    steps (micro_step // K), and they equal a direct call on a separate model holding the anchor (outer) weights
    that Nexus swaps in mid-walk (anchor_weights()) during the following walk."""
    model, s = _tiny_model_and_suite()
    K = 3
    opt = Nexus(torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-10), inner_lr=0.05, inner_steps=K)
    tracker = GradSimTracker.from_suite(s, every=2, resamples=10)
    doms = s.train_domains
    anchors = {}
    for micro in range(4 * K + 1):
        d = doms[micro % len(doms)]
        s.loss_fn(model, s.train_batch(d, micro, 0, 4)).backward()
        opt.step()
        opt.zero_grad()
        row = tracker(None, model, opt)
        if not opt.at_outer_boundary:
            assert row is None
            with opt.anchor_weights():  # the outer weights of the last outer step, while the model walks
                anchors[opt.micro_step // K] = [p.detach().clone() for p in model.parameters()]
    assert [r["step"] for r in tracker.rows] == [2, 4] and tracker.skipped_mid_walk == 4 * (K - 1) + 1
    domains = {d: s.eval_batches(d) for d in s.domains}
    for row in tracker.rows:
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for p, a in zip(ref.parameters(), anchors[row["step"]]):
                p.copy_(a)
        assert any(not torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))  # mid-walk now
        obj = Objective(ref, domains, s.loss_fn, train_domains=s.train_domains, weights=s.weights, ood=s.ood_domains)
        _same(row, row_from_result(row["step"], gradient_similarity(obj, resamples=10, per_layer=False)))


def test_tracker_leaves_model_grad_rng_and_modes_alone():
    model, s = _tiny_model_and_suite()
    model.train()
    model.blocks[0].eval()  # mixed flags: each module's own flag must come back
    flags = [m.training for m in model.modules()]
    s.loss_fn(model, s.train_batch(s.train_domains[0], 0, 0, 4)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    tracker = GradSimTracker.from_suite(s, every=1, resamples=5)
    assert tracker(1, model) is not None
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert tracker(1, model) is None  # a step is measured once
    assert tracker(2, model) is not None and [r["step"] for r in tracker.rows] == [1, 2]


def test_bad_settings_fail_with_one_line():
    model, s = _tiny_model_and_suite()
    with pytest.raises(Exception, match="every must be at least 1"):
        GradSimTracker.from_suite(s, every=0)
    with pytest.raises(Exception, match="unknown domain"):
        GradSimTracker.from_suite(s, domains=["nope"])


def test_cli_train_gradsim_every_writes_rows(tmp_path):
    args = ["train", "--out", tmp_path / "run", "--suite", "text", "--suite-options",
            "block_size=16,eval_batches=2,eval_batch_size=4", "--model-config", "n_embd=16,n_layer=1,n_head=2",
            "--steps", "4", "--batch-size", "4", "--accum", "2", "--warmup", "1", "--eval-every", "2",
            "--ckpt-every", "2", "--device", "cpu", "--optimizer", "nexus", "--gradsim-every", "2"]
    r = invoke_cli(*args)
    assert r.exit_code == 0, r.output
    rows = [x for x in read_metrics(tmp_path / "run") if x.get("kind") == "gradsim"]
    assert [x["step"] for x in rows] == [2, 4]
    assert set(rows[0]["pairs"]) == {"code|prose", "code|math", "code|wordmath", "prose|math", "prose|wordmath",
                                     "math|wordmath"}
    assert rows[0]["summary_domains"] == ["code", "prose", "math"]
    # resume continues the rows; the dropped tail is rewritten exactly once
    r = invoke_cli("train", "--out", tmp_path / "run", "--resume", "--steps", "6", "--device", "cpu",
                   "--gradsim-every", "2")
    assert r.exit_code == 0, r.output
    rows = [x for x in read_metrics(tmp_path / "run") if x.get("kind") == "gradsim"]
    assert [x["step"] for x in rows] == [2, 4, 6]
    bad = invoke_cli(*args[:-1], "-1")
    assert_one_line_error(bad.exit_code, bad.stderr, contains="--gradsim-every")
