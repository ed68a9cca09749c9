"""`landscape demo --quick` end to end: every report section, the figures, the data, and a headless browser."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import invoke_cli
from landscape.app.demo_report import SECTIONS


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "quick"
    res = invoke_cli("demo", "--quick", "--out", str(out), "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


def test_report_has_every_section(demo_dir):
    html = (demo_dir / "report.html").read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in html, sid
    assert "<script src=\"http" not in html  # self-contained: plotly.js is inline
    for fig in ("figure2", "toy2d", "curves-text", "curves-mix", "gradsim-text", "closeness-mix", "surface-text"):
        assert (demo_dir / "figures" / f"{fig}.png").stat().st_size > 10_000


def test_summary_numbers(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    f2 = s["figure2"]["configs"]
    assert f2["fig2-sum"]["target_loss_at_0"] == pytest.approx(2.68, abs=1e-12)
    assert f2["fig2-intersection"]["target_loss_at_0"] == pytest.approx(1.10, abs=1e-12)
    for suite in ("text", "mix"):
        agg = s["suites"][suite]["aggregate"]
        for opt in ("adamw", "nexus"):
            assert agg[opt]["train_loss"]["n"] == len(s["settings"]["seeds"]) == 2
            assert agg[opt]["ood_loss"]["mean"] > 0
        for r in s["suites"][suite]["per_seed"]:
            p = r["pair"]
            # the matched pair is the closest in training loss among the checkpoints
            assert p["gap"] <= abs(p["final_a_train_loss"] - p["final_b_train_loss"]) + 1e-12


def test_demo_resumes_without_retraining(demo_dir):
    """A second run over the same directory reuses the finished runs (their checkpoints are untouched)."""
    ck = demo_dir / "runs" / "mix-adamw-s0" / "ckpt-000060" / "manifest.json"
    before = ck.stat().st_mtime_ns
    res = invoke_cli("demo", "--quick", "--out", str(demo_dir), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert ck.stat().st_mtime_ns == before


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    if _chromium() is None:
        if os.environ.get("CI"):  # CI's set-up (scripts/setup.sh --test) installs it: a missing browser is a failure
            pytest.fail("headless Chromium is missing in CI; scripts/setup.sh --test should have installed it")
        pytest.skip("headless Chromium is not installed (scripts/setup.sh --test installs it)")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
           (demo_dir / "report.html").resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    assert 'data-rendered="ok"' in dom, "plotly figures did not render"
    assert "data-errors=" not in dom, "the page raised script errors"
    n = int(dom.split('data-figures="')[1].split('"')[0])
    assert n >= 15
