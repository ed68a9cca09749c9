"""The researcher views' commands (issue 21) under the analyzer contract: `--json -` is one envelope on stdout,
`--csv -` a long-format CSV, figures are written, bad input is one line with exit 2."""
from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import assert_one_line_error, invoke_cli

COLUMNS = ["checkpoint", "step", "domain", "metric", "value"]


def _sharpness(run):
    return ["sharpness", str(run / "ckpt-000000"), str(run), "--device", "cpu", "--samples", "4", "--steps", "3"]


def _connect(run):
    return ["connect", str(run / "ckpt-000000"), str(run), "--device", "cpu", "--points", "5"]


@pytest.mark.parametrize("make", [_sharpness, _connect])
def test_json_and_csv_on_stdout(make, bowls_run):
    args = make(bowls_run)
    r = invoke_cli(*args, "--json", "-")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["command"] == args[0] and data["results"] and all(e["result"] for e in data["results"])
    r = invoke_cli(*args, "--csv", "-")
    assert r.exit_code == 0, r.stderr
    reader = csv.DictReader(io.StringIO(r.stdout))
    rows = list(reader)
    assert reader.fieldnames == COLUMNS and rows
    assert any(row["domain"] in ("bowl0", "train") for row in rows)
    for row in rows:
        if row["value"]:
            float(row["value"])


def test_sharpness_cli_numbers_and_plot(bowls_run, tmp_path):
    from landscape import load
    from landscape.sharpness import sharpness

    r = invoke_cli("sharpness", str(bowls_run), "--device", "cpu", "--samples", "4", "--steps", "3", "--adaptive",
                   "filter", "--rho", "0.1", "--domains", "bowl0,train", "--json", tmp_path / "s.json",
                   "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.stderr
    got = json.loads((tmp_path / "s.json").read_text())["results"][0]["result"]
    want = sharpness(load(bowls_run), domains="bowl0,train", samples=4, steps=3, adaptive="filter", rho=0.1)
    assert got["domains"] == ["bowl0", "train"] and got["adaptive"] == "filter"
    assert got["results"]["train"]["worst"] == pytest.approx(want["train"].worst, rel=1e-12)
    assert (tmp_path / "s.png").stat().st_size > 0


def test_connect_cli_to_a_minimum_with_bezier_and_plot(bowls_run, tmp_path):
    r = invoke_cli("connect", str(bowls_run), "min:bowl0", "--device", "cpu", "--points", "5", "--bezier",
                   "--bezier-steps", "5", "--json", tmp_path / "c.json", "--plot", tmp_path / "c.png")
    assert r.exit_code == 0, r.stderr
    got = json.loads((tmp_path / "c.json").read_text())["results"][0]["result"]
    assert got["endpoints"][1] == "min:bowl0" and got["bezier_barrier"] is not None
    assert got["linear"]["bowl0"][-1] < got["linear"]["bowl0"][0]
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("args,contains", [
    (["sharpness", "{run}", "--rho", "0"], "--rho"),
    (["sharpness", "{run}", "--adaptive", "layerwise"], "--adaptive"),
    (["sharpness", "{run}", "--samples", "1"], "--samples"),
    (["sharpness", "{run}", "--domains", "nope"], "unknown domain"),
    (["connect", "{run}", "{run}"], "same point"),
    (["connect", "min:bowl0", "min:bowl1"], "--at"),
    (["connect", "{run}", "min:nope"], "nope"),
    (["connect", "{run}", "{ckpt0}", "--points", "2"], "--points"),
    (["connect", "{run}", "{ckpt0}", "--bn"], "BatchNorm"),
])
def test_bad_input_is_one_line(args, contains, bowls_run):
    args = [a.format(run=bowls_run, ckpt0=bowls_run / "ckpt-000000") for a in args]
    r = invoke_cli(*args, "--device", "cpu")
    assert_one_line_error(r.exit_code, r.stderr, contains=contains)


def test_plot_surface_trajectory_and_eigen_planes(tiny_mix_run, tmp_path):
    run = tiny_mix_run.path
    r = invoke_cli("plot-surface", str(run), "--plane", "trajectory", "--grid", "3", "--device", "cpu",
                   "--out", tmp_path / "t", "--json", "-")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]["result"]
    assert res["plane"] == "trajectory" and len(res["points"]) == 4  # checkpoints at steps 0, 2, 4, 6
    assert res["points"][next(k for k in res["points"] if k.endswith("@6"))] == [0.0, 0.0]  # origin: final weights
    assert (tmp_path / "t" / "surface_overlay.png").stat().st_size > 0
    r = invoke_cli("plot-surface", str(run), "--plane", "eigen", "--grid", "3", "--span", "0.2", "--device", "cpu",
                   "--eigen-domain", "a", "--out", tmp_path / "e", "--csv", "-")
    assert r.exit_code == 0, r.stderr
    assert "grid_minimum" in r.stdout


def test_trajectory_plane_refuses_too_few_checkpoints(bowls_run, tmp_path):
    r = invoke_cli("plot-surface", str(bowls_run), "--plane", "trajectory", "--grid", "3", "--device", "cpu",
                   "--out", tmp_path / "t")
    assert_one_line_error(r.exit_code, r.stderr, contains="at least 3 checkpoints")
