"""Bad input to `landscape train`: one line `error: ...` on stderr, exit status 2, no traceback, no side effects."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error, copy_run, invoke_cli, run_cli_process

TINY = ["--suite", "mix", "--max-steps", "2", "--batch-size", "4", "--accum", "1", "--device", "cpu"]


def _without(args, *flags):
    """TINY minus the given flags (and their values), so a test can set them itself."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


BAD = [
    ("unknown-suite", ["--suite", "imagenet"], "unknown suite 'imagenet'"),
    ("unknown-model", ["--model", "resnet"], "unknown model 'resnet'"),
    ("unknown-optimizer", ["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
    ("negative-steps", ["--max-steps", "-5"], "--max-steps"),
    ("zero-steps", ["--max-steps", "0"], "--max-steps"),
    ("zero-batch", ["--batch-size", "0"], "--batch-size"),
    ("negative-lr", ["--lr", "-1"], "--lr"),
    ("nan-lr", ["--lr", "nan"], "--lr"),
    ("unknown-device", ["--device", "tpu"], "device"),
    ("ood-weight", ["--weights", "ood=1"], "ood"),
    ("unknown-domain-weight", ["--weights", "z=1"], "'z'"),
    ("bad-suite-option", ["--suite-options", "bogus=1"], "suite 'mix'"),
    ("bad-suite-option-value", ["--suite-options", "n_domains=abc"], "suite 'mix'"),
    ("not-key-value", ["--suite-options", "dim"], "key=value"),
    ("bad-model-config", ["--model-config", "hidden=-4"], "model 'mlp'"),
    ("unknown-model-config", ["--model-config", "wings=2"], "model 'mlp'"),
    ("bad-factory", ["--model-factory", "nocolon", "--trust-remote-code"], "module:function"),
    ("missing-factory", ["--model-factory", "no_such_mod_xyz:f", "--trust-remote-code"], "no_such_mod_xyz"),
]


@pytest.mark.parametrize("args,contains", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_training_input_is_one_line_exit_2(tmp_path, args, contains):
    out = tmp_path / "run"
    flags = [a for a in args if a.startswith("--")]
    r = invoke_cli("train", "--out", out, *_without(TINY, *flags), *args)
    assert_one_line_error(r.exit_code, r.stderr, contains=contains)
    assert r.stdout == ""
    assert not out.exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    r = invoke_cli("train", "--out", tmp_path / "run", *_without(TINY, "--device"), "--device", "cuda")
    assert_one_line_error(r.exit_code, r.stderr, contains="CUDA")


def test_missing_checkpoint_path(tmp_path):
    r = invoke_cli("train", "--resume", "--out", tmp_path / "nowhere")
    assert_one_line_error(r.exit_code, r.stderr, contains="nowhere")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    r = invoke_cli("train", "--resume", "--out", tmp_path / "empty")
    assert_one_line_error(r.exit_code, r.stderr, contains="no checkpoint")
    (tmp_path / "file.txt").write_text("x")
    r = invoke_cli("train", "--resume", "--out", tmp_path / "file.txt")
    assert_one_line_error(r.exit_code, r.stderr)


def test_existing_run_dir_without_resume(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = invoke_cli("train", "--out", run, *TINY)
    assert_one_line_error(r.exit_code, r.stderr, contains="--resume")
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # the run is untouched


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    p = run_cli_process("train", "--out", tmp_path / "run", *_without(TINY, "--suite"), "--suite", "nope")
    assert_one_line_error(p.returncode, p.stderr, contains="unknown suite 'nope'")
    assert p.stdout == ""


def test_help():
    r = invoke_cli("--help")
    assert r.exit_code == 0 and "train" in r.stdout
    r = invoke_cli("train", "--help")
    assert r.exit_code == 0
    for opt in ("--resume", "--suite", "--optimizer", "--model-factory", "--trust-remote-code", "--device"):
        assert opt in r.stdout, opt
    assert r.stderr == ""


def test_a_good_run_succeeds_and_resume_extends_it(tmp_path):
    """The counterpart of the error tests: the same tiny arguments train fine, exit 0."""
    out = tmp_path / "run"
    r = invoke_cli("train", "--out", out, *TINY)
    assert r.exit_code == 0, r.stderr
    assert "error" not in r.stderr and (out / "ckpt-000002" / "manifest.json").is_file()
    r = invoke_cli("train", "--resume", "--out", out, "--max-steps", "3")
    assert r.exit_code == 0, r.stderr
    assert (out / "ckpt-000003" / "manifest.json").is_file()
