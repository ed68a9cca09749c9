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


ARMS = ("adamw", "control", "nexus")
PAIRS = (("nexus", "adamw"), ("nexus", "control"), ("control", "adamw"))


@pytest.fixture(scope="module")
def summary(demo_dir) -> dict:
    return json.loads((demo_dir / "summary.json").read_text())


def test_report_has_every_section(demo_dir):
    html = (demo_dir / "report.html").read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in html, sid
    assert "<script src=\"http" not in html  # self-contained: plotly.js is inline
    for fig in ("mechanism", "figure2", "toy2d", "curves-text", "curves-mix", "gradsim-text", "closeness-mix",
                "surface-text"):
        assert (demo_dir / "figures" / f"{fig}.png").stat().st_size > 10_000


def test_three_arms_and_paired_intervals(summary):
    assert summary["settings"]["arms"] == {"adamw": "adamw", "control": "nexus-parallel", "nexus": "nexus"}
    f2 = summary["figure2"]["configs"]
    assert f2["fig2-sum"]["target_loss_at_0"] == pytest.approx(2.68, abs=1e-12)
    for suite in ("text", "mix"):
        s = summary["suites"][suite]
        assert set(s["aggregate"]) == set(ARMS)
        metrics = list(s["aggregate"]["adamw"])
        assert {"train_loss", "ood_loss", "mean_cosine", "conflict_rate", "spread", "mean_sq_distance",
                "thm31_bound", "top_eigenvalue", "trace"} <= set(metrics)
        got = {(p["metric"], p["arm"], p["baseline"]): p for p in s["paired"]}
        assert len(got) == len(s["paired"]) == 3 * len(metrics)  # one row per (metric, pair): no duplicates
        for m in metrics:
            for a, b in PAIRS:
                p = got[(m, a, b)]
                va, vb = s["aggregate"][a][m]["values"], s["aggregate"][b][m]["values"]
                diffs = [x - y for x, y in zip(va, vb) if x is not None and y is not None]
                assert p["n"] == len(diffs)
                if m != "thm31_bound":  # the bound is null where a curvature is <= 0 (documented)
                    assert p["n"] == 2, (suite, m, a, b)
                if p["n"] >= 2:  # independent check: mean and t-interval from the per-arm values
                    mean = sum(diffs) / len(diffs)
                    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
                    half = 12.706204736174707 * sd / 2 ** 0.5  # t_{0.975, 1}
                    assert p["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
                    assert p["ci_low"] == pytest.approx(mean - half, rel=1e-9, abs=1e-12)
                    assert p["positive"] + p["negative"] <= p["n"]
                    assert p["reading"].startswith(f"{a} - {b}, {m}: mean")


def test_closeness_converged_on_every_checkpoint(summary):
    for suite in ("text", "mix"):
        s = summary["suites"][suite]
        assert len(s["closeness_converged"]) == 3 * len(summary["settings"]["seeds"])
        assert all(s["closeness_converged"].values()), (suite, s["closeness_converged"])
        for r in s["per_seed"]:
            for a in ARMS:
                cl = r["matched"][a]["analysis"]["closeness"]
                assert cl["converged"] is True and all(cl["converged_by_domain"].values()) and cl["spread"] is not None


def test_cosine_over_training_for_every_arm(summary):
    for suite, s in summary["suites"].items():
        every = next(p["gradsim_every"] for p in summary["settings"]["plans"] if p["suite"] == suite)
        for a in ARMS:
            assert len(s["cosine_curves"][a]) == 2
            for rows in s["cosine_curves"][a]:
                assert len(rows) >= 3 and all(r["step"] % every == 0 for r in rows)
                assert all(-1 <= r["mean_cosine"] <= 1 for r in rows)


def test_losses_matched_or_flagged(summary):
    for suite, s in summary["suites"].items():
        for r in s["per_seed"]:
            m = r["matched"]
            gaps = {f"{a}-{b}": abs(m[a]["train_loss"] - m[b]["train_loss"]) for a, b in PAIRS}
            assert gaps == pytest.approx(r["gaps"])
            assert r["flagged"] == sorted(k for k, g in gaps.items() if g > 0.002)
            for a in ARMS:  # every matched checkpoint lies in the window around the target
                assert abs(m[a]["train_loss"] - r["target"]) <= m[a]["window"] + 1e-12
                assert m[a]["window"] in (s["match_window"], 2 * s["match_window"], 4 * s["match_window"])
            for a in ARMS:  # the analysed checkpoint holds the loss reported for it
                assert m[a]["analysis"]["losses"]["train"] == pytest.approx(m[a]["train_loss"], abs=1e-6)
        assert set(s["speed"]["steps"]) == set(ARMS) and len(s["speed"]["paired"]) == 3


def test_mechanism_and_timings(summary):
    mech = summary["mechanism"]
    assert {r["arm"] for r in mech["table"]} == set(ARMS) and len(mech["gammas"]) >= 3
    t = summary["timings"]
    assert {"toys", "mechanism toy", "text: training", "mix: analysis", "report"} <= set(t)
    assert all(v["cpu_s"] >= 0 and v["wall_s"] >= 0 for v in t.values())
    assert summary["cpu_seconds"] > 0


def test_demo_resumes_without_retraining(demo_dir):
    """A second run over the same directory reuses the finished runs (their checkpoints are untouched)."""
    ck = demo_dir / "runs" / "mix-adamw-s0" / "ckpt-000060" / "manifest.json"
    before = ck.stat().st_mtime_ns
    res = invoke_cli("demo", "--quick", "--out", str(demo_dir), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert ck.stat().st_mtime_ns == before


def test_researcher_views(summary, demo_dir):
    """Issue 21: the three arms' paths on one trajectory plane from one initialisation, sharpness paired over
    seeds, the AdamW-Nexus barrier; their figures in the report."""
    from landscape.surface import SurfaceResult

    for suite, s in summary["suites"].items():
        v = s["views"]
        tr = SurfaceResult.load(v["trajectory"])
        paths = tr.normalization["paths"]
        assert list(paths) == list(ARMS)
        starts = [tr.points[paths[a][0]] for a in ARMS]  # one initialisation: the three paths start together
        assert all(abs(p[0] - starts[0][0]) < 1e-9 and abs(p[1] - starts[0][1]) < 1e-9 for p in starts)
        assert tr.points[paths["adamw"][-1]] == [0.0, 0.0]
        assert len(v["sharpness_paired"]) == 2 * len(PAIRS)
        assert all(p["n"] == len(summary["settings"]["seeds"]) for p in v["sharpness_paired"])
        for a in ARMS:
            assert all(x is not None and x >= 0 for x in v["sharpness_values"][a]["sharpness_worst"])
        assert [c["endpoints"] for c in v["connect"]] == [["adamw", "nexus"]] * len(summary["settings"]["seeds"])
        assert all(c["barrier"]["train"] is not None and c["barrier"]["train"] >= 0 for c in v["connect"])
        for fig in ("trajectory", "sharpness", "connect"):
            assert (demo_dir / "figures" / f"{fig}-{suite}.png").stat().st_size > 10_000


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


def test_surfaces_through_the_domain_minima_on_every_suite(summary):
    """Every suite's surface is the plane through the domain minima (text: in closeness's parameter subset), on a
    grid fine enough to show the low-loss outlines."""
    from landscape.surface import SurfaceResult

    for suite, s in summary["suites"].items():
        for a in ARMS:
            r = SurfaceResult.load(s["surfaces"][a])
            assert r.plane == "domains", (suite, a, r.plane)
            assert min(r.settings["grid"]) >= 13, (suite, r.settings["grid"])


def test_every_null_with_its_power_forest_plot_and_toy_start_distance(demo_dir, summary):
    from landscape.app.stats import mde

    for suite in ("text", "mix"):
        assert (demo_dir / "figures" / f"forest-{suite}.png").stat().st_size > 10_000
        for p in summary["suites"][suite]["paired"]:
            if p["n"] >= 2:
                assert p["mde"] == pytest.approx(mde(p["sd"], p["n"]))
                if p["verdict"] == "includes zero" and p["sd"] > 0:
                    assert f"not detectable at this power (MDE {p['mde']:.3g}" in p["reading"]
        agg = summary["suites"][suite]["aggregate"]
        assert all(v is not None for v in agg["nexus"]["alignment_rate"]["values"])  # at every matched checkpoint
    sweep = summary["mechanism_distance"]
    assert [e["distance"] for e in sweep] == [0.05, 0.2]
    html = (demo_dir / "report.html").read_text()
    assert "not detectable at this power" in html and "start distance" in html
