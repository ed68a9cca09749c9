"""Every failure listed in issue 14 (hostile input and shared run directories), one named test each."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import landscape
from nexus_opt import checkpoint as ck
from nexus_opt.errors import UserError

from conftest import ROOT, TINY_MIX, assert_one_line_error, copy_run, invoke_cli, read_metrics, run_cli_process, \
    tiny_config

FINAL = ck.checkpoint_name(TINY_MIX["steps"])
BOWLS = dict(suite="bowls", steps=2, batch_size=2, accum=1, warmup=1, eval_every=1, ckpt_every=1, seed=0, device="cpu")


@pytest.fixture(scope="module")
def bowls_run(tmp_path_factory):
    """A 2-step run of the 2-D bowls (checkpoints 0, 1, 2): analyzers and resumes on it take a blink."""
    from nexus_opt.train import train

    out = tmp_path_factory.mktemp("regress_bowls") / "run"
    train(tiny_config(BOWLS, out))
    return out


def _forge(ckpt: Path, edit=None, weights=None) -> None:
    """Edit a checkpoint's manifest (and optionally its weights), recomputing every digest so it reaches the parser."""
    m = json.loads((ckpt / "manifest.json").read_text())
    if weights is not None:
        t = load_file(str(ckpt / "model.safetensors"))
        weights(t)
        save_file(t, str(ckpt / "model.safetensors"))
        m["files"]["model.safetensors"] = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    if edit is not None:
        edit(m)
    m["manifest_sha256"] = ck._manifest_digest(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _one_line(*args, contains=None, max_s: float = 20.0) -> str:
    t0 = time.time()
    r = invoke_cli(*args)
    assert time.time() - t0 < max_s
    return assert_one_line_error(r.exit_code, r.stderr, contains=contains)


def _clean(fn, contains=None) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg
    if contains:
        assert contains in msg, msg
    return msg


# -- 1. one writer per run directory ---------------------------------------------------------------
def test_two_writers_one_run_dir_second_fails_with_holder_pid(tmp_path):
    """While a trainer holds the run directory, a second trainer process fails at once naming the holder's pid;
    the holder's checkpoints and metrics are its own, complete, with no duplicated records."""
    from nexus_opt.train import train

    out = tmp_path / "R1"
    second = {}

    def progress(ev):
        if ev["event"] == "step" and ev["step"] == 1 and not second:
            assert (out / ck.LOCK_NAME).read_text().strip() == str(os.getpid())
            t0 = time.time()
            second["p"] = run_cli_process("train", "--suite", "mix", "--steps", "4", "--seed", "1", "--device", "cpu",
                                          "--out", out)
            second["s"] = time.time() - t0

    res = train(tiny_config(TINY_MIX, out, steps=4), progress=progress)
    p = second["p"]
    assert_one_line_error(p.returncode, p.stderr, contains=f"pid {os.getpid()}")
    for c in ck.list_checkpoints(out):  # every checkpoint is the first run's
        assert json.loads((c / "manifest.json").read_text())["trainer"]["config"]["seed"] == 0
    recs = read_metrics(out)
    keys = [(r["kind"], r["step"]) for r in recs]
    assert len(keys) == len(set(keys))
    assert {s for k, s in keys if k == "train"} == {1, 2, 3, 4}
    assert res["checkpoint"].endswith("ckpt-000004")


def test_second_writer_in_the_same_process_is_refused(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    with ck.RunLock(run):
        _clean(lambda: __import__("nexus_opt.train", fromlist=["resume"]).resume(run, device="cpu"),
               contains="being written")
    assert not (run / ck.LOCK_NAME).read_text().strip()  # released: no pid left behind


def test_stale_temporaries_of_dead_writers_are_cleaned_by_the_next_writer(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    dead = 2 ** 22 + 12345
    shutil.copytree(run / FINAL, run / f".ckpt-000008.tmp-{dead}")
    shutil.copytree(run / "ckpt-000002", run / f".ckpt-000002.old-{dead}")            # its checkpoint exists: removed
    shutil.move(run / "ckpt-000004", run / f".ckpt-000004.old-{dead}")                # killed mid-replace: put back
    (run / f".latest.json.tmp-{dead}").write_text("{")
    landscape.load(run)  # readers never clean (nor lock)
    assert (run / f".ckpt-000008.tmp-{dead}").exists()
    r = invoke_cli("train", "--resume", "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith(".ckpt-") or n.startswith(".latest")], names
    assert (run / "ckpt-000004" / "manifest.json").is_file()
    assert ck.read_checkpoint(run / "ckpt-000004").step == 4


# -- 2. bounded work -------------------------------------------------------------------------------
def test_mlp_depth_1e6_manifest_refused_fast(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _forge(run / FINAL, lambda m: m["model"]["config"].update(depth=1_000_000))
    t0 = time.time()
    _clean(lambda: landscape.load(run), contains="allow-large")
    _one_line("flatness", run, "--device", "cpu", contains="layers")
    assert time.time() - t0 < 20


def test_gpt_n_layer_1e6_refused_fast():
    from nexus_opt.models import model_from_spec

    t0 = time.time()
    _clean(lambda: model_from_spec({"name": "gpt", "config": {"n_layer": 1_000_000}}), contains="--allow-large")
    assert time.time() - t0 < 2


def test_suite_eval_batches_1e9_refused():
    from nexus_opt.suites import make_suite

    _clean(lambda: make_suite("text", options={"eval_batches": 1e9}), contains="eval_batches")


@pytest.mark.parametrize("field", ["eval_batch_size", "in_dim"])
def test_huge_manifest_sizes_are_one_line(tmp_path, tiny_mix_run, field):
    """eval_batch_size: 1e9 and in_dim: 1e8 ended in an allocator traceback."""
    run = copy_run(tiny_mix_run, tmp_path / "run")

    def edit(m):
        m["suite"]["options"][field] = 1e9 if field == "eval_batch_size" else 1e8
        if field == "in_dim":
            m["model"]["config"]["in_dim"] = 10 ** 8
    _forge(run / FINAL, edit)
    _one_line("flatness", run, "--device", "cpu", contains=field)


def test_memory_estimate_refuses_with_the_estimate_and_the_override(monkeypatch):
    from nexus_opt.models import model_from_spec

    monkeypatch.setenv("LANDSCAPE_MEMORY_BUDGET", "1M")
    msg = _clean(lambda: model_from_spec({"name": "mlp", "config": {"in_dim": 1000, "hidden": 1000}}),
                 contains="needs about")
    assert "--allow-large" in msg and "1.0 MB" in msg
    assert model_from_spec({"name": "mlp", "config": {"in_dim": 1000, "hidden": 1000}}, allow_large=True)
    monkeypatch.setenv("LANDSCAPE_ALLOW_LARGE", "1")
    assert model_from_spec({"name": "mlp", "config": {"in_dim": 1000, "hidden": 1000}})


def test_train_model_config_depth_1e6_refused_fast(tmp_path):
    t0 = time.time()
    _one_line("train", "--suite", "mix", "--model-config", "depth=1000000", "--device", "cpu", "--out", tmp_path / "r",
              contains="--allow-large")
    assert time.time() - t0 < 10 and not list((tmp_path / "r").glob("ckpt-*")) if (tmp_path / "r").exists() else True


def test_density_steps_capped_at_parameter_count(bowls_run):
    _one_line("flatness", bowls_run, "--density", "--density-steps", "1000000000", "--device", "cpu",
              contains="--density-steps")
    r = invoke_cli("flatness", bowls_run, "--density", "--density-steps", "50", "--device", "cpu", "--no-trace", "-k", "1")
    assert r.exit_code == 0, r.stderr
    assert "--density-steps 50 capped at the model's 2 parameters" in " ".join(r.stderr.split())


def test_gradsim_resamples_1e9_refused(bowls_run):
    _one_line("gradsim", bowls_run, "--resamples", "1000000000", contains="--resamples")


def test_plot_surface_grid_100000_refused(bowls_run, tmp_path):
    _one_line("plot-surface", bowls_run, "--grid", "100000", "--out", tmp_path / "s", contains="--grid")


@pytest.mark.parametrize("kind", ["torch-oom", "cpu-allocator", "numpy", "numpy-too-big", "memoryerror"])
def test_allocation_failure_is_one_line(bowls_run, monkeypatch, kind):
    def boom(*a, **k):
        if kind == "torch-oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        if kind == "cpu-allocator":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] . DefaultCPUAllocator: not enough memory")
        if kind == "numpy":
            return np.ones((10 ** 6, 10 ** 6))  # 8 TB: numpy's _ArrayMemoryError
        if kind == "numpy-too-big":
            return np.ones((10 ** 10, 10 ** 10))  # ValueError: array is too big
        raise MemoryError()

    monkeypatch.setattr(landscape, "load", boom)
    _one_line("gradsim", bowls_run, contains="out of memory")


def test_recursion_error_from_a_nested_manifest_is_one_line(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    raw = (run / FINAL / "manifest.json").read_text()
    (run / FINAL / "manifest.json").write_text(raw[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _one_line("flatness", run / FINAL, "--device", "cpu")
    run2 = copy_run(tiny_mix_run, tmp_path / "run2")
    deep: object = 0
    for _ in range(200):
        deep = {"a": deep}
    _forge(run2 / FINAL, lambda m: m["trainer"].update(extra=deep))
    _one_line("flatness", run2 / FINAL, "--device", "cpu", contains="nested")


# -- 3. finite or refused --------------------------------------------------------------------------
def _nan_weights(t):
    for k in t:
        t[k] = torch.full_like(t[k], float("nan"))


def test_nan_weights_refused_at_load_naming_the_tensor(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _forge(run / FINAL, weights=_nan_weights)
    msg = _clean(lambda: landscape.load(run), contains="non-finite")
    assert "net.0.weight" in msg or "net." in msg
    t0 = time.time()
    _one_line("flatness", run, "--device", "cpu", contains="non-finite")
    assert time.time() - t0 < 10  # refused at load, not after 38 s of Lanczos on NaN


def test_plot_surface_nan_weights_one_line(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _forge(run / FINAL, weights=_nan_weights)
    _one_line("plot-surface", run, "--grid", "3", "--out", tmp_path / "s", contains="non-finite")


def _surface_npz(bowls_run, path: Path):
    from landscape.surface import surface

    obj = landscape.load(bowls_run)
    return surface(obj, grid=5, out=path)


def test_from_nan_npz_one_line(bowls_run, tmp_path):
    r = _surface_npz(bowls_run, tmp_path / "a.npz")
    r.losses = {d: np.full_like(np.asarray(z), np.nan) for d, z in r.losses.items()}
    r.save(tmp_path / "nan.npz")
    _one_line("plot-surface", "--from", tmp_path / "nan.npz", "--out", tmp_path / "o", contains="no finite loss")


def test_from_mismatched_npz_one_line(bowls_run, tmp_path):
    r = _surface_npz(bowls_run, tmp_path / "a.npz")
    d = next(iter(r.losses))
    r.losses[d] = np.zeros((2, 3))
    r.save(tmp_path / "bad.npz")
    _one_line("plot-surface", "--from", tmp_path / "bad.npz", "--out", tmp_path / "o", contains="shape")


def test_surface_with_a_few_nonfinite_cells_is_drawn_masked_and_counted(bowls_run, tmp_path):
    r = _surface_npz(bowls_run, tmp_path / "a.npz")
    d = next(iter(r.losses))
    z = np.array(r.losses[d], dtype=float)
    z[0, 0], z[-1, -1] = np.inf, np.nan  # a diverging corner
    r.losses[d] = z
    r.save(tmp_path / "corner.npz")
    res = invoke_cli("plot-surface", "--from", tmp_path / "corner.npz", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    assert "2 non-finite grid cell(s) drawn masked" in " ".join(res.stderr.split())
    assert (tmp_path / "o" / "corner.png").is_file() and (tmp_path / "o" / "corner_overlay.svg").is_file()


@pytest.mark.parametrize("args,contains", [
    (["--lr", "nan"], "--lr"), (["--eps", "nan"], "--eps"), (["--eps", "-1"], "--eps"),
    (["--weights", "bowl0=1e309"], "weight"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio"),
], ids=["lr-nan", "eps-nan", "eps-minus1", "weights-1e309", "wd-inf", "minlr-nan"])
def test_nonfinite_option_values_refused_at_parse(tmp_path, args, contains):
    _one_line("train", "--suite", "bowls", "--device", "cpu", "--out", tmp_path / "r", *args, contains=contains)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("ckpt-*"))


# -- 4. a resume that means it ---------------------------------------------------------------------
def test_resume_steps_200_is_not_ignored(tmp_path, bowls_run):
    run = copy_run(bowls_run, tmp_path / "run")
    r = invoke_cli("train", "--resume", "--steps", "200", "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert ck.read_checkpoint(run).step == 200


def test_resume_shorter_steps_refused_with_saved_value(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _one_line("train", "--resume", "--steps", "3", "--out", run, contains="steps=6")


def test_resume_lr_and_optimizer_contradicting_the_run_refused(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    msg = _one_line("train", "--resume", "--lr", "5", "--optimizer", "nexus", "--out", run)
    assert "0.003" in msg or "'adamw'" in msg
    _one_line("train", "--resume", "--seed", "3", "--out", run, contains="seed=0")
    _one_line("train", "--resume", "--suite-options", "noise=0.5", "--out", run, contains="suite_options")
    assert sorted(p.name for p in run.iterdir()) == before
    r = invoke_cli("train", "--resume", "--lr", "0.003", "--out", run, "--device", "cpu")  # agreeing: fine
    assert r.exit_code == 0, r.stderr


def test_resume_out_checkpoint_dir_resumes_its_run_or_refuses(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    r = invoke_cli("train", "--resume", "--out", run / FINAL, "--steps", "8", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert ck.read_checkpoint(run).step == 8 and not list((run / FINAL).glob("ckpt-*"))
    _one_line("train", "--resume", "--out", run / "ckpt-000002", contains="ckpt-000008")
    _one_line("train", "--out", run / FINAL, contains="checkpoint directory")


@pytest.mark.parametrize("name", ["..", "../run", "/etc", "ckpt-000006/..", ".", "ckpt-000006/", "sub/ckpt-000006"])
def test_latest_json_dotdot_refused(tmp_path, tiny_mix_run, name):
    """latest.json may only name a checkpoint directly inside its run directory."""
    parent = copy_run(tiny_mix_run, tmp_path / "outer")
    shutil.copytree(parent / FINAL, tmp_path / "outer" / "manifest-holder")
    inner = tmp_path / "outer" / FINAL / "run"  # a run directory inside a checkpoint directory
    inner.mkdir()
    (inner / "latest.json").write_text(json.dumps({"checkpoint": name, "step": 6}))
    assert ck.valid_checkpoint_name(name) is False
    _clean(lambda: landscape.load(inner), contains="no checkpoint found")
    run = copy_run(tiny_mix_run, tmp_path / "run")
    (run / "latest.json").write_text(json.dumps({"checkpoint": name, "step": 6}))
    assert Path(landscape.load(run).meta["path"]).parent == run


# -- 5. one line, always ---------------------------------------------------------------------------
def test_aliases_int_is_one_line(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _forge(run / FINAL, lambda m: m.update(aliases=[1]))
    _clean(lambda: landscape.load(run), contains="aliases")
    _one_line("flatness", run, contains="aliases")


@pytest.mark.parametrize("option,value", [("n_domains", 0), ("n_domains", -1), ("width", -1), ("noise", "nan"),
                                          ("eval_batches", 0)])
def test_suite_options_bad_values_one_line(tmp_path, tiny_mix_run, option, value):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _forge(run / FINAL, lambda m: m["suite"]["options"].update({option: float(value) if value == "nan" else value}))
    _one_line("flatness", run, contains=option)
    _one_line("train", "--suite", "mix", "--suite-options", f"{option}={value}", "--device", "cpu",
              "--out", tmp_path / "new", contains=option)


def test_eval_batches_zero_refused(tmp_path):
    """--suite-options eval_batches=0 trained and reported loss 0.0000 for every domain."""
    _one_line("train", "--suite", "mix", "--suite-options", "eval_batches=0", "--out", tmp_path / "r",
              contains="eval_batches")


def test_deeply_nested_manifest_is_one_line(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    raw = (run / FINAL / "manifest.json").read_text()
    (run / FINAL / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    _clean(lambda: landscape.load(run / FINAL), contains="corrupt")
    (run / FINAL / "manifest.json").write_text(raw)


@pytest.mark.parametrize("case", ["lr-abc", "rng-list", "rng-missing", "base-lrs-str", "config-steps-missing"])
def test_trainer_state_malformed_is_one_line(tmp_path, tiny_mix_run, case):
    run = copy_run(tiny_mix_run, tmp_path / "run")

    def edit(m):
        if case == "lr-abc":
            m["trainer"]["config"]["lr"] = "abc"
        elif case == "rng-list":
            m["state"]["rng"] = [1, 2, 3]
        elif case == "rng-missing":
            del m["state"]["rng"]
        elif case == "base-lrs-str":
            m["state"]["base_lrs"] = "x"
        else:
            del m["trainer"]["config"]["steps"]
    _forge(run / FINAL, edit)
    _one_line("train", "--resume", "--out", run, "--device", "cpu")


@pytest.mark.parametrize("args,contains", [
    (["--lr", "1e308"], "--lr"), (["--inner-lr", "1e300", "--optimizer", "nexus"], "--inner-lr"),
    (["--eps", "-1"], "--eps"), (["--eps", "nan"], "--eps"), (["--weights", "bowl0=1e309"], "weight"),
    (["--suite-options", "n_domains=-1"], "n_domains"), (["--suite-options", "noise=nan"], "noise"),
    (["--device", "meta"], "meta"),
], ids=["lr-1e308", "inner-lr-1e300", "eps-minus1", "eps-nan", "weights-1e309", "n-domains-minus1", "noise-nan",
        "device-meta"])
def test_train_option_refused_one_line(tmp_path, args, contains):
    _one_line("train", "--suite", "bowls", "--out", tmp_path / "r", *args, contains=contains)


def test_lr_1e308_refused(tmp_path):
    _one_line("train", "--suite", "bowls", "--lr", "1e308", "--out", tmp_path / "r", contains="--lr")


def test_device_meta_refused(tmp_path, bowls_run):
    _one_line("train", "--suite", "bowls", "--device", "meta", "--out", tmp_path / "r", contains="meta")
    _one_line("flatness", bowls_run, "--device", "meta", contains="meta")


def test_model_gpt_suite_mix_is_one_line(tmp_path):
    _one_line("train", "--model", "gpt", "--suite", "mix", "--out", tmp_path / "r", contains="mlp")


def test_model_that_cannot_read_the_suite_data_is_one_line(tmp_path):
    _one_line("train", "--suite", "mix", "--model-config", "in_dim=3", "--device", "cpu", "--out", tmp_path / "r",
              contains="does not fit")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_json_dev_full_one_line(bowls_run):
    _one_line("gradsim", bowls_run, "--resamples", "0", "--json", "/dev/full", contains="/dev/full")


def test_closeness_seed_1e3_one_line(bowls_run):
    line = _one_line("closeness", bowls_run, "--seed", "1e3", contains="--seed")
    assert "╭" not in line


@pytest.mark.parametrize("args", [["closeness"], ["flatness", "x", "--nope"], ["nosuch"], ["train", "--steps"]],
                         ids=["missing-arg", "unknown-option", "unknown-command", "option-without-value"])
def test_usage_errors_are_one_line(args):
    r = invoke_cli(*args)
    assert_one_line_error(r.exit_code, r.stderr)


def test_a_real_bug_is_one_line_and_shows_its_traceback_under_debug(bowls_run, monkeypatch):
    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(landscape, "load", bug)
    r = invoke_cli("gradsim", bowls_run)
    assert r.exit_code == 1 and "internal error" in r.stderr and "--debug" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = invoke_cli("--debug", "gradsim", bowls_run)
    assert isinstance(r.exception, ZeroDivisionError)


def test_weight_mismatch_names_the_keys(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    _forge(run / FINAL, lambda m: m["model"]["config"].update(hidden=16))
    _clean(lambda: landscape.load(run), contains="net.0.weight")


# -- the CLI starts fast ---------------------------------------------------------------------------
def test_importing_the_cli_does_not_import_torch():
    code = "import sys, cli.main; assert 'torch' not in sys.modules, 'torch imported'"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_help_is_fast():
    """`landscape --help` in a fresh process costs under a second (CPU time: wall time on two shared cores
    measures the neighbours); torch is never imported for it."""
    best = min(_timed_help() for _ in range(3))
    assert best < 1.0, f"landscape --help took {best:.2f}s of CPU"


def _timed_help() -> float:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = run_cli_process("--help", timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert p.returncode == 0 and "flatness" in p.stdout
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_version():
    from nexus_opt import __version__

    r = invoke_cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"landscape {__version__}"
