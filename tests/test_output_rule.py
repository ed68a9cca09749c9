"""Issue 18, cases 1-2: the output rule (no output over an input, a run's file, a non-regular file or another
output; writes atomic) and runs closed under symlinks (readers and `train --resume`). One named test per case."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest

import landscape
from nexus_opt import files
from nexus_opt.errors import UserError

from conftest import assert_one_line_error, copy_run, invoke_cli

GRADSIM = ["--device", "cpu", "--resamples", "2"]


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def run(bowls_run, tmp_path):
    return copy_run(bowls_run, tmp_path / "R")


def _refused(run: Path, *args, contains="would overwrite") -> str:
    before = _tree(run)
    r = invoke_cli(*args)
    line = assert_one_line_error(r.exit_code, r.stderr, contains=contains)
    assert _tree(run) == before  # nothing of the run was touched
    landscape.load(run, device="cpu")  # and it still loads (checksums pass)
    return line


# -- 1. outputs never destroy inputs -----------------------------------------------------------------
@pytest.mark.parametrize("option,name", [("--json", "ckpt-000002/model.safetensors"),
                                         ("--csv", "ckpt-000002/manifest.json"),
                                         ("--json", "ckpt-000000/state.safetensors"),
                                         ("--json", "latest.json"), ("--csv", "metrics.jsonl")])
def test_output_over_a_file_of_the_read_run_is_refused(run, option, name):
    _refused(run, "gradsim", run, *GRADSIM, option, run / name)


def test_output_inside_a_checkpoint_directory_is_refused(run):
    _refused(run, "gradsim", run, *GRADSIM, "--json", run / "ckpt-000002" / "new.json")


def test_output_symlink_to_the_weights_is_refused(run, tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(run / "ckpt-000002" / "model.safetensors")
    _refused(run, "gradsim", run, *GRADSIM, "--json", link)


def test_output_over_the_users_data_file_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    data = tmp_path / "d.safetensors"
    save_file({"x": torch.randn(8, 3), "y": torch.randn(8, 1)}, str(data))
    before = data.read_bytes()
    lin = torch.nn.Linear(3, 1)
    save_file(dict(lin.state_dict()), str(tmp_path / "m.safetensors"))
    r = invoke_cli("gradsim", tmp_path / "m.safetensors", "--factory", "torch.nn:Linear", "--factory-config",
                   '{"in_features": 3, "out_features": 1}', "--trust-remote-code", "--data", f"a={data}",
                   "--batch-size", "2", "--num-batches", "2", "--resamples", "0", "--json", data)
    assert_one_line_error(r.exit_code, r.stderr, contains="would overwrite")
    assert data.read_bytes() == before


def test_plot_surface_json_over_weights_is_refused(run):
    _refused(run, "plot-surface", run, "--device", "cpu", "--grid", "3", "--out", run.parent / "s",
             "--json", run / "ckpt-000002" / "model.safetensors")


def test_plot_surface_out_inside_a_checkpoint_is_refused(run):
    _refused(run, "plot-surface", run, "--device", "cpu", "--grid", "3", "--out", run / "ckpt-000002" / "s",
             contains="which this command reads")


def test_same_file_for_two_outputs_is_refused(run, tmp_path):
    line = _refused(run, "gradsim", run, *GRADSIM, "--json", tmp_path / "x", "--csv", tmp_path / "x",
                    contains="name the same file")
    assert not (tmp_path / "x").exists()


def test_same_file_through_a_symlink_is_refused(run, tmp_path):
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.json")
    _refused(run, "gradsim", run, *GRADSIM, "--json", tmp_path / "a.json", "--csv", tmp_path / "b.csv",
             contains="name the same file")


def test_two_outputs_on_stdout_are_refused(run):
    _refused(run, "gradsim", run, *GRADSIM, "--json", "-", "--csv", "-", contains="only one output can go to stdout")


def test_output_fifo_is_refused_before_the_analysis(run, tmp_path):
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=invoke_cli("gradsim", run, *GRADSIM, "--json", fifo)))
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the writer so the test process can end, then fail
        with open(fifo, "rb"):
            pass
        pytest.fail("--json FIFO blocked")
    assert_one_line_error(result["r"].exit_code, result["r"].stderr, contains="FIFO")


def test_output_device_is_refused(run):
    _refused(run, "gradsim", run, *GRADSIM, "--csv", "/dev/null", contains="a device")


def test_outputs_still_work_and_a_symlinked_output_replaces_its_target(run, tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    r = invoke_cli("gradsim", run, *GRADSIM, "--json", tmp_path / "link.json", "--csv", run / "g.csv")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "link.json").is_symlink() and target.read_text().startswith("{")
    assert (run / "g.csv").read_text().startswith("checkpoint,")  # a new file beside the run's is fine


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["out.json"]
    files.write_atomic(p, "new")
    assert p.read_text() == "new" and [q.name for q in tmp_path.iterdir()] == ["out.json"]


def test_write_time_check_covers_derived_files(run):
    """A file written by a library renderer (not a declared option) is checked too, against the registered reads."""
    with files.reading([run]):
        with pytest.raises(UserError, match="would overwrite"):
            files.write_atomic(run / "latest.json", "{}")
        with pytest.raises(UserError, match="would overwrite"):
            landscape.load(run, device="cpu")  # reading is fine ...
            files.write_atomic(run / "ckpt-000002" / "manifest.json", "{}")  # ... writing over it is not
    files.write_atomic(run.parent / "free.json", "{}")


# -- 2. runs closed under symlinks ---------------------------------------------------------------------
def _outside_ckpt(run: Path, tmp_path: Path, name="ckpt-000002") -> Path:
    outside = tmp_path / "outside"
    shutil.move(str(run / name), str(outside))
    (run / name).symlink_to(outside)
    return outside


def test_symlinked_latest_checkpoint_is_refused_by_readers(run, tmp_path):
    _outside_ckpt(run, tmp_path)
    for target in (run, run / "ckpt-000002"):
        with pytest.raises(UserError, match="symlink leading out of the run"):
            landscape.load(target, device="cpu")
        r = invoke_cli("gradsim", target, *GRADSIM)
        assert_one_line_error(r.exit_code, r.stderr, contains="leading out of the run")


def test_symlinked_checkpoint_not_named_in_latest_is_refused(run, tmp_path):
    _outside_ckpt(run, tmp_path, "ckpt-000000")
    r = invoke_cli("gradsim", run, *GRADSIM)
    assert_one_line_error(r.exit_code, r.stderr, contains="'ckpt-000000' is a symlink leading out")


def test_resume_refuses_a_symlinked_checkpoint(run, tmp_path):
    outside = _outside_ckpt(run, tmp_path)
    before = _tree(outside)
    r = invoke_cli("train", "--resume", "--out", run, "--device", "cpu", "--steps", "4")
    assert_one_line_error(r.exit_code, r.stderr, contains="leading out of the run")
    assert _tree(outside) == before and not (run / "ckpt-000004").exists()


def test_symlinked_checkpoint_file_is_refused(run, tmp_path):
    f = run / "ckpt-000002" / "model.safetensors"
    shutil.move(str(f), str(tmp_path / "w.safetensors"))
    f.symlink_to(tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="leading out of the checkpoint"):
        landscape.load(run, device="cpu")


@pytest.mark.parametrize("name", ["metrics.jsonl", "latest.json", ".lock"])
def test_resume_refuses_run_files_leading_out(run, tmp_path, name):
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's own file\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(mine)
    r = invoke_cli("train", "--resume", "--out", run, "--device", "cpu", "--steps", "4")
    assert_one_line_error(r.exit_code, r.stderr, contains=f"'{name}' is a symlink leading out of the run")
    assert mine.read_text() == "the user's own file\n"


def test_links_that_stay_inside_are_fine(run, tmp_path):
    (tmp_path / "alias").symlink_to(run / "ckpt-000002")  # a link *to* a checkpoint, from outside: its files are its own
    assert landscape.load(tmp_path / "alias", device="cpu").meta["step"] == 2
    (tmp_path / "runlink").symlink_to(run)
    assert landscape.load(tmp_path / "runlink", device="cpu").meta["step"] == 2


def test_check_outputs_is_one_call_for_new_commands(run, tmp_path):
    """The function a new writing command calls up front (reads given explicitly, no @source_options)."""
    with pytest.raises(UserError, match="would overwrite a file of"):
        files.check_outputs({"--json": run / "latest.json"}, reads=[run])
    with pytest.raises(UserError, match="name the same file"):
        files.check_outputs({"--json": tmp_path / "a", "--plot": tmp_path / "." / "a"})
    with pytest.raises(UserError, match="which this command reads"):
        files.check_outputs({}, reads=[run], dirs={"--out": run / "ckpt-000002" / "figs"})
    files.check_outputs({"--json": tmp_path / "a.json", "--csv": "-", "--plot": None}, reads=[run],
                        dirs={"--out": run / "figs"})  # beside the run's files is fine
