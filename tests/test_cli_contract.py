"""One CLI contract for every analyzer command: `--json -` is one JSON envelope on stdout (command, version, each
checkpoint's path and step), `--csv -` is a long-format CSV on stdout, tables go to stderr then."""
from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import assert_one_line_error, invoke_cli
from nexus_opt import __version__

COLUMNS = ["checkpoint", "step", "domain", "metric", "value"]
TINY = {
    "flatness": ["-k", "1", "--trace-probes", "4", "--which", "top"],
    "gradsim": ["--resamples", "2"],
    "closeness": ["--max-steps", "5", "--optimizer", "adamw"],
    "plot-surface": ["--grid", "3"],
    "alignment": ["--gammas", "0.01,0.1", "--K", "2"],
}


def _args(command, run, tmp_path):
    extra = ["--out", str(tmp_path / "surf")] if command == "plot-surface" else []
    return [command, str(run / "ckpt-000000"), str(run), "--device", "cpu", *TINY[command], *extra]


@pytest.mark.parametrize("command", list(TINY))
def test_json_stdout_is_one_envelope(command, bowls_run, tmp_path):
    r = invoke_cli(*_args(command, bowls_run, tmp_path), "--json", "-")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)  # stdout carries only the JSON: the tables went to stderr
    assert data["command"] == command and data["version"] == __version__
    assert [e["checkpoint"] for e in data["results"]] == [str(bowls_run / "ckpt-000000"), str(bowls_run)]
    assert [e["step"] for e in data["results"]] == [0, 2]
    assert all(isinstance(e["result"], dict) and e["result"] for e in data["results"])
    assert r.stderr.strip()  # the table is still shown, on stderr


@pytest.mark.parametrize("command", list(TINY))
def test_csv_stdout_is_long_format(command, bowls_run, tmp_path):
    r = invoke_cli(*_args(command, bowls_run, tmp_path), "--csv", "-")
    assert r.exit_code == 0, r.stderr
    reader = csv.DictReader(io.StringIO(r.stdout))
    rows = list(reader)
    assert reader.fieldnames == COLUMNS and rows
    assert {row["checkpoint"] for row in rows} == {str(bowls_run / "ckpt-000000"), str(bowls_run)}
    assert {row["step"] for row in rows} == {"0", "2"}
    for row in rows:
        if row["value"]:
            float(row["value"])  # every value is a number (or empty: not measured / not converged)
    assert any(row["domain"] in ("bowl0", "bowl1", "train") for row in rows)  # per-domain metrics carry their domain


def test_json_and_csv_files_and_table_on_stdout(bowls_run, tmp_path):
    r = invoke_cli("gradsim", str(bowls_run), "--resamples", "2", "--device", "cpu", "--json", tmp_path / "g.json",
                   "--csv", tmp_path / "g.csv")
    assert r.exit_code == 0, r.stderr
    assert "gradient similarity summary" in r.stdout and "wrote" in r.stderr and "wrote" not in r.stdout
    assert json.loads((tmp_path / "g.json").read_text())["results"][0]["step"] == 2
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    cos = {(x["domain"], x["metric"]): float(x["value"]) for x in rows if x["metric"].startswith("cosine.")}
    data = json.loads((tmp_path / "g.json").read_text())["results"][0]["result"]
    i, j = data["domains"].index("bowl0"), data["domains"].index("bowl1")
    assert cos[("bowl0", "cosine.bowl1")] == pytest.approx(data["cosine"][i][j])


def test_plot_surface_out_file_is_that_file(bowls_run, tmp_path):
    target = tmp_path / "fig" / "x.png"
    r = invoke_cli("plot-surface", str(bowls_run), "--grid", "3", "--device", "cpu", "--out", target)
    assert r.exit_code == 0, r.stderr
    assert target.is_file() and target.stat().st_size > 1000
    assert (tmp_path / "fig" / "x.npz").is_file() and "loss surfaces" in r.stdout


def test_flatness_domains_list_and_ggn_title(bowls_run, tmp_path):
    r = invoke_cli("flatness", str(bowls_run), "--domains", "bowl0,bowl1", "-k", "1", "--no-trace", "--which", "top",
                   "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]["result"]
    assert set(res["results"]) == {"bowl0", "bowl1"}
    assert "Hessian eigenvalues" in r.stderr


def test_flatten_is_generic():
    from cli.export import flatten

    rows = flatten({"domains": ["a", "b"], "cosine": [[1.0, 0.5], [0.5, 1.0]], "loss": {"a": 1.0, "b": None},
                    "converged": {"a": True, "b": False}, "spread": 0.25, "eigenvalues": [3.0, 2.0],
                    "settings": {"grid": 5}, "note": "text"})
    assert ("a", "cosine.b", "0.5") in rows and ("b", "loss", "") in rows and ("a", "converged", "1") in rows
    assert ("", "spread", "0.25") in rows and ("", "eigenvalues.1", "2.0") in rows
    assert not any("settings" in m or "note" in m for _, m, _ in rows)


# -- old option spellings: accepted, hidden from --help, never in conflict with the documented one --------------
ALIASES = [("closeness", "--steps", "--max-steps"), ("plot-surface", "--steps", "--descent-steps"),
           ("train", "--steps", "--max-steps"),
           ("flatness", "--domain", "--domains")]


@pytest.mark.parametrize("command,old,new", ALIASES)
def test_old_spellings_are_hidden_from_help(command, old, new):
    import re

    r = invoke_cli(command, "--help")
    assert r.exit_code == 0
    assert new in r.stdout and not re.search(re.escape(old) + r"(?![\w-])", r.stdout), r.stdout
    if command == "closeness":
        assert "adamw" in r.stdout and not re.search(r"\badam\b", r.stdout)


def test_old_spellings_still_work(bowls_run, tmp_path):
    r = invoke_cli("closeness", str(bowls_run), "--steps", "3", "--optimizer", "adam", "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    settings = json.loads(r.stdout)["results"][0]["result"]["settings"]
    assert settings["steps"] == 3 and settings["optimizer"] == "adamw"
    r = invoke_cli("flatness", str(bowls_run), "--domain", "bowl1", "-k", "1", "--no-trace", "--which", "top",
                   "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert set(json.loads(r.stdout)["results"][0]["result"]["results"]) == {"bowl1"}
    r = invoke_cli("plot-surface", str(bowls_run), "--plane", "domains", "--steps", "0", "--device", "cpu",
                   "--out", str(tmp_path / "s"))
    assert_one_line_error(r.exit_code, r.stderr, contains="--descent-steps")  # --steps reached --descent-steps


@pytest.mark.parametrize("command,args", [
    ("closeness", ["--max-steps", "3", "--steps", "4"]),
    ("train", ["--max-steps", "3", "--steps", "4"]),
    ("plot-surface", ["--descent-steps", "3", "--steps", "4"]),
    ("flatness", ["--domains", "bowl0", "--domain", "bowl1"]),
])
def test_old_and_new_spelling_disagreeing_is_refused(command, args, bowls_run, tmp_path):
    if command == "train":  # refused before a run is started
        r = invoke_cli("train", "--suite", "bowls", *args, "--out", str(tmp_path / "t"))
        assert_one_line_error(r.exit_code, r.stderr, contains="disagree")
        assert not (tmp_path / "t").exists()
        return
    r = invoke_cli(command, str(bowls_run), *args, "--device", "cpu", "--out" if command == "plot-surface" else
                   "--seed", str(tmp_path / "s") if command == "plot-surface" else "0")
    assert_one_line_error(r.exit_code, r.stderr, contains="disagree")
