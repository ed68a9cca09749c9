"""Train mode in descend, closeness and surface, against independent truth: a plain per-point loop that writes
the weights into the model and seeds each batch by hand, and a least-squares minimum solved by numpy on the
train-mode features reproduced by hand (dropout masks and BatchNorm batch statistics)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import invoke_cli
from landscape.closeness import closeness, descend
from landscape.objective import Objective, batch_seed
from landscape.surface import surface

P = 0.5  # dropout probability
EPS = 1e-5  # BatchNorm1d's default eps


def rule(seed: int, key: int) -> int:
    """The documented seeding rule of batch `key` (its position among all the objective's batches)."""
    return seed * 1_000_003 + key


def test_rule_is_the_documented_one():
    assert batch_seed(3, 5) == rule(3, 5) and batch_seed(0, 0) == 0


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).squeeze(-1), y)


def data(seed=1, domains=("a", "b"), batches=2, n=6, d=3):
    g = torch.Generator().manual_seed(seed)
    return {k: [(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
                for _ in range(batches)] for k in domains}


def mlp(bn: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 6)] + ([torch.nn.BatchNorm1d(6)] if bn else []) + \
             [torch.nn.Tanh(), torch.nn.Dropout(P), torch.nn.Linear(6, 1)]
    return torch.nn.Sequential(*layers).double()


def linear_model() -> torch.nn.Module:
    """Dropout on the inputs, BatchNorm without affine parameters, then a linear layer: in train mode the loss is
    a quadratic in the linear layer's weights (features fixed per batch by its dropout mask and statistics)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Dropout(P), torch.nn.BatchNorm1d(3, affine=False),
                               torch.nn.Linear(3, 1)).double()


def state(model):
    """What a call must leave as it was: every module's flag, every buffer, the global RNG."""
    return ([m.training for m in model.modules()], [b.clone() for b in model.buffers()],
            [p.detach().clone() for p in model.parameters()], torch.get_rng_state())


def assert_same_state(before, model):
    flags, bufs, params, rng = before
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)


# -- surface ------------------------------------------------------------------------------------------------
def loop_truth(model, doms, r, seed):
    """Each grid point's domain losses by hand: weights written into a copy, train mode, batch k of the
    objective (domains in order) seeded by the rule before its forward."""
    m = copy.deepcopy(model).train()
    keys, k = {}, 0
    for d, bs in doms.items():
        keys[d] = list(range(k, k + len(bs)))
        k += len(bs)
    origin, D = torch.as_tensor(r.origin), torch.as_tensor(r.directions)
    out = {d: np.zeros((len(r.y), len(r.x))) for d in doms}
    with torch.no_grad(), torch.random.fork_rng():  # the test's own seeding leaves the RNG as it was
        for i, b in enumerate(r.y):
            for j, a in enumerate(r.x):
                torch.nn.utils.vector_to_parameters(origin + a * D[0] + b * D[1], m.parameters())
                for d, bs in doms.items():
                    n = sum(len(y) for _, y in bs)
                    tot = 0.0
                    for key, batch in zip(keys[d], bs):
                        torch.manual_seed(rule(seed, key))
                        tot += len(batch[1]) / n * float(mse(m, batch))
                    out[d][i, j] = tot
    return out


@pytest.mark.parametrize("bn", [True, False], ids=["dropout+batchnorm", "dropout"])
def test_surface_train_mode_matches_a_per_point_loop(bn):
    model, doms = mlp(bn), data()
    obj = Objective(model, doms, mse)
    before = state(model)
    runs = [surface(obj, grid=4, seed=3, train_mode=True, batch=b, chunk=c)
            for b, c in [("loop", None), ("vmap", 1), ("vmap", 5), ("vmap", None)]]
    assert_same_state(before, model)
    truth = loop_truth(model, doms, runs[0], seed=3)
    for r in runs:
        assert r.settings["train_mode"] is True
        for d in doms:
            np.testing.assert_allclose(r.losses[d], truth[d], rtol=0, atol=1e-10)
        np.testing.assert_allclose(r.losses["train"], 0.5 * (truth["a"] + truth["b"]), rtol=0, atol=1e-10)
    # BatchNorm's running statistics cannot be updated under vmap: the loop ran (and said why); dropout alone vmaps
    assert runs[1].settings["batch_used"] == ("loop" if bn else "vmap")
    if bn:
        assert "vmap failed" in runs[1].settings["batch_note"]
    # train mode is on (dropout changes the values) and its masks follow the seed
    ev = surface(obj, grid=4, seed=3, batch="loop")
    other = surface(obj, grid=4, seed=4, train_mode=True, batch="loop")
    assert ev.settings["train_mode"] is False and np.abs(ev.losses["a"] - truth["a"]).max() > 1e-3
    assert np.abs(other.losses["a"] - loop_truth(model, doms, other, seed=4)["a"]).max() < 1e-10
    assert_same_state(before, model)


def test_surface_train_mode_resume_file_is_not_an_eval_one(tmp_path):
    """A finished eval-mode file is not reused for a train-mode request (the fingerprint records the mode)."""
    obj = Objective(mlp(False), data(), mse)
    out = tmp_path / "s.npz"
    ev = surface(obj, grid=3, seed=0, batch="loop", out=out)
    tr = surface(obj, grid=3, seed=0, batch="loop", out=out, train_mode=True)
    assert not tr.timing.get("reused") and tr.fingerprint != ev.fingerprint
    again = surface(obj, grid=3, seed=0, batch="loop", out=out, train_mode=True)
    assert again.timing.get("reused") and np.array_equal(again.losses["a"], tr.losses["a"])


# -- descend ------------------------------------------------------------------------------------------------
def features(batch, seed, key):
    """The train-mode input of the linear layer for one batch, by hand: dropout under the rule's seed, then
    normalisation by the batch's own mean and (biased) variance."""
    x, _ = batch
    with torch.random.fork_rng():
        torch.manual_seed(rule(seed, key))
        xd = torch.nn.functional.dropout(x, P, training=True)
    return (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + EPS)


def analytic(doms, domain, seed):
    """The minimiser (weight, bias) of the train-mode loss of `domain` ('train': both, weights 1/2) by weighted
    least squares on the hand-made features; also (X, y, w) for the loss and Hessian."""
    rows, ys, ws, k = [], [], [], 0
    names = list(doms) if domain == "train" else [domain]
    for d, bs in doms.items():
        n = sum(len(y) for _, y in bs)
        for b in bs:
            if d in names:
                f = features(b, seed, k)
                rows.append(torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1))
                ys.append(b[1])
                ws.append(torch.full((len(f),), (1 / len(names)) / n, dtype=f.dtype))
            k += 1
    X, y, w = torch.cat(rows).numpy(), torch.cat(ys).numpy(), torch.cat(ws).numpy()
    sw = np.sqrt(w)
    theta = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0]
    return theta, (X, y, w)


@pytest.mark.parametrize("optimizer", ["newton-cg", "lbfgs"])
def test_descend_train_mode_reaches_the_analytic_minimum(optimizer):
    model, doms = linear_model(), data(n=8)
    obj = Objective(model, doms, mse)
    before = state(model)
    # L-BFGS's strong-Wolfe search stalls near |g| ~ 5e-10 here (float64 floor of this problem): ask 1e-9 of it
    r = descend(obj, "b", train_mode=True, seed=2, optimizer=optimizer, rtol=1e-10 if optimizer == "newton-cg" else 1e-9)
    assert_same_state(before, model)
    truth, (X, y, w) = analytic(doms, "b", seed=2)
    assert r.converged and r.train_mode
    np.testing.assert_allclose(r.theta.numpy(), truth, rtol=0, atol=1e-7)
    assert r.loss_min == pytest.approx(float(np.sum(w * (X @ truth - y) ** 2)), rel=1e-10)
    eval_min = descend(obj, "b", seed=2)
    assert not eval_min.train_mode and np.abs(eval_min.theta.numpy() - truth).max() > 1e-3


def test_descend_train_mode_depends_on_the_seed_only():
    obj = Objective(linear_model(), data(n=8), mse)
    a = descend(obj, None, train_mode=True, seed=5)
    b = descend(obj, None, train_mode=True, seed=5)
    c = descend(obj, None, train_mode=True, seed=6)
    assert a.converged and torch.equal(a.theta, b.theta) and a.losses == b.losses
    assert c.converged and float((a.theta - c.theta).abs().max()) > 1e-3
    np.testing.assert_allclose(a.theta.numpy(), analytic(obj.domains, "train", seed=5)[0], rtol=0, atol=1e-7)
    np.testing.assert_allclose(c.theta.numpy(), analytic(obj.domains, "train", seed=6)[0], rtol=0, atol=1e-7)


def test_adamw_is_the_documented_name_and_adam_still_works():
    obj = Objective(linear_model(), data(n=8), mse)
    a = descend(obj, "a", optimizer="adamw", steps=5)
    b = descend(obj, "a", optimizer="adam", steps=5)
    assert a.optimizer == b.optimizer == "adamw" and a.lr == 1e-3 and torch.equal(a.theta, b.theta)
    assert closeness(obj, optimizer="adam", steps=3, curvature=False).settings["optimizer"] == "adamw"
    from nexus_opt.errors import UserError
    with pytest.raises(UserError, match="newton-cg, lbfgs, adamw, sgd"):
        descend(obj, "a", optimizer="rmsprop")


# -- closeness ----------------------------------------------------------------------------------------------
def test_closeness_train_mode_pieces_are_one_objective():
    """Descents, losses, cross-losses, gradients and curvature all of the same train-mode quadratic."""
    model, doms = linear_model(), data(n=8)
    obj = Objective(model, doms, mse)
    before = state(model)
    seed = 7
    r = closeness(obj, train_mode=True, seed=seed, rtol=1e-10, keep_minima=True)
    assert_same_state(before, model)
    assert r.converged and r.settings["train_mode"] is True
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    sols = {d: analytic(doms, d, seed) for d in doms}

    def loss(d, t):
        X, y, w = sols[d][1]
        return float(np.sum(w * (X @ t - y) ** 2))

    for d in doms:
        np.testing.assert_allclose(r.minima[d], sols[d][0], rtol=0, atol=1e-7)
        assert r.loss_start[d] == pytest.approx(loss(d, theta0), rel=1e-10)
        assert r.loss_min[d] == pytest.approx(loss(d, sols[d][0]), rel=1e-9, abs=1e-12)
        X, y, w = sols[d][1]
        g = 2 * X.T @ (w * (X @ theta0 - y))
        assert r.bound["grad_norms"][d] == pytest.approx(float(np.linalg.norm(g)), rel=1e-10)
        u = sols[d][0] - theta0
        H = 2 * X.T @ (w[:, None] * X)
        assert r.curvature_along[d] == pytest.approx(float(u @ H @ u / (u @ u)), rel=1e-8)
        for j, col in enumerate(r.columns):
            assert r.cross_loss[r.domains.index(d)][j] == pytest.approx(loss(col, np.asarray(r.minima[d])), rel=1e-9,
                                                                        abs=1e-12)
    assert r.train_loss == pytest.approx(0.5 * (loss("a", theta0) + loss("b", theta0)), rel=1e-10)
    # the barrier of a convex quadratic along the segment to its own minimum is <= 0 (up to rounding)
    assert all(v <= 1e-12 for v in r.barrier.values())
    ev = closeness(obj, seed=seed, curvature=False)
    assert ev.settings["train_mode"] is False and abs(ev.loss_start["a"] - r.loss_start["a"]) > 1e-6
    assert_same_state(before, model)


def test_gradsim_train_mode_gradients_are_the_same_function():
    """gradient_similarity in train mode differentiates the same per-batch-seeded loss as closeness."""
    from landscape.gradsim import gradient_similarity

    model, doms = linear_model(), data(n=8)
    obj = Objective(model, doms, mse)
    before = state(model)
    r = gradient_similarity(obj, train_mode=True, seed=7, resamples=0)
    assert_same_state(before, model)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    g = {}
    for d in doms:
        X, y, w = analytic(doms, d, 7)[1]
        g[d] = 2 * X.T @ (w * (X @ theta0 - y))
        assert r.norms[d] == pytest.approx(float(np.linalg.norm(g[d])), rel=1e-10)
    cos = float(g["a"] @ g["b"] / np.linalg.norm(g["a"]) / np.linalg.norm(g["b"]))
    assert r.cosine[0][1] == pytest.approx(cos, rel=1e-10) and r.settings["train_mode"] is True


# -- the CLI ------------------------------------------------------------------------------------------------
def test_cli_closeness_train_mode(bowls_run):
    r = invoke_cli("closeness", str(bowls_run), "--train-mode", "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]["result"]
    assert res["settings"]["train_mode"] is True and res["converged"]


def test_cli_plot_surface_train_mode(bowls_run, tmp_path):
    r = invoke_cli("plot-surface", str(bowls_run), "--train-mode", "--grid", "3", "--device", "cpu",
                   "--out", str(tmp_path / "s"), "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["result"]["train_mode"] is True
    r = invoke_cli("plot-surface", str(bowls_run), "--grid", "3", "--device", "cpu", "--out", str(tmp_path / "e"),
                   "--json", "-")
    assert r.exit_code == 0 and json.loads(r.stdout)["results"][0]["result"]["train_mode"] is False


def test_pyhessian_cross_check_uses_the_same_train_mode_masks():
    """PyHessian's power iteration in train mode differentiates the loss whose batch masks follow the rule: its
    top eigenvalue matches a dense autograd Hessian built with hand seeding, on a domain whose keys are not 0, 1."""
    pytest.importorskip("pyhessian")
    from landscape.pyhessian_backend import pyhessian_eigen
    from torch.func import functional_call

    model, doms, seed = mlp(False), data(), 3
    obj = Objective(model, doms, mse)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        total = 0.0
        for j, b in enumerate(doms["b"]):  # domain b: keys 2 and 3 (after a's two batches); equal batch sizes
            torch.manual_seed(rule(seed, 2 + j))
            total = total + 0.5 * mse(lambda x: functional_call(model, parts, (x,)), b)
        return total

    model.train()
    with torch.random.fork_rng():
        H = torch.autograd.functional.hessian(f, flat0, vectorize=False)
    model.eval()
    ev = np.linalg.eigvalsh(H.numpy())
    top = ev[np.argmax(np.abs(ev))]
    before = state(model)
    r = pyhessian_eigen(obj, 1, "b", seed=seed, train_mode=True, tol=1e-6, max_iter=300)
    assert abs(r.eigenvalues[0] - top) / abs(top) < 1e-3 and r.converged == [True]
    assert_same_state(before, model)


def test_pyhessian_trace_probes_stay_random_in_train_mode():
    """Seeding the masks must not reseed PyHessian's probe stream: in train mode, on a domain of several batches,
    every Hutchinson sample differs (a reseeded global RNG made probes 2..n one and the same vector)."""
    pytest.importorskip("pyhessian")
    from landscape.pyhessian_backend import pyhessian_trace

    obj = Objective(mlp(False), data(), mse)
    before = state(obj.model)
    tr = pyhessian_trace(obj, "b", probes=12, seed=0, train_mode=True)
    assert len(set(round(x, 9) for x in tr.samples)) == 12
    assert_same_state(before, obj.model)


class Recorder(torch.nn.Module):
    """Identity that records one uniform draw per train-mode forward: which RNG stream each forward ran on."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def forward(self, x):
        if self.training:
            self.draws.append(float(torch.rand(())))
        return x


def test_gradsim_chunks_of_one_batch_draw_their_own_masks():
    """A single batch cut into chunks for the split-half floor: the full batch runs on batch_seed(seed, key) like
    every analyzer, and every chunk on a stream of its own (shared masks would inflate the same-domain floor)."""
    from landscape.gradsim import CHUNKS, gradient_similarity
    from landscape.objective import batch_rng

    rec = Recorder()
    model = torch.nn.Sequential(rec, torch.nn.Linear(3, 1)).double()
    doms = {k: v[:1] for k, v in data(n=8).items()}  # one batch per domain: chunked
    gradient_similarity(Objective(model, doms, mse), train_mode=True, seed=7, resamples=0)
    with batch_rng(7, 0):
        full_a = float(torch.rand(()))
    with batch_rng(7, 1):
        full_b = float(torch.rand(()))
    jobs = rec.draws[-2 * (1 + CHUNKS):]  # per domain, in row order: the full batch, then its CHUNKS chunks
    assert len(rec.draws) >= len(jobs) and jobs[0] == full_a and jobs[1 + CHUNKS] == full_b
    chunks = jobs[1:1 + CHUNKS] + jobs[2 + CHUNKS:]
    assert len(set(chunks + [full_a, full_b])) == 2 * CHUNKS + 2


def test_cpu_dropout_masks_do_not_depend_on_the_dtype():
    """Why train-mode analyses keep the model's dtype on the CPU: one seed gives one mask in every float dtype
    (on accelerators the surface and closeness switch to float64, where the descents run)."""
    masks = []
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        torch.manual_seed(11)
        masks.append(torch.nn.functional.dropout(torch.ones(257, 33, dtype=dt), P, training=True) != 0)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_domain_gradient_in_train_mode_leaves_batchnorm_statistics_alone():
    from landscape.gradients import domain_gradient

    model = mlp(True)
    obj = Objective(model, data(), mse)
    before = state(model)
    g1, _ = domain_gradient(obj, "a", train_mode=True, seed=5)
    g2, _ = domain_gradient(obj, "a", train_mode=True, seed=5)
    assert_same_state(before, model)
    assert torch.equal(g1, g2)  # the same masks, the same batch statistics: the same gradient
