"""Suites (seeded, source-pure, fixed held-out eval splits, mixture weights, OOD) and models."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from nexus_opt.errors import UserError
from nexus_opt.models import GPT, MLP, Point, build_model, model_from_spec
from nexus_opt.suites import make_suite
from nexus_opt.suites.bowls import bowl_loss

TEXT_OPTS = {"block_size": 32, "eval_batches": 2, "eval_batch_size": 8}


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.to(torch.uint8).tolist())


def _batches_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _suite(name, seed=0, weights=None):
    opts = {"text": TEXT_OPTS, "mix": {}, "bowls": {"dim": 3, "n_domains": 3}}[name]
    return make_suite(name, seed=seed, weights=weights, options=dict(opts))


# -- determinism by seed ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["text", "mix", "bowls"])
def test_same_seed_same_batches_and_domain_choices(name):
    s1, s2, other = _suite(name, 3), _suite(name, 3), _suite(name, 4)
    keys = [(d, step, micro) for d in s1.train_domains for step in (0, 7) for micro in (0, 1)]
    for d, step, micro in keys:
        assert _batches_equal(s1.train_batch(d, step, micro, 4), s2.train_batch(d, step, micro, 4))
    for d in s1.domains:
        e1, e2 = s1.eval_batches(d), s2.eval_batches(d)
        assert len(e1) == len(e2) >= 1
        assert all(_batches_equal(a, b) for a, b in zip(e1, e2))
        # the eval batches are fixed: asking again gives the same
        assert all(_batches_equal(a, b) for a, b in zip(e1, s1.eval_batches(d)))
    draws = [(step, micro) for step in range(100) for micro in range(2)]
    seq1 = [s1.sample_domain(*k) for k in draws]
    assert seq1 == [s2.sample_domain(*k) for k in draws]
    # a different seed draws other domains ...
    assert seq1 != [other.sample_domain(*k) for k in draws]
    if name == "bowls":  # ... and other bowls (noise-free bowls have one batch: their own minimum)
        assert not torch.equal(s1.m["bowl0"], other.m["bowl0"])
        return
    # ... and other batches; the batch also changes with the step and micro index
    assert not _batches_equal(s1.train_batch(s1.train_domains[0], 0, 0, 4),
                              other.train_batch(s1.train_domains[0], 0, 0, 4))
    assert not _batches_equal(s1.train_batch(s1.train_domains[0], 0, 0, 4),
                              s1.train_batch(s1.train_domains[0], 0, 1, 4))
    assert not _batches_equal(s1.train_batch(s1.train_domains[0], 0, 0, 4),
                              s1.train_batch(s1.train_domains[0], 1, 0, 4))
    assert not _batches_equal(s1.eval_batches(s1.domains[0])[0], other.eval_batches(s1.domains[0])[0])


# -- text: source purity and held-out splits --------------------------------------------------------
@pytest.fixture(scope="module")
def text_suite():
    return _suite("text", seed=5)


def test_text_batches_are_windows_of_their_own_domains_split(text_suite):
    s = text_suite
    T = TEXT_OPTS["block_size"] + 1
    train = {d: _bytes(s.corpus(d, "train")) for d in s.domains}
    evals = {d: _bytes(s.corpus(d, "eval")) for d in s.domains}
    for d in s.train_domains:
        for step in range(3):
            tok = s.train_batch(d, step, 1, 6)["tokens"]
            assert tok.shape == (6, T) and tok.dtype == torch.long
            for row in tok:
                assert _bytes(row) in train[d], (d, _bytes(row))
    for d in s.domains:
        for b in s.eval_batches(d):
            assert b["tokens"].shape == (TEXT_OPTS["eval_batch_size"], T)
            for row in b["tokens"]:
                assert _bytes(row) in evals[d], (d, _bytes(row))
    # math windows are arithmetic, wordmath windows are English word problems
    allowed = set(b"0123456789+-*=()solvex: \n")
    assert all(set(_bytes(r)) <= allowed for r in s.train_batch("math", 0, 0, 6)["tokens"])
    assert any(w in evals["wordmath"] for w in (b" has ", b" more.", b" gave away "))


def test_prose_eval_split_is_every_tenth_topic_and_never_trained(text_suite):
    from pydoc_data.topics import topics

    texts = [topics[k].encode() for k in sorted(topics)]
    train, ev = _bytes(text_suite.corpus("prose", "train")), _bytes(text_suite.corpus("prose", "eval"))
    held_out = [t for t in texts if t in ev and len(t) > 100]
    trained = [t for t in texts if t in train and len(t) > 100]
    assert len(held_out) >= len(texts) // 10 - 2 and len(trained) >= len(texts) // 2
    # every topic text is on exactly one side: none of the evaluation text is in the training corpus
    leaked = [t[:40] for t in held_out if t in train]
    assert not leaked, f"held-out prose found in the training corpus: {leaked}"


def test_code_eval_split_is_disjoint_from_train(text_suite):
    train, ev = _bytes(text_suite.corpus("code", "train")), _bytes(text_suite.corpus("code", "eval"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    n_train = n_eval = 0
    for p in sorted(stdlib.glob("*.py")):
        b = p.read_bytes()
        if len(b) < 2000:  # long modules only: a short one may occur inside another
            continue
        in_train, in_eval = b in train, b in ev
        assert not (in_train and in_eval), f"{p.name} is in both the train and the eval split"
        n_train += in_train
        n_eval += in_eval
    assert n_eval >= 2 and n_train >= 5 * n_eval


# -- mix and bowls: source purity ------------------------------------------------------------------
def test_mix_batches_come_from_one_domain():
    s = _suite("mix", seed=2)
    for d in s.domains:
        b = s.train_batch(d, 0, 0, 512) if d != "ood" else s.eval_batches(d)[0]
        x, y = b["x"], b["y"]
        # inputs are drawn around the domain's own mean ...
        dist = {k: float((x.mean(0) - s.mu[k]).norm()) for k in s.domains}
        assert min(dist, key=dist.get) == d
        # ... and the targets are the domain's function: residual = label noise only, for that domain alone
        spec = {k: s._f(k, x) for k in s.domains[:-1]}
        spec["ood"] = torch.stack([spec[k] for k in s.domains[:-1]]).mean(0)
        resid = {k: float((y - s._f("shared", x) - s.alpha * spec[k]).std()) for k in s.domains}
        noise = s.options["noise"]
        assert resid[d] < 1.5 * noise
        assert all(resid[k] > 2 * noise for k in s.domains if k != d), resid


# -- the sampler: mixture weights, OOD never trained -------------------------------------------------
@pytest.mark.parametrize("weights", [{"a": 1, "b": 2, "c": 5}, {"a": 0, "b": 1, "c": 3}, None])
def test_sampler_follows_mixture_weights_and_skips_ood(weights):
    s = make_suite("mix", seed=1, weights=weights)
    raw = weights or {"a": 1, "b": 1, "c": 1}
    total = sum(raw.values())
    expected = {d: raw[d] / total for d in raw}
    assert s.weights == pytest.approx(expected, abs=1e-15)
    n = 4000
    draws = [s.sample_domain(step, micro) for step in range(n // 4) for micro in range(4)]
    assert "ood" not in draws
    for d, p in expected.items():
        freq = draws.count(d) / n
        if p == 0:
            assert freq == 0
        else:
            se = math.sqrt(p * (1 - p) / n)
            assert abs(freq - p) < 4 * se, (d, freq, p)


@pytest.mark.parametrize("name,ood", [("text", "wordmath"), ("bowls", "ood")])
def test_ood_domain_is_never_sampled_and_cannot_be_weighted(name, ood):
    s = _suite(name)
    assert s.ood_domains == [ood] and ood in s.domains and ood not in s.train_domains
    assert ood not in {s.sample_domain(step, m) for step in range(300) for m in range(2)}
    assert set(s.train_domains) == {s.sample_domain(step, m) for step in range(300) for m in range(2)}
    with pytest.raises(UserError):
        make_suite(name, weights={ood: 1.0}, options={"dim": 2} if name == "bowls" else TEXT_OPTS)


@pytest.mark.parametrize("kw", [dict(name="nope"), dict(name="mix", options={"bogus": 1}),
                                dict(name="mix", weights={"a": -1, "b": 1}), dict(name="mix", weights={"a": 0}),
                                dict(name="bowls", options={"preset": "fig9"}), dict(name="bowls", options={"dim": 0}),
                                dict(name="text", options={"block_size": 1})])
def test_bad_suite_arguments_are_user_errors(kw):
    with pytest.raises(UserError) as e:
        make_suite(**kw)
    assert "\n" not in str(e.value) and str(e.value)


# -- bowls: analytic minima --------------------------------------------------------------------------
def _point(theta) -> Point:
    """A float64 Point at theta."""
    p = Point(dim=len(theta)).double()
    with torch.no_grad():
        p.theta.copy_(torch.as_tensor(theta, dtype=torch.float64))
    return p


def _grad(suite, theta, domains_weights) -> torch.Tensor:
    """Gradient of sum_d w_d loss_fn(Point(theta), eval batch of d), by autograd through the trainer's loss."""
    p = _point(theta)
    loss = sum(w * suite.loss_fn(p, suite.eval_batches(d)[0]) for d, w in domains_weights.items())
    loss.backward()
    return p.theta.grad.detach()


@pytest.mark.parametrize("dim,seed", [(1, 0), (2, 1), (5, 2), (12, 3)])
def test_bowl_minima_are_where_the_formulas_say(dim, seed):
    weights = {"bowl0": 1.0, "bowl1": 3.0, "bowl2": 0.5}
    s = make_suite("bowls", seed=seed, weights=weights, options={"dim": dim, "n_domains": 3, "spread": 2.0})
    rng = np.random.default_rng(seed)
    for d in s.domains:
        m = s.minimum(d)
        # the trainer's loss (float32 batches) and the analytic loss agree
        x = torch.as_tensor(rng.normal(size=dim))
        assert s.loss_fn(_point(x), s.eval_batches(d)[0]).item() == pytest.approx(s.loss(d, x), rel=1e-5)
        # argmin of suite.loss(d, .) found numerically, from a point far away
        found = minimize(lambda v: s.loss(d, torch.as_tensor(v)), rng.normal(size=dim) * 3, method="BFGS",
                         options={"gtol": 1e-10}).x
        assert np.allclose(found, m.numpy(), atol=1e-5)
        # the gradient of the trainer's loss vanishes there (float32 data: ~1e-6), and not elsewhere
        assert _grad(s, m, {d: 1.0}).abs().max() < 1e-4
        assert _grad(s, m + 0.1, {d: 1.0}).abs().max() > 1e-2
        # the Hessian of the trainer's loss is the suite's (SPD) A
        H = torch.autograd.functional.hessian(lambda t: bowl_loss(lambda: t, s.eval_batches(d)[0]), m.clone())
        assert torch.allclose(H, s.hessian(d), atol=1e-5)
        assert torch.linalg.eigvalsh(s.hessian(d)).min() > 0
    # minimum(None) = solve(sum w A, sum w A m) zeroes the gradient of the weighted training loss
    w = {d: v / 4.5 for d, v in weights.items()}
    assert s.weights == pytest.approx(w)
    star = s.minimum(None)
    A = sum(w[d] * s.A[d] for d in w)
    b = sum(w[d] * s.A[d] @ s.m[d] for d in w)
    assert torch.allclose(star, torch.linalg.solve(A, b), atol=1e-10)
    assert _grad(s, star, w).abs().max() < 1e-4
    found = minimize(lambda v: sum(w[d] * s.loss(d, torch.as_tensor(v)) for d in w), np.zeros(dim),
                     method="BFGS", options={"gtol": 1e-10}).x
    assert np.allclose(found, star.numpy(), atol=1e-5)
    # ... which is neither the plain mean of the minima nor the uniform-weight solution
    uniform = torch.linalg.solve(sum(s.A[d] for d in w), sum(s.A[d] @ s.m[d] for d in w))
    mean = torch.stack([s.m[d] for d in w]).mean(0)
    assert _grad(s, uniform, w).abs().max() > 1e-3 and _grad(s, mean, w).abs().max() > 1e-3


def test_bowls_ood_minimum_lies_beyond_the_trained_ones():
    s = make_suite("bowls", seed=0, options={"dim": 4, "n_domains": 3})
    assert s.ood_domains == ["ood"]
    mean = torch.stack([s.m[d] for d in s.train_domains]).mean(0)
    assert float((s.m["ood"] - mean).norm()) > 0.1


@pytest.mark.parametrize("preset,target", [("fig2-sum", 2.68), ("fig2-intersection", 1.10)])
def test_figure2_presets(preset, target):
    # nexus.md, Figure 2: parabolas 8 (x - m)^2 + c with c such that the training loss at x = 0 is 1.0.
    # Target loss at 0: 8 * 0.5^2 + 0.68 = 2.68 ('fig2-sum'; the paper's figure prints 2.67, a rounding)
    # and 8 * 0.15^2 + 0.92 = 1.10 ('fig2-intersection').
    from landscape import Objective

    s = make_suite("bowls", options={"preset": preset})
    assert s.train_domains == ["train1", "train2"] and s.ood_domains == ["target"]
    zero = torch.zeros(1, dtype=torch.float64)
    assert sum(s.weights[d] * s.loss(d, zero) for d in s.train_domains) == pytest.approx(1.0, abs=1e-12)
    assert s.loss("target", zero) == pytest.approx(target, abs=1e-12)
    # the same numbers through the trainer's default model, the loss_fn and an Objective
    name, cfg = s.default_model()
    model = build_model(name, cfg)
    assert torch.equal(model(), torch.zeros(1))
    obj = Objective(model, {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains,
                    weights=s.weights)
    losses = obj.losses()
    assert losses["train"] == pytest.approx(1.0, abs=1e-6)
    assert losses["target"] == pytest.approx(target, abs=1e-6)
    # the training minima are symmetric around 0, which is the minimum of the training loss
    assert float(s.minimum("train1")) == pytest.approx(-float(s.minimum("train2")))
    assert float(s.minimum(None)) == pytest.approx(0.0, abs=1e-12)
    assert s.loss("train1", s.minimum("train1")) == pytest.approx(s.c["train1"])


# -- models ----------------------------------------------------------------------------------------
def test_models_run_forward_on_cpu():
    torch.manual_seed(0)
    mlp = build_model("mlp", {"in_dim": 5, "hidden": 7, "depth": 2})
    assert isinstance(mlp, MLP) and mlp(torch.randn(3, 5)).shape == (3, 1)
    gpt = build_model("gpt", {"block_size": 16, "n_embd": 16, "n_layer": 1, "n_head": 2})
    assert isinstance(gpt, GPT)
    tok = torch.randint(0, 256, (2, 16))
    logits = gpt(tok)
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()
    # causal: a later token does not change earlier logits
    tok2 = tok.clone()
    tok2[:, -1] = (tok2[:, -1] + 1) % 256
    assert torch.allclose(gpt(tok2)[:, :-1], logits[:, :-1], atol=1e-6)
    assert gpt.head.weight is gpt.wte.weight  # tied head
    with pytest.raises(UserError):
        gpt(torch.zeros(1, 17, dtype=torch.long))
    pt = build_model("point", {"dim": 3, "init": [1.0, 2.0, 3.0]})
    assert isinstance(pt, Point) and torch.equal(pt(), torch.tensor([1.0, 2.0, 3.0]))
    # the text suite's default model runs on the suite's batches with its loss
    s = make_suite("text", options={"block_size": 16})
    name, cfg = s.default_model()
    m = build_model(name, {**cfg, "n_embd": 16, "n_layer": 1})
    loss = s.loss_fn(m, s.train_batch("code", 0, 0, 2))
    assert abs(loss.item() - math.log(256)) < 0.5  # ~uniform over bytes at init


@pytest.mark.parametrize("name,config", [
    ("transformer", {}), ("", {}), ("mlp", {"bogus": 1}), ("mlp", {"activation": "swish"}),
    ("gpt", {"n_embd": 10, "n_head": 3}), ("gpt", {"n_embd": -4, "n_head": 1}), ("gpt", {"n_layer": "two"}),
    ("point", {"dim": 2, "init": [1.0]}), ("point", {"dim": -1}),
])
def test_build_model_bad_input_is_user_error(name, config):
    with pytest.raises(UserError) as e:
        build_model(name, config)
    assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.parametrize("spec,trust", [
    ([1, 2], True), ({"name": "mlp", "config": [1]}, True), ({"name": "nope"}, True),
    ({"factory": "torch.nn:Identity"}, False),  # a factory that would work, but code is not trusted
    ({"factory": "os:getcwd"}, True),  # returns no Module
    ({"factory": "no_colon_here"}, True), ({"factory": "surely_missing_module_xyz:f"}, True),
])
def test_model_from_spec_bad_input_is_user_error(spec, trust):
    with pytest.raises(UserError) as e:
        model_from_spec(spec, trust_remote_code=trust)
    assert "\n" not in str(e.value)
    assert isinstance(model_from_spec({"factory": "torch.nn:Identity"}, trust_remote_code=True), torch.nn.Identity)
