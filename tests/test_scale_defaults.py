"""Issue 22: the defaults answer on the README's own path (a small copy of the default text run): closeness on
byte-level text states and uses a convergent objective; flatness's products run in the auto precision."""
from __future__ import annotations

import json

from conftest import run_cli_process


def test_closeness_defaults_on_text_converge_with_the_stated_proximal_objective(tmp_path, tiny_text_run):
    out = tmp_path / "c.json"
    p = run_cli_process("closeness", tiny_text_run.path, "--json", out, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "no finite minimum" in p.stderr and "--prox-mu 0" in p.stderr  # the choice is said, with the way out
    r = json.loads(out.read_text())["results"][0]["result"]
    assert r["settings"]["prox_mu"] == 1.0 and r["settings"]["params"] == r"blocks\.0\.mlp\.2\."
    assert r["converged"] and r["settings"]["rtol"] == 1e-6
    assert r["spread"] is not None  # a converged closeness has its summaries


def test_closeness_prox_mu_zero_is_the_plain_loss(tmp_path, tiny_text_run):
    out = tmp_path / "c.json"
    p = run_cli_process("closeness", tiny_text_run.path, "--prox-mu", "0", "--max-evals", "20", "--json", out,
                        timeout=300)
    assert p.returncode == 0, p.stderr
    assert "no finite minimum" not in p.stderr
    r = json.loads(out.read_text())["results"][0]["result"]
    assert r["settings"]["prox_mu"] == 0.0 and r["settings"]["params"] is None
