"""The trainer: logged losses = reloaded losses, sampler-driven source-pure steps, divergence, user models."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import landscape
from nexus_opt import checkpoint as ck
from nexus_opt.errors import TrainingDiverged, UserError
from nexus_opt.suites import make_suite
from nexus_opt.train import train

from conftest import TINY_MIX, assert_one_line_error, invoke_cli, read_metrics, tiny_config


def _evals(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "eval"}


@pytest.mark.parametrize("run_name", ["tiny_mix_run", "tiny_text_run"])
def test_loaded_objective_reproduces_the_logged_losses(request, run_name):
    run = request.getfixturevalue(run_name)
    evals = _evals(run.path)
    ckpts = ck.list_checkpoints(run.path)
    steps = run.config["steps"]
    assert [c.name for c in ckpts] == [ck.checkpoint_name(s) for s in range(0, steps + 1, run.config["ckpt_every"])]
    for c in ckpts:
        obj = landscape.load(c)
        step = obj.meta["step"]
        assert c.name == ck.checkpoint_name(step)
        got = obj.losses()
        logged = evals[step]
        manifest = ck.read_checkpoint(c).manifest["metrics"]
        assert set(got) == set(logged["losses"]) | {"train"}
        for d, v in logged["losses"].items():
            assert abs(got[d] - v) <= 1e-9, (c.name, d, got[d], v)
            assert manifest["losses"][d] == v
        assert abs(got["train"] - logged["train_loss"]) <= 1e-9
        assert manifest["train_loss"] == logged["train_loss"]
    # the run directory means its latest checkpoint; the trainer's returned losses are those of the last step
    final = landscape.load(run.path)
    assert final.meta["step"] == steps
    assert final.losses()["train"] == pytest.approx(run.result["train_loss"], abs=1e-9)
    # training changed the weights (the comparison above is not between identical models)
    assert evals[steps]["train_loss"] != evals[0]["train_loss"]
    suite = make_suite(run.config["suite"], seed=run.config["seed"], options=run.config.get("suite_options"))
    assert final.ood == suite.ood_domains and list(final.domains) == suite.domains
    assert final.train_domains == suite.train_domains


def test_each_micro_batch_is_one_domain_drawn_by_the_seeded_sampler(tiny_mix_run):
    suite = make_suite("mix", seed=TINY_MIX["seed"])
    train_recs = [r for r in read_metrics(tiny_mix_run.path) if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, TINY_MIX["steps"] + 1))
    seen = set()
    for r in train_recs:
        doms = [m["domain"] for m in r["micro"]]
        assert doms == [suite.sample_domain(r["step"] - 1, k) for k in range(TINY_MIX["accum"])]
        assert all(math.isfinite(m["loss"]) for m in r["micro"])
        seen.update(doms)
    assert "ood" not in seen and len(seen) >= 2


def test_micro_batch_losses_are_those_of_the_suites_batches(tmp_path):
    """At step 1 (weights = init) each logged micro loss is loss_fn(init model, train_batch(d, 0, k))."""
    out = tmp_path / "run"
    train(tiny_config(TINY_MIX, out, steps=1))
    init = landscape.load(out / ck.checkpoint_name(0))
    suite = landscape.suite_of(init)
    rec = next(r for r in read_metrics(out) if r["kind"] == "train")
    model = init.model.train()
    for k, m in enumerate(rec["micro"]):
        batch = suite.train_batch(m["domain"], 0, k, TINY_MIX["batch_size"])
        with torch.no_grad():
            assert suite.loss_fn(model, batch).item() == pytest.approx(m["loss"], rel=1e-6)


# -- divergence --------------------------------------------------------------------------------------
def _assert_last_checkpoint_good(run_dir, expected: str):
    assert json.loads((run_dir / "latest.json").read_text())["checkpoint"] == expected
    c = ck.read_checkpoint(run_dir)
    assert c.path.name == expected
    assert all(math.isfinite(v) for v in c.manifest["metrics"]["losses"].values())
    assert all(torch.isfinite(t).all() for t in load_file(str(c.path / "model.safetensors")).values())
    read_metrics(run_dir)  # strict JSON: no NaN/Infinity was logged


def test_divergence_stops_with_step_and_domain_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config({"suite": "bowls", "device": "cpu"}, out, optimizer="sgd", lr=1e6, steps=30, accum=1,
                      warmup=0, eval_every=1, ckpt_every=1)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg)
    err = e.value
    msg = str(err)
    assert isinstance(err, UserError) and "\n" not in msg
    assert f"step {err.step}" in msg and f"'{err.domain}'" in msg
    assert err.domain in make_suite("bowls").domains
    assert 1 <= err.step < 30
    last = ck.checkpoint_name(err.step - 1)
    assert err.last_checkpoint == str(out / last) and last in msg
    _assert_last_checkpoint_good(out, last)
    obj = landscape.load(out)
    assert obj.meta["step"] == err.step - 1
    assert all(math.isfinite(v) for v in obj.losses().values())
    assert not (out / ck.checkpoint_name(err.step)).exists()


_FACTORY = textwrap.dedent("""
    import torch

    class Flaky(torch.nn.Module):
        '''A linear model whose training-mode forward returns NaN after `nan_after` calls.'''

        def __init__(self, in_dim, nan_after):
            super().__init__()
            self.lin = torch.nn.Linear(in_dim, 1)
            self.calls, self.nan_after = 0, nan_after

        def forward(self, x):
            y = self.lin(x)
            if self.training:
                self.calls += 1
                if self.calls > self.nan_after:
                    return y * float("nan")
            return y

    def flaky(in_dim=8, nan_after=10 ** 9):
        return Flaky(in_dim, nan_after)

    def small(in_dim=8, hidden=8):
        return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
""")


@pytest.fixture
def factory_module(tmp_path, monkeypatch, request):
    """A user model module on sys.path (unique name per test, removed after)."""
    name = f"user_models_{request.node.name.split('[')[0][-24:]}"
    d = tmp_path / "usercode"
    d.mkdir()
    (d / f"{name}.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return name


def _mix_args(out, *more):
    c = TINY_MIX
    return ["train", "--suite", "mix", "--out", out, "--steps", c["steps"], "--batch-size", c["batch_size"],
            "--accum", c["accum"], "--warmup", c["warmup"], "--eval-every", c["eval_every"],
            "--ckpt-every", c["ckpt_every"], "--device", "cpu", *more]


def test_nan_from_the_model_stops_the_cli_naming_step_and_domain(tmp_path, factory_module):
    # NaN on the 8th training forward = step 4 (1-based), micro-batch 1 (accum 2); pick a seed whose two
    # micro-batches of that step come from different domains, so that naming the wrong one fails
    seed = next(s for s in range(50)
                if make_suite("mix", seed=s).sample_domain(3, 0) != make_suite("mix", seed=s).sample_domain(3, 1))
    domain = make_suite("mix", seed=seed).sample_domain(3, 1)
    out = tmp_path / "run"
    r = invoke_cli(*_mix_args(out, "--seed", seed, "--model-factory", f"{factory_module}:flaky",
                              "--model-config", "in_dim=8,nan_after=7", "--trust-remote-code"))
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0]
    assert "step 4 " in errors[0] and f"domain '{domain}'" in errors[0] and "ckpt-000002" in errors[0]
    _assert_last_checkpoint_good(out, "ckpt-000002")
    assert max(r["step"] for r in read_metrics(out)) == 3  # nothing of step 4 was logged
    obj = landscape.load(out, trust_remote_code=True)
    assert obj.meta["step"] == 2 and all(math.isfinite(v) for v in obj.losses().values())


# -- user model factories -------------------------------------------------------------------------------
def test_user_model_factory_needs_trust_remote_code(tmp_path, factory_module):
    out = tmp_path / "run"
    spec = f"{factory_module}:small"
    r = invoke_cli(*_mix_args(out, "--model-factory", spec, "--model-config", "in_dim=8,hidden=4"))
    assert_one_line_error(r.exit_code, r.stderr, contains="--trust-remote-code")
    assert not out.exists()
    r = invoke_cli(*_mix_args(out, "--model-factory", spec, "--model-config", "in_dim=8,hidden=4",
                              "--trust-remote-code"))
    assert r.exit_code == 0, r.stderr
    manifest = ck.read_checkpoint(out).manifest
    assert manifest["model"] == {"factory": spec, "config": {"in_dim": 8, "hidden": 4}}
    # loading imports the factory only when trusted
    with pytest.raises(UserError) as e:
        landscape.load(out)
    assert "trust_remote_code" in str(e.value) and "\n" not in str(e.value)
    obj = landscape.load(out, trust_remote_code=True)
    assert isinstance(obj.model, torch.nn.Sequential) and obj.model[0].out_features == 4
    logged = _evals(out)[TINY_MIX["steps"]]
    got = obj.losses()
    assert all(abs(got[d] - v) <= 1e-9 for d, v in logged["losses"].items())
    # resuming imports it too: refused without the flag, fine with it
    r = invoke_cli("train", "--resume", "--out", out, "--steps", 7)
    assert_one_line_error(r.exit_code, r.stderr, contains="--trust-remote-code")
    assert ck.read_checkpoint(out).step == TINY_MIX["steps"]
    r = invoke_cli("train", "--resume", "--out", out, "--steps", 7, "--trust-remote-code")
    assert r.exit_code == 0, r.stderr
    assert ck.read_checkpoint(out).step == 7
