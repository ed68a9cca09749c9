"""gradient_similarity against float64 gradients computed by hand, its noise floor, error bars and hygiene."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape import Objective, UserError, gradient_similarity
from landscape.gradsim import GradSimResult
from nexus_opt.models import build_model
from nexus_opt.suites import make_suite


def objective(suite_name: str, seed: int = 0, batches=None, **options) -> tuple[Objective, object]:
    s = make_suite(suite_name, seed=seed, options=options)
    name, cfg = s.default_model()
    torch.manual_seed(seed)
    model = build_model(name, cfg)
    doms = batches(s) if batches else {d: s.eval_batches(d) for d in s.domains}
    return Objective(model, doms, s.loss_fn, ood=s.ood_domains, weights=s.weights), s


def hand_gradients(obj: Objective, batches_of) -> dict[str, torch.Tensor]:
    """Per-domain float64 gradients: size-weighted mean of batch gradients, with torch.autograd.grad."""
    o = obj.to(dtype=torch.float64)
    params = [p for p in o.model.parameters() if p.requires_grad]
    out = {}
    for d in o.domains:
        bs = batches_of(o, d)
        sizes = [b[next(iter(b))].shape[0] for b in bs]
        loss = sum(n / sum(sizes) * o.loss_fn(o.model, b) for n, b in zip(sizes, bs))
        out[d] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    return out


def cosine_matrix(gs: list[torch.Tensor]) -> np.ndarray:
    G = torch.stack(gs)
    n = G.norm(dim=1)
    return ((G @ G.T) / torch.outer(n, n)).numpy()


@pytest.fixture(scope="module")
def mix():
    return objective("mix", seed=1, noise=0.0, eval_batches=4, eval_batch_size=32)


def test_cosine_matrix_equals_hand_float64(mix):
    obj, _ = mix
    r = gradient_similarity(obj.to(dtype=torch.float64), resamples=20)
    hand = hand_gradients(obj, lambda o, d: o.domains[d])
    assert r.domains == list(obj.domains)
    np.testing.assert_allclose(np.array(r.cosine), cosine_matrix([hand[d] for d in r.domains]), atol=1e-12)
    for d in r.domains:
        assert r.norms[d] == pytest.approx(float(hand[d].norm()), rel=1e-10)
    # per layer: the same cosines restricted to one parameter tensor
    names = list(obj.params())
    sizes = [p.numel() for p in obj.params().values()]
    start = sum(sizes[:2])
    sl = slice(start, start + sizes[2])
    np.testing.assert_allclose(np.array(r.per_layer[names[2]]), cosine_matrix([hand[d][sl] for d in r.domains]),
                               atol=1e-12)
    # float32 model: the same answer to float32 accuracy
    r32 = gradient_similarity(obj, resamples=0, per_layer=False)
    np.testing.assert_allclose(np.array(r32.cosine), np.array(r.cosine), atol=1e-5)
    assert r32.per_layer is None and r32.cosine_stderr is None


def test_summaries_follow_the_matrix(mix):
    obj, _ = mix
    r = gradient_similarity(obj, domains=["b", "ood", "a"], resamples=30)
    assert r.domains == ["b", "ood", "a"] and r.ood == ["ood"]
    assert r.summary_domains == ["b", "a"]  # pairs of trained domains only
    c = np.array(r.cosine)
    assert r.mean_offdiag_cosine == pytest.approx(c[0, 2])
    assert r.conflict_rate == (1.0 if c[0, 2] < 0 else 0.0)
    assert "train" not in r.loss  # not every trained domain was selected
    full = gradient_similarity(obj, resamples=0, per_layer=False)
    k = [full.domains.index(d) for d in full.summary_domains]
    pairs = [full.cosine[i][j] for a, i in enumerate(k) for j in k[a + 1:]]
    assert full.summary_domains == obj.train_domains
    assert full.mean_offdiag_cosine == pytest.approx(np.mean(pairs))
    assert full.conflict_rate == pytest.approx(np.mean(np.array(pairs) < 0))
    assert full.loss["train"] == pytest.approx(obj.loss("train"), rel=1e-5)


def test_bowl_gradients_analytic():
    obj, s = objective("bowls", seed=3, dim=4, n_domains=3)
    obj = obj.to(dtype=torch.float64)
    theta = obj.params()["theta"].detach()
    g = [s.A[d].float().double() @ (theta - s.m[d].float().double()) for d in obj.domains]  # batches hold float32
    r = gradient_similarity(obj)
    np.testing.assert_allclose(np.array(r.cosine), cosine_matrix(g), atol=1e-10)
    # a single batch of a single example: no noise floor, no bootstrap, and it says why
    assert all(v is None for v in r.split_half.values())
    assert all("one example" in r.split_half_reason[d] for d in r.domains)
    assert all(r.cosine_stderr[i][j] is None for i in range(4) for j in range(4) if i != j)
    assert r.mean_offdiag_stderr is None


def test_split_half_floor_deterministic_domains():
    # bowls without noise: every training batch of a domain is the same quadratic -> floor exactly 1
    obj, _ = objective("bowls", seed=0, dim=3, n_domains=2,
                       batches=lambda s: {d: [s.train_batch(d, t, 0, 4) for t in range(4)] for d in s.domains})
    r = gradient_similarity(obj, resamples=50)
    for d in r.domains:
        assert r.split_half[d] == pytest.approx(1.0, abs=1e-6)
    off = np.array(r.cosine_stderr)
    assert np.allclose(off, 0.0, atol=1e-6)  # identical batches: resampling changes nothing


def test_split_half_single_batch_cut_into_chunks(mix):
    obj, _ = mix
    one = Objective(obj.model, {d: [{k: torch.cat([b[k] for b in bs]) for k in ("x", "y")}]
                                for d, bs in obj.domains.items()}, obj.loss_fn, ood=obj.ood)
    r = gradient_similarity(one.to(dtype=torch.float64), resamples=40)
    # independent: the two halves are the even and odd chunks of 8 equal chunks of the 128 examples
    o = one.to(dtype=torch.float64)
    for d in r.domains:
        b = o.domains[d][0]
        chunks = [{k: v[16 * i:16 * (i + 1)] for k, v in b.items()} for i in range(8)]
        params = list(o.params().values())

        def grad(cs):
            loss = sum(o.loss_fn(o.model, c) for c in cs) / len(cs)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        ga, gb = grad(chunks[0::2]), grad(chunks[1::2])
        assert r.split_half[d] == pytest.approx(float(ga @ gb / ga.norm() / gb.norm()), abs=1e-10)
        assert r.split_half[d] > 0.8  # noiseless regression at init: the halves agree
    se = np.array(r.cosine_stderr)
    assert np.all(se[~np.eye(4, dtype=bool)] > 0) and np.all(np.diag(se) == 0)


def test_without_split_half_one_backward_per_batch_and_the_same_cosines(mix):
    """split_half=False: the same cosines from one backward per batch (a single batch is not cut), no floors."""
    from landscape import gradsim

    obj, _ = mix
    one = Objective(obj.model, {d: [{k: torch.cat([b[k] for b in bs]) for k in ("x", "y")}]
                                for d, bs in obj.domains.items()}, obj.loss_fn, ood=obj.ood)
    calls = []
    orig = gradsim._row_gradient

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    gradsim._row_gradient = counted
    try:
        fast = gradient_similarity(one, resamples=0, per_layer=False, split_half=False)
    finally:
        gradsim._row_gradient = orig
    full = gradient_similarity(one, resamples=0, per_layer=False)
    assert len(calls) == len(one.domains)  # one row per domain (the rounding probe is separate)
    np.testing.assert_allclose(np.array(fast.cosine), np.array(full.cosine), atol=1e-12)
    assert all(v is None for v in fast.split_half.values())
    assert all("split_half=False" in fast.split_half_reason[d] for d in fast.domains)


def test_bootstrap_is_seeded(mix):
    obj, _ = mix
    a = gradient_similarity(obj, seed=5, resamples=40, per_layer=False)
    b = gradient_similarity(obj, seed=5, resamples=40, per_layer=False)
    c = gradient_similarity(obj, seed=6, resamples=40, per_layer=False)
    assert a.cosine_stderr == b.cosine_stderr and a.cosine_stderr != c.cosine_stderr
    assert a.cosine == c.cosine  # the point estimate does not depend on the seed
    assert 0 < a.mean_offdiag_stderr < 0.5


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.bn(self.inp(x)))))


def mse(model, batch):
    return F.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])


def test_caller_model_unchanged_and_train_mode_seeded():
    torch.manual_seed(0)
    model = BNNet()
    g = torch.Generator().manual_seed(1)
    doms = {d: [{"x": torch.randn(16, 8, generator=g), "y": torch.randn(16, generator=g)} for _ in range(2)]
            for d in ("p", "q")}
    obj = Objective(model, doms, mse)
    model.train()
    model.bn.eval()  # a mixed mode flag pattern must survive
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    r1 = gradient_similarity(obj, seed=3, train_mode=True, resamples=10)
    r2 = gradient_similarity(obj, seed=3, train_mode=True, resamples=10)
    r3 = gradient_similarity(obj, seed=3, resamples=10)
    assert r1.cosine == r2.cosine  # dropout draws from the seed
    assert r1.cosine != r3.cosine  # eval mode by default: different from train mode
    assert r1.settings["train_mode"] and not r3.settings["train_mode"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BatchNorm statistics
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_json_roundtrip(mix):
    obj, _ = mix
    r = gradient_similarity(obj, resamples=5)
    d = json.loads(r.to_json())
    back = GradSimResult.from_dict(d)
    assert back.cosine == r.cosine and back.split_half == r.split_half
    assert back.cosine == [list(row) for row in np.array(r.cosine).T]  # symmetric
    b, _ = objective("bowls", dim=2, n_domains=2)
    json.loads(gradient_similarity(b).to_json())  # nulls, not NaN


def test_bad_input(mix):
    obj, _ = mix
    with pytest.raises(UserError, match="unknown domain"):
        gradient_similarity(obj, domains=["a", "nope"])
    with pytest.raises(UserError, match="distinct"):
        gradient_similarity(obj, domains=["a", "a"])
    with pytest.raises(UserError, match="no domains"):
        gradient_similarity(obj, domains=[])
    with pytest.raises(UserError, match="resamples"):
        gradient_similarity(obj, resamples=-1)
    frozen = Objective(nn.Linear(2, 1).requires_grad_(False), {"a": [{"x": torch.ones(2, 2), "y": torch.ones(2)}]}, mse)
    with pytest.raises(UserError, match="trainable"):
        gradient_similarity(frozen)


class _Noisy(nn.Module):
    """A model whose eval forward is random (dropout left on): not one function of the weights."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(F.dropout(x, 0.5, training=True))


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_checks_each_batch_as_it_differentiates_it(precision):
    """One process: no separate validation pass, yet the same refusals (a bad loss named by domain and batch,
    a non-finite gradient, a random eval forward), in float64 and in float32 (where the rounding probe's two
    evaluations are the determinism check)."""
    g = torch.Generator().manual_seed(0)
    b = {"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 1, generator=g)}

    def loss(m, batch):
        return ((m(batch["x"]) - batch["y"]) ** 2).mean()

    torch.manual_seed(0)
    with pytest.raises(UserError, match="not deterministic"):
        gradient_similarity(Objective(_Noisy(), {"a": [b], "b": [b]}, loss), resamples=0, precision=precision)
    good = nn.Linear(4, 1)
    bad_shape = Objective(good, {"a": [b], "b": [b]}, lambda m, batch: (m(batch["x"]) - batch["y"]) ** 2)
    with pytest.raises(UserError, match="domain 'a', batch 0.*not a scalar"):
        gradient_similarity(bad_shape, resamples=0, precision=precision)
    def nan_grad(m, batch):  # a finite loss whose gradient is not (d sqrt|u| at u = 0), on the 2nd batch of b
        out = m(batch["x"])
        kink = torch.sqrt((out - out.detach()).abs()).sum() if batch.get("kink") else 0.0
        return ((out - batch["y"]) ** 2).mean() + kink
    kinked = dict(b, kink=True)
    with pytest.raises(UserError, match="gradient on domain 'b', batch 1 is not finite"):
        gradient_similarity(Objective(good, {"a": [b], "b": [b, kinked]}, nan_grad), resamples=0,
                            precision=precision)


def test_figure_and_cli(tmp_path, mix):
    from typer.testing import CliRunner

    from cli.main import app
    from landscape.render.geometry import gradsim_figure
    from nexus_opt.train import TrainConfig, train

    obj, _ = mix
    r = gradient_similarity(obj, resamples=10)
    fig = gradsim_figure([r, json.loads(r.to_json())], ["live", "from json"], tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000 and len(fig.axes) >= 2
    with pytest.raises(UserError):
        gradsim_figure([r], ["a", "b"])

    run = tmp_path / "run"
    train(TrainConfig(suite="bowls", suite_options={"dim": 2, "n_domains": 2}, steps=2, eval_every=1, ckpt_every=1,
                      device="cpu", out=str(run), warmup=0))
    ckpts = sorted(str(p) for p in run.glob("ckpt-*"))
    res = CliRunner().invoke(app, ["gradsim", ckpts[0], ckpts[-1], "--json", str(tmp_path / "g.json"),
                                   "--plot", str(tmp_path / "g2.png"), "--device", "cpu", "--resamples", "5"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "g.json").read_text())
    assert [x["checkpoint"] for x in data["results"]] == [ckpts[0], ckpts[-1]]
    assert data["results"][0]["result"]["domains"] == ["bowl0", "bowl1", "ood"]
    assert (tmp_path / "g2.png").exists()
    bad = CliRunner().invoke(app, ["gradsim", ckpts[0], "--domains", "nope"])
    assert bad.exit_code == 2 and "unknown domain" in bad.output and "Traceback" not in bad.output
    missing = CliRunner().invoke(app, ["gradsim", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
