"""The dose-response study (quick plan): the K = 1 null is zero, every comparison carries its MDE, the
predictions come before the outcomes, and the figures and data are written."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, invoke_cli


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from landscape.app.study import run_study, study_preset

    out = tmp_path_factory.mktemp("study")
    return run_study(study_preset(quick=True, out=str(out)))


def test_k1_null_is_zero(study):
    from landscape import load
    from landscape.app.study import NULL_TOL

    mx = study["null_max_abs_diff"]
    assert set(mx) == {"train_loss", "ood_loss", "mean_cosine", "rate_difference", "end:train_loss",
                       "end:ood_loss", "end:mean_cosine"}
    assert all(v <= NULL_TOL for v in mx.values()), mx
    assert mx["rate_difference"] < 1e-12  # K = 1 has no second-order term: the directions coincide
    assert next(o for o in study["outcomes"] if o["id"] == "null")["outcome"] == "held"
    for p in study["null"]:
        assert p["mean"] is not None and abs(p["mean"]) <= NULL_TOL
    for r in study["per_seed"]:  # the two modes' matched weights agree to float32 rounding
        m = r["null"]["matched"]
        a, b = load(m["nexus"]["path"]).params(), load(m["control"]["path"]).params()
        assert m["nexus"]["step"] == m["control"]["step"]
        assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) < 1e-4


def test_every_comparison_has_its_power_and_the_grid(study):
    comps = study["comparisons"]
    assert sorted({c["gamma"] for c in comps}) == [0.05, 0.2]
    for c in comps:
        assert c["n"] == 2 and c["mde"] is not None and c["mde"] >= 0
        if c["verdict"] == "includes zero":
            assert "not detectable at this power (MDE" in c["reading"] or "exactly zero" in c["reading"]
    ids = [o["id"] for o in study["outcomes"]]
    assert ids == [p["id"] for p in study["predictions"]]
    for r in study["per_seed"]:
        for v in r["gammas"].values():
            assert v["matched"]["nexus"]["metrics"]["alignment_exact"] is True  # 3^3 orders: exact


def test_report_states_predictions_before_results_and_writes_figures(study, tmp_path):
    from pathlib import Path

    html = Path(study["report"]).read_text()
    assert html.index("Predictions") < html.index("Which held") < html.index("Pictures")
    figs = Path(study["report"]).parent / "figures"
    for name in ("study-dose", "study-cosine", "study-forest"):
        assert (figs / f"{name}.png").stat().st_size > 5000
    data = json.loads((Path(study["report"]).parent / "study.json").read_text())
    assert data["outcomes"] == study["outcomes"]
    assert set(data["curves"]) >= {"control", "nexus gamma=0.05", "nexus K=1", "control K=1"}


def test_control_is_the_same_at_every_gamma(tmp_path):
    """Why one control run per seed serves the grid: the outer Adam (eps 1e-10) does not see gamma's scale."""
    from nexus_opt.train import TrainConfig, train

    from landscape import load

    ps = []
    for g in (0.02, 0.2):
        train(TrainConfig(suite="mix", suite_options={"eval_batches": 1, "eval_batch_size": 16}, steps=10,
                          batch_size=8, accum=3, warmup=2, lr=0.01, weight_decay=0.0, eval_every=5, ckpt_every=10,
                          optimizer="nexus-parallel", inner_lr=g, seed=0, device="cpu", out=str(tmp_path / f"g{g}")))
        ps.append(load(tmp_path / f"g{g}").params())
    assert max(float((ps[0][k] - ps[1][k]).detach().abs().max()) for k in ps[0]) < 1e-5
    assert not torch.equal(ps[0][next(iter(ps[0]))], torch.zeros(1))


@pytest.mark.parametrize("args,contains", [(["--seeds", "1"], "--seeds"), (["--gammas", "x"], "--gammas")])
def test_cli_bad_input_is_one_line(tmp_path, args, contains):
    r = invoke_cli("study", "--out", str(tmp_path / "s"), "--quick", *args)
    assert_one_line_error(r.exit_code, r.stderr, contains=contains)


def test_a_finished_run_is_reused_only_with_the_same_config(tmp_path):
    from landscape.app.study import StudyConfig, _run

    tr = dict(suite="mix", suite_options={"eval_batches": 1, "eval_batch_size": 8}, steps=4, batch_size=4, accum=2,
              warmup=1, lr=0.01, weight_decay=0.0, eval_every=2, ckpt_every=2)
    cfg = StudyConfig(out=str(tmp_path), device="cpu", train=tr, gradsim_every=2)
    log = []
    _run(cfg, "r", "nexus", 0.1, 0, log.append)
    _run(cfg, "r", "nexus", 0.1, 0, log.append)
    _run(cfg, "r", "nexus", 0.2, 0, log.append)  # another gamma: not the same run
    assert log == ["train r", "reuse r", "train r"]
