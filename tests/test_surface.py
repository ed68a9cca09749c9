"""Loss surfaces against independent truth: direct loss evaluation, analytic bowls, exact filter norms."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from landscape import directions as dirs
from landscape.objective import Objective
from landscape.params import get_flat, set_flat
from landscape.surface import (Evaluator, LineResult, SurfaceResult, dist_info, fingerprint, line, probe, shard_rows,
                               surface)
from nexus_opt.errors import UserError
from nexus_opt.util import domain_loss
from nexus_opt.models import build_model
from nexus_opt.suites import make_suite

from conftest import assert_one_line_error, invoke_cli


def make(name: str, options: dict | None = None, model_config: dict | None = None, seed: int = 0):
    """(suite, Objective) of a built-in suite with its default model (config overrides allowed)."""
    s = make_suite(name, seed=0, options=options or {})
    mname, cfg = s.default_model()
    torch.manual_seed(seed)
    model = build_model(mname, {**cfg, **(model_config or {})})
    obj = Objective(model, {d: s.eval_batches(d) for d in s.domains}, s.loss_fn, ood=s.ood_domains, weights=s.weights)
    return s, obj


def tiny_gpt():
    return make("text", {"block_size": 8, "eval_batches": 2, "eval_batch_size": 2},
                {"n_embd": 16, "n_layer": 1, "n_head": 2})


@pytest.fixture(scope="module")
def mix():
    return make("mix", {"eval_batches": 2, "eval_batch_size": 16})


@pytest.fixture(scope="module")
def bowls():
    return make("bowls", {"dim": 2, "n_domains": 2})


def direct_losses(obj: Objective, flat32: torch.Tensor) -> dict[str, float]:
    """Independent truth: the weights set on a deep copy of the model, each domain's loss by its loss_fn."""
    m = copy.deepcopy(obj.model).eval()
    set_flat(dict((n, p) for n, p in m.named_parameters() if p.requires_grad), flat32)
    out = {d: domain_loss(m, b, obj.loss_fn) for d, b in obj.domains.items()}
    out["train"] = sum(obj.weights[d] * out[d] for d in obj.train_domains)
    return out


def point(r: SurfaceResult, i: int, j: int, dtype=torch.float32) -> torch.Tensor:
    """origin + x[j]*d1 + y[i]*d2 in the model dtype, from the result file's own arrays."""
    o = torch.as_tensor(r.origin).to(dtype)
    D = torch.as_tensor(r.directions).to(dtype)
    a, b = torch.tensor(r.x[j], dtype=dtype), torch.tensor(r.y[i], dtype=dtype)
    return o + a * D[0] + b * D[1]


# -- grid values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["loop", "vmap"])
def test_grid_equals_direct_evaluation(mix, batch):
    _, obj = mix
    r = surface(obj, grid=6, span=0.8, seed=3, batch=batch)
    assert r.settings["batch_used"] == batch
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, 6, size=(4, 2)):
        truth = direct_losses(obj, point(r, i, j))
        for d, v in truth.items():
            assert r.losses[d][i, j] == pytest.approx(v, rel=2e-5, abs=1e-7), (d, i, j)
    truth = direct_losses(obj, get_flat(obj.params()))
    for d, v in truth.items():
        assert r.point_losses["theta"][d] == pytest.approx(v, rel=1e-5)


def test_vmap_and_loop_agree_mlp_and_gpt(mix):
    for _, obj in (mix, tiny_gpt()):
        a = surface(obj, grid=(4, 3), span=0.5, batch="loop")
        b = surface(obj, grid=(4, 3), span=0.5, batch="vmap", chunk=5)  # chunks straddle rows
        assert b.settings["batch_used"] == "vmap"
        assert set(a.losses) == set(b.losses)
        for d in a.losses:
            assert a.losses[d].shape == (3, 4)
            np.testing.assert_allclose(a.losses[d], b.losses[d], rtol=2e-5)


def test_gpt_grid_equals_direct_evaluation():
    _, obj = tiny_gpt()  # tied embedding/head, LayerNorm, attention under vmap
    r = surface(obj, grid=3, span=0.5, batch="vmap")
    truth = direct_losses(obj, point(r, 2, 0))
    for d, v in truth.items():
        assert r.losses[d][2, 0] == pytest.approx(v, rel=2e-5)


def test_vmap_failure_falls_back_to_loop(bowls):
    s, obj = bowls

    def loss_with_item(model, batch):  # .item() has no vmap rule
        v = s.loss_fn(model, batch)
        return v * (1.0 + 0.0 * v.item())

    o2 = Objective(obj.model, obj.domains, loss_with_item, ood=obj.ood, weights=obj.weights)
    r = surface(o2, grid=4, batch="vmap")
    ref = surface(obj, grid=4, batch="loop")
    assert r.settings["batch_used"] == "loop" and "vmap failed" in r.settings["batch_note"]
    np.testing.assert_allclose(r.losses["train"], ref.losses["train"], rtol=1e-6)


def test_auto_measures_on_cpu(mix):
    _, obj = mix
    p = probe(obj, list(obj.domains), points=4)
    assert p["pick"] in ("vmap", "loop") and p["loop"] > 0 and p["vmap"] > 0
    r = surface(obj, grid=3, batch="auto")
    assert r.settings["batch_probe"]["pick"] == r.settings["batch_used"]


# -- directions -----------------------------------------------------------------------------------------
class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.lin = torch.nn.Linear(1, 3)  # one-element filters: cannot be orthogonal and non-zero

    def forward(self, x):
        return self.lin(self.bn(self.conv(x)).mean((1, 2, 3))[:, None])


def _check_filters(params, d, bias):
    for (name, p), sl in zip(params.items(), dirs_slices(params)):
        w, v = p.detach().double(), d[sl].view_as(p)
        if p.dim() >= 2:
            wn = w.reshape(p.shape[0], -1).norm(dim=1)
            vn = v.reshape(p.shape[0], -1).norm(dim=1)
            live = vn > 0
            np.testing.assert_allclose(vn[live].numpy(), wn[live].numpy(), rtol=1e-10, err_msg=name)
        elif bias == "zero":
            assert float(v.abs().max()) == 0.0, name
        elif not (p.numel() == 1 and float(v.norm()) == 0):  # a one-element filter of d2 is zeroed
            assert float(v.norm()) == pytest.approx(float(w.norm()), rel=1e-10), name


def dirs_slices(params):
    from landscape.params import layer_slices
    return list(layer_slices(params).values())


@pytest.mark.parametrize("bias", ["zero", "filter"])
def test_filter_normalised_orthogonal_directions(bias):
    torch.manual_seed(0)
    models = [build_model("mlp", {"in_dim": 8, "hidden": 16, "depth": 2}), tiny_gpt()[1].model, ConvNet()]
    for m in models:
        params = {n: p for n, p in m.named_parameters()}
        pl = dirs.random_plane(params, seed=5, bias=bias)
        for d in (pl.d1, pl.d2):
            _check_filters(params, d, bias)
        cos = float(pl.d1 @ pl.d2) / float(pl.d1.norm() * pl.d2.norm())
        assert abs(cos) < 1e-6 and abs(pl.info["cos"]) < 1e-6
        assert pl.info["filter_norm_error"] < 1e-10
        again = dirs.random_plane(params, seed=5, bias=bias)
        assert torch.equal(again.d1, pl.d1) and torch.equal(again.d2, pl.d2)
        assert not torch.equal(dirs.random_plane(params, seed=6, bias=bias).d1, pl.d1)
    conv = {n: p for n, p in models[2].named_parameters()}
    assert dirs.random_plane(conv, seed=0).info["d2_zeroed_filters"] == 3  # the Linear(1, 3) rows


def test_layer_and_none_normalisation():
    torch.manual_seed(0)
    params = dict(build_model("mlp", {"in_dim": 4, "hidden": 8}).named_parameters())
    pl = dirs.random_plane(params, seed=1, norm="layer")
    for (name, p), sl in zip(params.items(), dirs_slices(params)):
        if p.dim() >= 2:
            for d in (pl.d1, pl.d2):
                assert float(d[sl].norm()) == pytest.approx(float(p.detach().double().norm()), rel=1e-10)
    for norm in ("layer", "none"):
        assert abs(dirs.random_plane(params, seed=1, norm=norm).info["cos"]) < 1e-10
    with pytest.raises(UserError):
        dirs.random_plane(params, norm="bogus")


def test_bare_vector_models(bowls):
    _, obj = bowls  # the Point model has no biases to ignore: its 1-D theta is the weight
    pl = dirs.random_plane(obj, seed=0)
    assert pl.info["bias_used"] == "filter" and float(pl.d1.norm()) > 0 and abs(pl.info["cos"]) < 1e-12
    assert float(pl.d1.norm()) == pytest.approx(float(get_flat(obj.params()).double().norm()), rel=1e-12)
    _, fig2 = make("bowls", {"preset": "fig2-sum"})  # one parameter: no plane, but a line
    with pytest.raises(UserError, match="at least 2 parameters"):
        surface(fig2, grid=3)
    lr = line(fig2, None, torch.tensor([0.2], dtype=torch.float64), points=3)
    assert lr.losses["train2"][-1] == pytest.approx(0.68, abs=1e-6)  # 8 (x - 0.2)^2 + 0.68 at its minimum


def test_surface_directions_are_orthogonal_after_cast(mix):
    _, obj = mix
    r = surface(obj, grid=2, span=0.1)
    d1, d2 = (torch.as_tensor(v) for v in r.directions)
    assert abs(float(d1 @ d2) / float(d1.norm() * d2.norm())) < 1e-6
    assert abs(r.normalization["cos"]) < 1e-6 and r.normalization["seeds"] == [0, 1]


# -- planes through points --------------------------------------------------------------------------------
def test_bowls_minima_where_the_formulas_put_them(bowls):
    s, obj = bowls
    minima = {d: s.minimum(d) for d in s.domains}
    r = surface(obj, plane="domains", grid=81, minima=minima, batch="loop")
    # an anisotropic bowl's lowest grid node can sit up to one step (not half) from the true minimum
    theta = get_flat(obj.params(), torch.float64)
    B = torch.as_tensor(r.directions).T  # 2 x 2: the plane is all of R^2 here
    step = (r.x[1] - r.x[0], r.y[1] - r.y[0])
    for d in s.domains:
        ab = torch.linalg.solve(B, minima[d] - theta)  # independent plane coordinates of the analytic minimum
        assert r.points[f"min:{d}"] == pytest.approx(ab.tolist(), abs=1e-5)
        a, b, _ = r.grid_minimum(d)
        assert abs(a - float(ab[0])) <= step[0] and abs(b - float(ab[1])) <= step[1], d
        assert r.offplane[f"min:{d}"] < 1e-6
        assert r.point_losses[f"min:{d}"][d] == pytest.approx(s.loss(d, minima[d]), abs=1e-5)
    ab = torch.linalg.solve(B, s.minimum(None) - theta)
    a, b, _ = r.grid_minimum("train")
    assert abs(a - float(ab[0])) <= step[0] and abs(b - float(ab[1])) <= step[1]
    assert r.points["min:bowl0"] == [1.0, 0.0] and r.settings["pair"] == ["bowl0", "bowl1"]
    rng = np.random.default_rng(1)
    for i, j in rng.integers(0, 81, size=(5, 2)):  # the grid against the closed form
        w = point(r, i, j)
        for d in s.domains:
            assert r.losses[d][i, j] == pytest.approx(s.loss(d, w), rel=2e-5, abs=1e-5)


def test_checkpoint_plane_coordinates(mix):
    _, obj = mix
    theta = get_flat(obj.params(), torch.float64)
    g = torch.Generator().manual_seed(0)
    p1 = theta + 0.1 * torch.randn(theta.numel(), generator=g, dtype=torch.float64)
    p2 = theta + 0.1 * torch.randn(theta.numel(), generator=g, dtype=torch.float64)
    r = surface(obj, plane="checkpoints", others=[p1, p2], grid=5)
    assert r.points["ckpt0"] == [0.0, 0.0] and r.points["ckpt1"] == [1.0, 0.0]
    B = torch.as_tensor(r.directions).T
    ab = torch.linalg.lstsq(B, (p2 - theta).float().double()[:, None]).solution[:, 0]
    assert r.points["ckpt2"] == pytest.approx(ab.tolist(), abs=1e-5)
    for name, p in (("ckpt1", p1), ("ckpt2", p2)):
        truth = direct_losses(obj, p.float())
        assert r.point_losses[name]["train"] == pytest.approx(truth["train"], rel=1e-4)
    two = surface(obj, plane="checkpoints", others=[p1], grid=3)  # second direction random, orthogonal
    assert abs(two.normalization["cos"]) < 1e-6 and set(two.points) == {"ckpt0", "ckpt1"}
    with pytest.raises(UserError, match="collinear"):
        surface(obj, plane="checkpoints", others=[p1, 2 * p1 - theta], grid=3)


def test_line_matches_closed_form(bowls):
    s, obj = bowls
    theta = get_flat(obj.params(), torch.float64)
    m = s.minimum("bowl1")
    lr = line(obj, None, m, points=11, span=(-0.5, 1.5))
    assert lr.points == {"theta": 0.0, "end": 1.0}
    for k, t in enumerate(lr.t):
        w = (theta + float(t) * (m - theta)).float()
        for d in s.domains:
            assert lr.losses[d][k] == pytest.approx(s.loss(d, w), rel=1e-5, abs=1e-5)
    assert lr.distance == pytest.approx(float((m - theta).norm()), rel=1e-6)


# -- the caller's model ----------------------------------------------------------------------------------
def test_model_unchanged(mix):
    _, obj = mix
    obj.model.train()
    before = {n: p.detach().clone() for n, p in obj.model.named_parameters()}
    flags = [p.requires_grad for p in obj.model.parameters()]
    rng = torch.get_rng_state()
    for batch in ("loop", "vmap"):
        surface(obj, grid=3, batch=batch)
    line(obj, None, get_flat(obj.params()) + 0.1, points=3)
    assert all(m.training for m in obj.model.modules())
    assert [p.requires_grad for p in obj.model.parameters()] == flags
    for n, p in obj.model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is None, n
    assert torch.equal(torch.get_rng_state(), rng)
    obj.model.eval()


# -- files ------------------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def test_interrupted_grid_resumes(mix, tmp_path):
    _, obj = mix
    kw = dict(grid=(4, 6), span=0.5, seed=1, batch="loop")
    full = surface(obj, **kw)
    out = tmp_path / "s.npz"

    def stop_after_two_rows(done, total, what):
        if done >= 2 * 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        surface(obj, out=out, progress=stop_after_two_rows, **kw)
    assert not out.exists()
    parts = list(tmp_path.glob("s.npz.part*.jsonl"))
    assert len(parts) == 1 and len(parts[0].read_text().splitlines()) == 3  # header + 2 rows
    seen = []
    res = surface(obj, out=out, progress=lambda d, t, w: seen.append(d), **kw)
    assert res.timing["resumed_rows"] == 2 and res.timing["points"] == 4 * 4 and seen[0] == 8
    assert out.exists() and not list(tmp_path.glob("s.npz.part*"))
    for d in full.losses:
        assert np.array_equal(res.losses[d], full.losses[d]), d
    again = surface(obj, out=out, **kw)  # finished and fingerprint unchanged: reused
    assert again.timing.get("reused") and np.array_equal(again.losses["train"], full.losses["train"])
    # a partial grid of other settings is never mixed in
    (tmp_path / "t.npz.part0.jsonl").write_text(json.dumps({"fingerprint": "other"}) + "\n")
    with pytest.raises(UserError, match="partial grid"):
        surface(obj, out=tmp_path / "t.npz", **kw)


def test_save_load_round_trip(bowls, tmp_path):
    s, obj = bowls
    r = surface(obj, plane="domains", minima={d: s.minimum(d) for d in s.domains}, grid=5)
    p = r.save(tmp_path / "r.npz")
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == "nexus-landscape/surface" and meta["versions"]["torch"] == torch.__version__
    assert "nexus_opt" in meta["versions"] and meta["points"] == r.points
    back = SurfaceResult.load(p)
    for k in ("x", "y", "origin", "directions"):
        assert np.array_equal(getattr(back, k), getattr(r, k))
    assert list(back.losses) == list(r.losses)
    for d in r.losses:
        assert np.array_equal(back.losses[d], r.losses[d])
    for k in ("points", "offplane", "point_losses", "normalization", "settings", "domains", "plane", "seed",
              "fingerprint"):
        assert json.dumps(getattr(back, k)) == json.dumps(getattr(r, k)), k
    json.dumps(back.to_dict(), allow_nan=False)
    lr = line(obj, None, s.minimum("bowl0"), points=4)
    back = LineResult.load(lr.save(tmp_path / "l.npz"))
    assert np.array_equal(back.losses["train"], lr.losses["train"]) and back.points == lr.points
    with pytest.raises(UserError):
        LineResult.load(p)  # a surface is not a line
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError):
        SurfaceResult.load(tmp_path / "bad.npz")


def test_figures_and_self_contained_html(bowls, tmp_path):
    from landscape.render import surface as R

    s, obj = bowls
    r = surface(obj, plane="domains", minima={d: s.minimum(d) for d in s.domains}, grid=9)
    paths = R.write_figures(r, tmp_path / "b")
    assert {p.name for p in paths} == {"b.png", "b.svg", "b_overlay.png", "b_overlay.svg", "b.html"}
    assert all(p.stat().st_size > 1000 for p in paths)
    text = (tmp_path / "b.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inline
    for d in s.domains:
        assert f'"label":"{d}"' in text.replace(" ", "")
    R.panels_figure(r, "surface", tmp_path / "s3d.png")
    R.compare_figure([r, r], ["sum", "intersection"], path=tmp_path / "cmp.svg")
    lv = R.resolve_levels(r, 0.5)
    assert lv["bowl0"] == pytest.approx(float(np.nanmin(r.losses["bowl0"])) + 0.5)
    frac = R.common_region(r, lv)
    inside = np.ones_like(r.losses["bowl0"], dtype=bool)
    for d in r.train_domains:
        inside &= r.losses[d] <= lv[d]
    assert frac == inside.mean()
    with pytest.raises(UserError):
        R.resolve_levels(r, "nope:x")


# -- sharding ---------------------------------------------------------------------------------------------
def test_shard_rows_partitions_exactly():
    for n in range(0, 23):
        rows = list(range(100, 100 + n))
        for world in range(1, 8):
            parts = [shard_rows(rows, world, r) for r in range(world)]
            assert sum(parts, []) == rows
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    assert dist_info() == (0, 1)
    with pytest.raises(ValueError):
        shard_rows([1, 2], 2, 2)


def _rank_main(rank, world, init, out, q):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s, obj = make("bowls", {"dim": 2, "n_domains": 2})
        r = surface(obj, grid=(3, 5), seed=2, batch="loop", out=out)
        q.put((rank, r.losses["train"].tolist(), r.settings["world_size"], r.timing["points"]))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single(bowls, tmp_path):
    import torch.multiprocessing as mp

    _, obj = bowls
    single = surface(obj, grid=(3, 5), seed=2, batch="loop")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, init, str(tmp_path / "d.npz"), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank, train, world, pts in got:
        assert world == 2 and np.array_equal(np.array(train), single.losses["train"])
    assert sorted(pts for *_, pts in got) == [6, 9]  # rows 0-2 on rank 0, 3-4 on rank 1
    assert np.array_equal(SurfaceResult.load(tmp_path / "d.npz").losses["train"], single.losses["train"])


def test_fingerprint_tracks_data(mix):
    _, obj = mix
    th = get_flat(obj.params())
    D = torch.zeros(2, th.numel())
    x = np.linspace(-1, 1, 3)
    a = fingerprint(obj, th, D, x, x, list(obj.domains))
    o2 = Objective(obj.model, {d: [{k: v + 1 for k, v in b.items()} for b in bs] for d, bs in obj.domains.items()},
                   obj.loss_fn, ood=obj.ood)
    assert a != fingerprint(o2, th, D, x, x, list(obj.domains))
    assert a == fingerprint(obj, th.clone(), D, x, x, list(obj.domains))


def test_bad_input(mix):
    _, obj = mix
    for kw in ({"plane": "nope"}, {"batch": "fast"}, {"grid": 1}, {"span": -1}, {"span": (1, 0, 0, 1)},
               {"domains": ["zzz"]}, {"plane": "checkpoints"}, {"norm": "unit"}):
        with pytest.raises(UserError):
            surface(obj, **kw)
    with pytest.raises(UserError):
        Evaluator(obj, ["a"], "loop", chunk=-1)


# -- CLI --------------------------------------------------------------------------------------------------
def test_cli_plot_surface(tiny_mix_run, tmp_path):
    run = tiny_mix_run.path
    out = tmp_path / "o"
    res = invoke_cli("plot-surface", run / "ckpt-000002", run / "ckpt-000006", "--grid", "4", "--out", out,
                     "--domains", "a,b", "--span", "0.5")
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    for stem in ("surface_1_run-ckpt-000002", "surface_2_run-ckpt-000006"):
        assert {stem + e for e in (".npz", ".png", ".svg", "_overlay.png", "_overlay.svg", ".html")} <= names
    assert {"surface_compare.png", "surface_compare.svg"} <= names
    assert "wrote" in res.stderr and "loss surfaces" in res.stdout  # tables on stdout, logs on stderr
    r = SurfaceResult.load(out / "surface_1_run-ckpt-000002.npz")
    assert set(r.domains) == {"a", "b"} and r.meta["step"] == 2 and r.settings["grid"] == [4, 4]
    res = invoke_cli("plot-surface", "--from", out / "surface_1_run-ckpt-000002.npz", "--out", tmp_path / "re",
                     "--level", "0.01", "--kind", "contour")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "re" / "surface_1_run-ckpt-000002_overlay.svg").exists()
    res = invoke_cli("plot-surface", run / "ckpt-000002", run / "ckpt-000004", run / "ckpt-000006",
                     "--plane", "checkpoints", "--grid", "3", "--out", tmp_path / "c", "--domains", "a")
    assert res.exit_code == 0, res.output
    r = SurfaceResult.load(tmp_path / "c" / "surface.npz")
    assert set(r.points) == {"run/ckpt-000002", "run/ckpt-000004", "run/ckpt-000006"}


@pytest.mark.parametrize("args,contains", [
    (["--plane", "sideways"], "unknown plane"),
    (["--span", "a,b"], "--span"),
    (["--batch", "gpu"], "batch mode"),
    (["--plane", "checkpoints"], "2 or 3 checkpoints"),
])
def test_cli_bad_input_one_line(tiny_mix_run, args, contains):
    res = invoke_cli("plot-surface", tiny_mix_run.path, *args, "--grid", "3")
    assert_one_line_error(res.exit_code, res.stderr, contains=contains)


def test_cli_missing_inputs(tmp_path):
    res = invoke_cli("plot-surface", "--out", tmp_path)
    assert_one_line_error(res.exit_code, res.stderr, contains="checkpoint")
    res = invoke_cli("plot-surface", "--from", tmp_path / "nope.npz", "--out", tmp_path)
    assert_one_line_error(res.exit_code, res.stderr, contains="nope.npz")
