"""Bad input to the analyzer commands (flatness, gradsim, closeness, plot-surface, demo): one line
`error: ...` on stderr, exit status 2, no traceback, nothing on stdout and nothing written.

Every case is refused before any real work, so the whole file runs in seconds on one shared tiny run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, invoke_cli, run_cli_process

HUGE = "99999999999999999999999"  # overflowed torch's 64-bit seed before it was validated
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_mix_run, tiny_text_run) -> dict:
    """Placeholders of the cases: the tiny runs, a corrupt copy, a plain file and some bad result files."""
    base = tmp_path_factory.mktemp("analyzer_errors")
    corrupt = base / "corrupt"
    shutil.copytree(tiny_mix_run.path, corrupt)
    weights = sorted(corrupt.glob("ckpt-*"))[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 40, len(data) - 20):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    (base / "file.txt").write_text("not a checkpoint\n")
    (base / "text.npz").write_text("not an npz archive\n")
    (base / "empty.npz").write_bytes(b"")
    np.savez(base / "other.npz", a=np.zeros(3))  # a real .npz, but not a landscape result
    (base / "truncated.npz").write_bytes((base / "other.npz").read_bytes()[:60])
    return {"run": str(tiny_mix_run.path), "text": str(tiny_text_run.path), "corrupt": str(corrupt),
            "file": str(base / "file.txt"), "base": str(base)}


# (id, args, the text the error line must contain); {out} is a fresh path that must not be created.
FLATNESS = [
    ("missing-checkpoint", ["{base}/nowhere"], "does not exist"),
    ("file-not-dir", ["{file}"], "is a file"),
    ("corrupt-checkpoint", ["{corrupt}"], "checksum"),
    ("unknown-domain", ["{run}", "--domains", "zz"], "unknown domain 'zz'"),
    ("top-k-zero", ["{run}", "--top-k", "0"], "--top-k"),
    ("top-k-negative", ["{run}", "--top-k", "-3"], "--top-k"),
    ("top-k-over-param-count", ["{run}", "--top-k", "100000"], "parameters"),
    ("unknown-backend", ["{run}", "--backend", "nonsense"], "unknown backend 'nonsense'"),
    ("unknown-which", ["{run}", "--which", "sideways"], "unknown which"),
    ("tol-negative", ["{run}", "--tol", "-1"], "tol"),
    ("tol-zero", ["{run}", "--tol", "0"], "tol"),
    ("tol-nan", ["{run}", "--tol", "nan"], "tol"),
    ("max-hvps-zero", ["{run}", "--max-hvps", "0"], "max_hvps"),
    ("max-hvps-negative", ["{run}", "--max-hvps", "-5"], "max_hvps"),
    ("trace-probes-zero", ["{run}", "--trace-probes", "0"], "trace_probes"),
    ("density-steps-zero", ["{run}", "--density", "--density-steps", "0"], "density"),
    ("seed-overflow", ["{run}", "--seed", HUGE], "seed"),
    ("unknown-device", ["{run}", "--device", "tpu"], "unknown device 'tpu'"),
    ("json-under-a-file", ["{run}", "--json", "{file}/x.json"], "is a file"),
    ("json-is-a-directory", ["{run}", "--json", "{base}"], "is a directory"),
    ("plot-unknown-format", ["{run}", "--plot", "{out}.bogus"], "unsupported file type '.bogus'"),
    ("plot-no-extension", ["{run}", "--plot", "{out}"], "no file extension"),
]
GRADSIM = [
    ("missing-checkpoint", ["{run}", "{base}/nowhere"], "does not exist"),
    ("file-not-dir", ["{file}"], "is a file"),
    ("corrupt-checkpoint", ["{corrupt}"], "checksum"),
    ("unknown-domain", ["{run}", "--domains", "a,zz"], "'zz'"),
    ("no-domain", ["{run}", "--domains", ","], "names no domain"),
    ("repeated-domain", ["{run}", "--domains", "a,a"], "distinct"),
    ("resamples-negative", ["{run}", "--resamples", "-1"], "resamples"),
    ("resamples-one", ["{run}", "--resamples", "1"], "resamples"),
    ("seed-overflow", ["{run}", "--seed", HUGE], "seed"),
    ("json-under-a-file", ["{run}", "--json", "{file}/sub/x.json"], "is a file"),
    ("plot-unknown-format", ["{run}", "--plot", "{out}.bogus"], "unsupported file type"),
]
CLOSENESS = [
    ("missing-checkpoint", ["{base}/nowhere"], "does not exist"),
    ("corrupt-checkpoint", ["{corrupt}"], "checksum"),
    ("unknown-domain", ["{run}", "--domains", "zz"], "'zz'"),
    ("steps-zero", ["{run}", "--max-steps", "0"], "steps"),
    ("steps-negative", ["{run}", "--max-steps", "-1"], "steps"),
    ("lr-negative", ["{run}", "--lr", "-1"], "lr"),
    ("lr-nan", ["{run}", "--lr", "nan"], "lr"),
    ("unknown-optimizer", ["{run}", "--optimizer", "nonsense"], "unknown optimizer 'nonsense'"),
    ("seed-overflow", ["{run}", "--seed", HUGE, "--max-steps", "2"], "seed"),
    ("json-under-a-file", ["{run}", "--max-steps", "2", "--json", "{file}/x.json"], "is a file"),
    ("plot-unknown-format", ["{run}", "--max-steps", "2", "--plot", "{out}.bogus"], "unsupported file type"),
]
SURFACE = [
    ("missing-checkpoint", ["{base}/nowhere"], "does not exist"),
    ("file-not-dir", ["{file}"], "is a file"),
    ("corrupt-checkpoint", ["{corrupt}"], "checksum"),
    ("no-checkpoint", [], "at least one checkpoint"),
    ("grid-zero", ["{run}", "--grid", "0"], "--grid"),
    ("grid-one", ["{run}", "--grid", "1"], "--grid"),
    ("grid-negative", ["{run}", "--grid", "-3"], "--grid"),
    ("span-negative", ["{run}", "--span", "-1"], "--span"),
    ("span-malformed", ["{run}", "--span", "abc"], "--span"),
    ("span-two-numbers", ["{run}", "--span", "1,2"], "--span"),
    ("span-reversed", ["{run}", "--span", "1,0,0,1"], "--span"),
    ("span-infinite", ["{run}", "--span", "inf"], "--span"),
    ("span-infinite-box", ["{run}", "--span", "-inf,inf,0,1"], "--span"),
    ("unknown-plane", ["{run}", "--plane", "nonsense"], "unknown plane 'nonsense'"),
    ("checkpoints-plane-one", ["{run}", "--plane", "checkpoints"], "2 or 3 checkpoints"),
    ("checkpoints-plane-four", ["{run}/ckpt-000000", "{run}/ckpt-000002", "{run}/ckpt-000004", "{run}/ckpt-000006",
                                "--plane", "checkpoints"], "2 or 3 checkpoints"),
    ("checkpoints-plane-two-models", ["{run}", "{text}", "--plane", "checkpoints"], "architecture"),
    ("checkpoints-plane-same-point", ["{run}", "{run}", "--plane", "checkpoints"], "coincides"),
    ("unknown-domain", ["{run}", "--domains", "zz"], "'zz'"),
    ("no-domain", ["{run}", "--domains", ","], "names no domain"),
    ("pair-of-one", ["{run}", "--plane", "domains", "--pair", "a"], "two distinct domains"),
    ("pair-repeated", ["{run}", "--plane", "domains", "--pair", "a,a"], "two distinct domains"),
    ("domains-plane-zero-steps", ["{run}", "--plane", "domains", "--descent-steps", "0"], "--descent-steps"),
    ("level-malformed", ["{run}", "--level", "abc"], "level"),
    ("level-negative", ["{run}", "--level", "rel:-1"], "level"),
    ("level-nan", ["{run}", "--level", "nan"], "level"),
    ("unknown-norm", ["{run}", "--norm", "bogus"], "normalisation"),
    ("unknown-kind", ["{run}", "--kind", "bogus"], "--kind"),
    ("unknown-batch", ["{run}", "--batch", "bogus"], "batch mode"),
    ("seed-overflow", ["{run}", "--seed", HUGE], "seed"),
    ("from-missing", ["--from", "{base}/missing.npz"], "no result file"),
    ("from-not-npz", ["--from", "{base}/text.npz"], "not an .npz archive"),
    ("from-empty", ["--from", "{base}/empty.npz"], "not an .npz archive"),
    ("from-truncated", ["--from", "{base}/truncated.npz"], "corrupt or truncated"),
    ("from-foreign-npz", ["--from", "{base}/other.npz"], "not a landscape result"),
    ("from-and-checkpoint", ["{run}", "--from", "{base}/other.npz"], "not both"),
]
DEMO = [
    ("seeds-not-integers", ["--seeds", "a,b"], "--seeds"),
    ("seeds-repeated", ["--seeds", "1,1"], "distinct"),
    ("seeds-overflow", ["--seeds", f"0,{HUGE}"], "--seeds"),
    ("unknown-device", ["--device", "tpu"], "unknown device 'tpu'"),
]

CASES = ([("flatness",) + c for c in FLATNESS] + [("gradsim",) + c for c in GRADSIM]
         + [("closeness",) + c for c in CLOSENESS] + [("plot-surface",) + c for c in SURFACE]
         + [("demo",) + c for c in DEMO])


def _fill(args, paths: dict, out: Path) -> list[str]:
    return [a.format(out=out, **paths) for a in args]


@pytest.mark.parametrize("cmd,args,contains", [c[:1] + c[2:] for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_analyzer_input_is_one_line_exit_2(tmp_path, paths, cmd, args, contains):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if cmd in ("plot-surface", "demo") else []
    r = invoke_cli(cmd, *_fill(args, paths, out), *extra)
    assert_one_line_error(r.exit_code, r.stderr, contains=contains)
    assert r.stdout == ""
    assert not list(tmp_path.iterdir())  # refused before anything was written


@NO_CUDA
@pytest.mark.parametrize("cmd", ["flatness", "gradsim", "closeness", "plot-surface"])
def test_cuda_requested_without_cuda(tmp_path, paths, cmd):
    extra = ["--out", str(tmp_path / "out")] if cmd == "plot-surface" else []
    r = invoke_cli(cmd, paths["run"], "--device", "cuda", *extra)
    assert_one_line_error(r.exit_code, r.stderr, contains="CUDA")


@NO_CUDA
def test_demo_cuda_requested_without_cuda(tmp_path):
    r = invoke_cli("demo", "--device", "cuda", "--out", tmp_path / "out")
    assert_one_line_error(r.exit_code, r.stderr, contains="CUDA")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["plot-surface", "demo"])
def test_out_directory_that_is_a_file_or_below_one(tmp_path, paths, cmd):
    target = tmp_path / "taken"
    target.write_text("keep me\n")
    first = [paths["run"]] if cmd == "plot-surface" else ["--seeds", "0"]
    for out, contains in ((target, "is a file"), (target / "sub", "is a file, not a directory")):
        r = invoke_cli(cmd, *first, "--out", out)
        assert_one_line_error(r.exit_code, r.stderr, contains=contains)
    assert target.read_text() == "keep me\n"  # nothing lost


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("cmd,args", [("flatness", ["--json", "/proc/x.json"]), ("gradsim", ["--plot", "/proc/x.png"]),
                                      ("closeness", ["--json", "/proc/x.json"]), ("plot-surface", ["--out", "/proc/x"]),
                                      ("demo", ["--out", "/proc/x"])])
def test_unwritable_output_is_refused_up_front(paths, cmd, args):
    first = [] if cmd == "demo" else [paths["run"]]
    r = invoke_cli(cmd, *first, *args)
    assert_one_line_error(r.exit_code, r.stderr, contains="cannot write")


def test_valid_edge_values_still_work(tmp_path, paths):
    """The counterpart: values at the edges of what is allowed are accepted (negative seed, the minimum
    resamples, a zero level tolerance) and the surface they write re-renders with --from."""
    r = invoke_cli("gradsim", paths["run"], "--seed", "-1", "--resamples", "2", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "surf"
    r = invoke_cli("plot-surface", paths["run"], "--grid", "3", "--seed", "-1", "--level", "rel:0", "--out", out,
                   "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    r = invoke_cli("plot-surface", "--from", out / "surface.npz", "--level", "theta:0", "--out", tmp_path / "again")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("args,contains", [
    (["plot-surface", "--from", "{base}/empty.npz", "--out", "{out}"], "not an .npz archive"),  # was 'Aborted.'
    (["flatness", "{run}", "--plot", "{out}.bogus"], "unsupported file type"),  # was a matplotlib ValueError
], ids=["empty-npz", "plot-format"])
def test_errors_in_a_real_process_have_no_traceback(tmp_path, paths, args, contains):
    p = run_cli_process(*_fill(args, paths, tmp_path / "out"))
    assert_one_line_error(p.returncode, p.stderr, contains=contains)
    assert p.stdout == ""
