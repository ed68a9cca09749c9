"""What a new user meets first (issue 23): install hints that work, output that survives a pipe, one spelling per
option, readable help."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80")
    env.pop("FORCE_COLOR", None)
    return subprocess.run(args, cwd=kw.pop("cwd", ROOT), env=env, capture_output=True, text=True, timeout=120, **kw)


# --- install story ---------------------------------------------------------------------------------------------

def test_setup_sh_options_parse_before_any_work():
    """--help lists --hf and --test; an unknown option is one line, exit 2, before a venv is touched."""
    r = _run(["bash", str(ROOT / "scripts/setup.sh"), "--help"], cwd="/")
    assert r.returncode == 0 and "--hf" in r.stdout and "--test" in r.stdout
    r = _run(["bash", str(ROOT / "scripts/setup.sh"), "--nope"], cwd="/")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--hf" in r.stderr


def test_train_hf_gpt2_without_transformers_is_one_line():
    """The script that needs the hf extra says how to get it, in one line, exit 2 (no ModuleNotFoundError)."""
    code = ("import runpy, sys; sys.modules['transformers'] = None; sys.argv = ['x', '--out', sys.argv[1]]; "
            "runpy.run_path('scripts/train_hf_gpt2.py', run_name='__main__')")
    r = _run([sys.executable, "-c", code, "/nonexistent-never-written"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "scripts/setup.sh --hf" in r.stderr and "Traceback" not in r.stderr


def test_missing_transformers_error_names_the_working_install(monkeypatch):
    from nexus_opt.errors import UserError
    from landscape import sources

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError) as e:
        sources._require_transformers()
    assert "scripts/setup.sh --hf" in str(e.value) and "nexus-landscape[hf]" not in str(e.value)


# --- output that survives a pipe -------------------------------------------------------------------------------

def test_table_to_a_pipe_keeps_every_column(bowls_run, tmp_path):
    """With stdout a pipe (and COLUMNS=80), the flatness table keeps every column and value in full (no '…', no
    cut headers), and a long 'wrote PATH' log line on stderr is one line."""
    import json

    from conftest import run_cli_process

    deep = tmp_path / ("a-directory-name-long-enough-to-push-the-log-line-past-eighty-columns" * 2)
    out = deep / "flatness.json"
    r = run_cli_process("flatness", bowls_run, "--domains", "each", "--top-k", "1", "--json", out,
                        env={"COLUMNS": "80", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    header = next(line for line in r.stdout.splitlines() if "domain" in line and "λmax" in line)
    assert len(header) > 80  # wider than the 80 columns it used to be cut to
    for col in ("domain", "loss", "λmax", "λmin", "trace ± stderr", "rel. error bound", "rel. residual", "converged", "HVPs",
                "time"):
        assert col in header, (col, header)
    doc = json.loads(out.read_text())
    results = doc["results"][0]["result"]["results"]
    assert len(results) >= 2
    for name, res in results.items():
        row = next(line for line in r.stdout.splitlines() if line.split("│")[1:2] and
                   line.split("│")[1].strip() == name)
        assert f"{res['eigenvalues'][0]:.5g}" in row and f"{res['hvps']['total']}" in row, row
    assert any(line == f"wrote {out}" for line in r.stderr.splitlines()), r.stderr


# --- one spelling, readable help -------------------------------------------------------------------------------
COMMANDS = ["train", "flatness", "gradsim", "closeness", "plot-surface", "mechanism", "demo"]


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_reads_as_sentences_with_readable_metavars(command):
    from conftest import invoke_cli

    r = invoke_cli(*([command] if command else []), "--help")
    assert r.exit_code == 0, r.output
    text = r.stdout
    for ugly in ("<bool>", "<str>", "<int>", "<float>", "<list[str]>", "{checkpoints}", "{CKPT", "VALUE"):
        assert ugly not in text, (ugly, text)
    if command in ("flatness", "gradsim", "closeness", "plot-surface"):
        assert "CKPT..." in text and "DOMAINS" in text
        assert "'each'" in text or "'train'" in text  # the --domains help names the expansions


def test_command_list_does_not_break_mid_sentence():
    """Each command's summary in `landscape --help` is one paragraph: no line of it ends where the docstring's did
    (e.g. 'falls' alone on a line)."""
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}, terminal_width=200)
    rows = [line for line in r.stdout.splitlines() if line.startswith("│ ")]
    summary = {}
    last = None
    for line in rows:
        cells = line.strip("│ ").split(None, 1)
        if line[2] != " " and cells:
            last = cells[0]
            summary[last] = [cells[1] if len(cells) > 1 else ""]
        elif last:
            summary[last].append(line.strip("│ "))
    assert {"closeness", "demo", "mechanism"} <= set(summary), r.stdout
    for name in ("closeness", "demo", "mechanism"):  # their docstrings span several lines
        assert len(summary[name]) <= 2, summary[name]  # 200 columns: at most one wrap, never three broken lines


def test_help_imports_no_torch():
    """`landscape --help` and a command's help stay fast: no torch, numpy or matplotlib is imported."""
    code = ("import runpy, sys\nfor argv in (['landscape', '--help'], ['landscape', 'gradsim', '--help']):\n"
            "    sys.argv = argv\n    try:\n        runpy.run_module('cli.main', run_name='__main__')\n"
            "    except SystemExit:\n        pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'matplotlib', 'scipy') if m in sys.modules))")
    r = _run([sys.executable, "-c", code])
    assert "HEAVY []" in r.stdout, r.stdout[-500:] + r.stderr[-500:]


def test_train_max_steps_is_the_spelling(tmp_path):
    """`train --max-steps` (the README's name) trains that many steps; `--steps` stays as a hidden alias."""
    from conftest import invoke_cli

    r = invoke_cli("train", "--suite", "bowls", "--max-steps", "2", "--accum", "1", "--warmup", "1",
                   "--eval-every", "1", "--ckpt-every", "2", "--device", "cpu", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "a" / "ckpt-000002").is_dir() and not (tmp_path / "a" / "ckpt-000003").exists()
    r = invoke_cli("train", "--resume", "--out", tmp_path / "a", "--max-steps", "1")
    assert r.exit_code == 2 and "--max-steps 1 is shorter" in r.stderr
    h = invoke_cli("train", "--help").stdout
    assert "--max-steps" in h and "--steps " not in h


# --- unconverged, n/a and suspicious values explained where printed ------------------------------------------

def test_unconverged_closeness_is_explained_in_table_and_figure(bowls_run, tmp_path):
    """A budget too small to take one step: the table says why there is no minimum (not '(reached)'/'walked 0'),
    the figure draws the promised gray hatched bars and no empty heatmap or placeholder colorbar."""
    from matplotlib.image import AxesImage

    from conftest import invoke_cli
    from landscape.render.geometry import closeness_figure
    from landscape.closeness import ClosenessResult

    r = invoke_cli("closeness", bowls_run, "--max-evals", "3", "--device", "cpu", "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.stderr
    assert "(reached)" not in r.stdout and "walked 0" not in r.stdout
    assert "no step was accepted" in r.stdout and "budget was spent" in r.stdout and "no step taken" in r.stdout
    import json

    res = ClosenessResult.from_dict(json.loads((tmp_path / "c.json").read_text())["results"][0]["result"])
    assert not any(res.converged_by_domain.values())
    fig = closeness_figure([res], ["x"])
    bar_ax = fig.axes[0]
    gray = [p for p in bar_ax.patches if p.get_hatch() == "//"]
    assert len(gray) == len(res.domains) and all(p.get_height() > 0 for p in gray)
    assert not any(isinstance(a, AxesImage) for ax in fig.axes for a in ax.get_children())  # nothing to map
    assert len(fig.axes) == 3  # no colorbars of empty maps
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "not measured" in texts and "not converged" in texts


def test_closeness_cross_loss_panel_shows_the_increase(bowls_run):
    """The cross-loss heatmap shows L_j(theta_i*) - L_j(theta) (checked against the result's own numbers)."""
    import numpy as np

    from landscape import load, closeness
    from landscape.render.geometry import closeness_figure

    res = closeness(load(str(bowls_run), device="cpu"), seed=0)
    fig = closeness_figure([res], ["x"])
    im = [a for a in fig.axes[2].get_children() if a.__class__.__name__ == "AxesImage"][0]
    shown = np.ma.filled(im.get_array().astype(float), np.nan)
    for i, d in enumerate(res.domains):
        for j, c in enumerate(res.columns):
            want = res.cross_loss[i][j] - res.loss_start[c] if c in res.loss_start else np.nan
            assert np.isnan(want) and np.isnan(shown[i, j]) or abs(shown[i, j] - want) < 1e-9


def test_flatness_explains_residual_and_ggn_lambda_min(tiny_mix_run):
    """'converged yes' beside a residual above tol is explained (error bound vs residual), and so is λmin n/a
    under the GGN."""
    from conftest import run_cli_process

    r = run_cli_process("flatness", tiny_mix_run.path, "--curvature", "ggn", "-k", "1", "--no-trace", "--device",
                        "cpu", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "rel. error bound" in r.stdout and "√tol·|λ|" in r.stdout
    assert "GGN is positive semi-definite" in r.stdout


def test_auto_probe_is_not_flipped_by_one_preempted_call(tiny_mix_run, monkeypatch):
    """On a fake clock where vmap costs 1 ms per 16 points and the loop 4 ms per 4 points, vmap calls preempted
    for 20 ms (a busy machine: the first timed call of each round, as timing single calls saw it) must not make
    --batch auto pick the loop: each mode is timed over repeated calls for long enough to absorb that."""
    from landscape import load
    from landscape.surface import engine

    obj = load(str(tiny_mix_run.path), device="cpu")
    clock = {"t": 0.0, "vmap_calls": 0}
    cost = {"vmap": 0.001, "loop": 0.004}

    def fake_call(self, origin, D, ab):
        if self.mode == "vmap":
            clock["vmap_calls"] += 1
            if clock["vmap_calls"] in (2, 3):  # the first timed vmap calls
                clock["t"] += 0.02
        clock["t"] += cost[self.mode]
        return {d: None for d in self.names}

    monkeypatch.setattr(engine.Evaluator, "__call__", fake_call)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock["t"])
    p = engine.probe(obj, list(obj.domains))
    assert p["pick"] == "vmap", p
    assert p["vmap"] > 2 * p["loop"]  # 16,000 vs 1,000 points/s on this clock, less the preemption


def test_surface_from_says_its_speed_is_stored(tiny_mix_run, tmp_path):
    """`plot-surface --from` evaluates nothing: the table calls the evaluation and its speed stored."""
    from conftest import invoke_cli

    r = invoke_cli("plot-surface", tiny_mix_run.path, "--grid", "3", "--device", "cpu", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    assert "auto: probed vmap" in r.stdout and "stored" not in r.stdout
    r = invoke_cli("plot-surface", "--from", tmp_path / "s" / "surface.npz", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.stderr
    assert "points/s (stored)" in r.stdout and "nothing evaluated now" in r.stdout


def test_report_reading_lists_nothing_it_does_not_list(monkeypatch):
    """With no interval excluding zero, the reading says so (no '(listed above)' above an empty list)."""
    from landscape.app import demo_report

    class _Toy:
        @staticmethod
        def from_dict(d):
            return _Toy()

        def reading(self):
            return "toy"

    monkeypatch.setattr(demo_report, "MechanismResult", _Toy)
    suite = {"per_seed": [{"seed": 0, "gaps": {"a-b": 0.001}, "flagged": []}], "match_tol": 0.002,
             "closeness_converged": {"a": True},
             "paired": [{"metric": "ood_loss", "arm": "nexus", "baseline": "adamw", "verdict": "includes zero",
                         "reading": "r", "mean": 0.01, "ci_low": -0.02, "ci_high": 0.04, "sd": 0.03, "mde": 0.05}]}
    text = demo_report.reading({"suites": {"text": suite}, "mechanism": {}})
    # the null is listed with its power; nothing refers to a list that is not there
    assert "listed above" not in text and "0 of 1 paired comparisons" in text
    assert "not detectable at this power (MDE 0.05)" in text
    suite["paired"][0]["verdict"] = "below zero"
    text = demo_report.reading({"suites": {"text": suite}, "mechanism": {}})
    assert "listed above" not in text and "1 of 1 paired comparisons" in text and "<li>OOD" in text


# --- figures a reader can judge sum vs intersection from -----------------------------------------------------

def _records(offset):
    return [{"step": s, "train_loss": 3.0 - 0.1 * s + offset, "losses": {"ood": 4.0 - 0.1 * s + offset}}
            for s in range(0, 11, 5)]


def test_training_figure_plots_differences_from_adamw_outside_legend():
    """The bottom row shows arm - AdamW per seed (mean of the paired differences), the legend is the figure's."""
    from landscape.render.demo_curves import training_figure

    curves = {"adamw": [_records(0.0), _records(0.02)], "nexus": [_records(-0.01), _records(0.0)]}
    cos = {a: [[{"step": 5, "mean_cosine": 0.1}], [{"step": 5, "mean_cosine": 0.2}]] for a in curves}
    fig = training_figure(curves, cos, ["ood"], title="t")
    diff_ax = fig.axes[3]  # bottom row, training loss
    lines = [ln for ln in diff_ax.get_lines() if len(ln.get_xdata()) == 3]
    assert lines and all(abs(v - (-0.015)) < 1e-12 for v in lines[0].get_ydata())  # mean of -0.01 and -0.02
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)


def test_gradsim_figure_names_and_flags_the_self_cosine():
    from landscape.render.geometry import gradsim_figure

    r = {"domains": ["a", "b"], "cosine": [[1.0, 0.2], [0.2, 1.0]], "cosine_stderr": None,
         "split_half": {"a": 0.8, "b": 0.04}, "loss": {}}
    fig = gradsim_figure([r], ["x"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "ceiling\n0.80" in texts and "ceiling\n0.04\nnoise" in texts
    assert "ceiling" in fig._suptitle.get_text() and "noise" in fig._suptitle.get_text()


def test_plotly_surface_keeps_its_full_z_range_and_camera_from_data(tiny_mix_run):
    """The 3-D surface is not clipped into a plateau: its z range spans the data; the camera faces away from the
    high side; every button sets the view of its domain."""
    import numpy as np

    from landscape import load, surface
    from landscape.render.surface import html_figure

    r = surface(load(str(tiny_mix_run.path), device="cpu"), grid=5, span=3.0, batch="loop")
    fig = html_figure(r)
    z = np.asarray(r.losses["train"], dtype=float)
    surf = [t for t in fig.data if t.type == "surface" and t.name == "train"][0]
    assert np.nanmax(np.asarray(surf.z, dtype=float)) == np.nanmax(z)
    lo, hi = fig.layout.scene.zaxis.range
    assert lo <= np.nanmin(z) and hi >= np.nanmax(z)
    assert fig.layout.scene.zaxis.title.text == "loss"
    for b in fig.layout.updatemenus[0].buttons:
        assert "scene.zaxis.range" in b.args[1] and "scene.camera" in b.args[1]


def test_trajectory_toy_has_a_colorbar_and_a_legend_for_every_marker():
    from landscape.app.toys import trajectory_toy
    from landscape.render.toys import trajectory_plot

    fig = trajectory_plot(trajectory_toy())
    assert len(fig.axes) == 2  # the panel and its colorbar
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert {"adamw end", "nexus end", "start (both)", "min training loss"} <= set(labels)


def test_mechanism_figure_star_on_top_and_one_quantity_per_axis():
    from landscape.app.mechanism import mechanism_toy
    from landscape.render.mechanism import mechanism_figure

    r = mechanism_toy([0.1, 0.2], n_orders=1, n_along=2, steps=4)
    fig = mechanism_figure(r)
    ax0 = fig.axes[0]
    star = [ln for ln in ax0.get_lines() if ln.get_marker() == "*"][0]
    paths = [ln for ln in ax0.get_lines() if len(ln.get_xdata()) > 2]
    assert paths and star.get_zorder() > max(p.get_zorder() for p in paths)
    d_axes = [ax for ax in fig.axes if ax.get_xscale() == "log"][2:]  # (b), (c), then (d)'s axes
    assert len(d_axes) == 3
    ylabels = [ax.get_ylabel() for ax in d_axes]
    assert any("drift" in y for y in ylabels) and any("cosine" in y for y in ylabels) and any("fraction" in y
                                                                                             for y in ylabels)


def test_domains_plane_can_skip_descents_of_unpaired_domains(bowls_run):
    """descend_others=False (the demo's setting): the given minima are marked, no other domain is descended."""
    import torch

    from landscape import load, surface
    from landscape.params import get_flat

    obj = load(str(bowls_run), device="cpu")
    th = get_flat(obj.params()).double()
    mins = {d: th + 0.1 * torch.eye(th.numel(), dtype=th.dtype)[i] for i, d in enumerate(obj.train_domains)}
    r = surface(obj, grid=3, plane="domains", minima=mins, descend_others=False, batch="loop")
    assert set(r.points) == {"theta"} | {f"min:{d}" for d in obj.train_domains}  # no min:ood
    r = surface(obj, grid=3, plane="domains", minima=mins, batch="loop")
    assert "min:ood" in r.points  # the default still finds and marks every evaluated domain's minimum


def test_range_level_outlines_a_flat_plane():
    """'range:E' puts each domain's level E of the way up its range on the grid (a plane flatter than rel:0.1)."""
    import types

    import numpy as np

    from landscape.render.surface import parse_level, resolve_levels

    r = types.SimpleNamespace(losses={"a": np.array([[1.0, 1.2], [1.4, 2.0]]), "train": np.ones((2, 2))})
    assert parse_level("range:0.25") == ("range", 0.25)
    assert resolve_levels(r, "range:0.25") == {"a": 1.25}
