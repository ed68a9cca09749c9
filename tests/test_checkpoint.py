"""Checkpoints: bit-exact resume in a new process, crash-safe saving, and clean errors for any corruption."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import landscape
from nexus_opt import checkpoint as ck
from nexus_opt.errors import UserError
from nexus_opt.train import resume, train

from conftest import (ROOT, TINY_MIX, TINY_TEXT, assert_one_line_error, copy_run, invoke_cli, read_metrics,
                      run_cli_process, tiny_config)


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same names and bit-identical tensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def assert_same_run(a: Path, b: Path, step: int) -> None:
    """Same final weights and optimizer state (bit for bit) and the same metrics records."""
    name = ck.checkpoint_name(step)
    assert_same_tensors(a / name / "model.safetensors", b / name / "model.safetensors")
    assert_same_tensors(a / name / "state.safetensors", b / name / "state.safetensors")
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r for r in ra if r["kind"] == "eval"] == [r for r in rb if r["kind"] == "eval"]
    assert ra == rb
    assert json.loads((b / "latest.json").read_text()) == {"checkpoint": name, "step": step}


class _Stop(Exception):
    pass


# -- resume determinism ----------------------------------------------------------------------------
def _interrupted_run(base: dict, out: Path, stop_after: int, **overrides) -> Path:
    """The run of `base`, stopped (as if killed) right after optimizer step `stop_after` was logged."""
    def stop(ev):
        if ev["event"] == "step" and ev["step"] == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        train(tiny_config(base, out, **overrides), progress=stop)
    assert max(r["step"] for r in read_metrics(out)) == stop_after  # metrics run past the checkpoint
    assert not (out / ck.checkpoint_name(base["steps"])).exists()
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "nexus"])
def test_resume_in_a_new_process_is_bit_identical(tmp_path, tiny_mix_run, optimizer):
    steps = TINY_MIX["steps"]
    if optimizer == "nexus":
        pytest.importorskip("nexus_opt.nexus")
        full = tmp_path / "full"
        train(tiny_config(TINY_MIX, full, optimizer="nexus"))
    else:
        full = tiny_mix_run.path
    part = _interrupted_run(TINY_MIX, tmp_path / "part", 3, optimizer=optimizer)
    assert ck.read_checkpoint(part).step == 2
    p = run_cli_process("train", "--resume", "--out", part)
    assert p.returncode == 0, p.stderr
    assert_same_run(full, part, steps)
    if optimizer == "nexus":  # not the same trajectory as AdamW: the comparison above is not vacuous
        a = load_file(str(full / ck.checkpoint_name(steps) / "model.safetensors"))
        b = load_file(str(tiny_mix_run.path / ck.checkpoint_name(steps) / "model.safetensors"))
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_tied_weight_gpt_is_bit_identical(tmp_path, tiny_text_run):
    part = _interrupted_run(TINY_TEXT, tmp_path / "part", 3)
    manifest = ck.read_checkpoint(part).manifest
    assert manifest["aliases"] == {"head.weight": "wte.weight"}  # the tied head is stored once
    resume(part, device="cpu")
    assert_same_run(tiny_text_run.path, part, TINY_TEXT["steps"])


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_mix_run):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    res = resume(run, device="cpu")
    assert res["losses"] == tiny_mix_run.result["losses"]
    assert_same_run(tiny_mix_run.path, run, TINY_MIX["steps"])  # no eval record logged twice


# -- a crash while saving ----------------------------------------------------------------------------
_CRASH = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from nexus_opt import checkpoint as ck
    from nexus_opt.train import TrainConfig, resume, train

    cfg, point, target = json.loads(sys.argv[1]), sys.argv[2], ck.checkpoint_name(int(sys.argv[3]))
    write_json = ck.write_json_atomic

    def crashing_write_json(path, data):
        path = Path(path)
        if point == "manifest" and path.name == "manifest.json" and target in path.parent.name:
            # weights and state are written; die with the manifest half-way onto the disk
            assert (path.parent / "model.safetensors").is_file() and (path.parent / "state.safetensors").is_file()
            path.write_text(json.dumps(data)[:200])
            os._exit(1)
        if point == "latest" and path.name == "latest.json" and data["checkpoint"] == target:
            os._exit(1)  # the checkpoint directory is renamed into place, latest.json not yet updated
        return write_json(path, data)

    ck.write_json_atomic = crashing_write_json
    if sys.argv[4] == "resume":
        resume(cfg["out"], device="cpu")
    else:
        train(TrainConfig(**cfg))
    sys.exit(0)  # not reached when the crash fired
""")


def _crash(cfg: dict, point: str, step: int, mode: str) -> None:
    p = subprocess.run([sys.executable, "-c", _CRASH, json.dumps(cfg), point, str(step), mode], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr  # the process died inside save_checkpoint


def test_crash_while_saving_then_resume_is_bit_identical(tmp_path, tiny_mix_run):
    out = tmp_path / "run"
    cfg = {**TINY_MIX, "out": str(out)}
    # 1. a process dies while writing ckpt-000004: weights written, manifest half-written, never renamed
    _crash(cfg, "manifest", 4, "train")
    leftovers = [c for c in out.iterdir() if c.name.startswith(".ckpt-000004.tmp")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    assert not (out / "ckpt-000004").exists()
    assert json.loads((out / "latest.json").read_text())["checkpoint"] == "ckpt-000002"
    assert ck.read_checkpoint(out).step == 2 and landscape.load(out).meta["step"] == 2
    assert [c.name for c in ck.list_checkpoints(out)] == ["ckpt-000000", "ckpt-000002"]
    # 2. a new process resumes and dies after renaming ckpt-000006 into place, before updating latest.json
    _crash(cfg, "latest", 6, "resume")
    assert ck.read_checkpoint(out / "ckpt-000006").step == 6
    assert json.loads((out / "latest.json").read_text())["checkpoint"] == "ckpt-000004"
    assert landscape.load(out).meta["step"] == 4
    # 3. resume again: from ckpt-000004, rewriting ckpt-000006; the crashes left no trace in the result
    resume(out, device="cpu")
    assert_same_run(tiny_mix_run.path, out, TINY_MIX["steps"])
    assert ck.read_checkpoint(out).step == TINY_MIX["steps"]
    assert not [c for c in out.iterdir() if ".old-" in c.name]


# -- corruption: always a clean error (or an older complete checkpoint) -----------------------------
FILES = ("model.safetensors", "state.safetensors", "manifest.json")


def _flip(path: Path, rng: random.Random, n: int) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def _truncate(path: Path, rng: random.Random) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(len(data))])


def _edit_manifest(rehash: bool, edit):
    """Change a manifest value (valid JSON); with rehash the manifest's own digest is recomputed to match."""

    def mutate(ckpt: Path, rng):
        m = json.loads((ckpt / "manifest.json").read_text())
        edit(m)
        if rehash:
            m["manifest_sha256"] = ck._manifest_digest(m)
        (ckpt / "manifest.json").write_text(json.dumps(m))

    return mutate


def _set(*keys_then_value):
    keys, value = keys_then_value[:-1], keys_then_value[-1]

    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _delete(*keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


def _swap(name, source: Path):
    """Replace a file by the same file of another checkpoint of the run (valid safetensors, wrong content)."""
    def mutate(ckpt: Path, rng):
        shutil.copyfile(source / name, ckpt / name)
    return mutate


def _write(name, content: bytes):
    def mutate(ckpt: Path, rng):
        (ckpt / name).write_bytes(content)
    return mutate


def _cases():
    """(id, mutate(final_ckpt_dir, rng)) for the last checkpoint of a run."""
    cases = []
    for f in FILES:
        for k in range(6):
            cases.append((f"flip{k}-{f}", lambda c, r, f=f, k=k: _flip(c / f, r, 1 + 3 * k)))
        for k in range(4):
            cases.append((f"truncate{k}-{f}", lambda c, r, f=f: _truncate(c / f, r)))
        cases.append((f"delete-{f}", lambda c, r, f=f: (c / f).unlink()))
        cases.append((f"empty-{f}", _write(f, b"")))
    for f in FILES[:2]:
        cases.append((f"swap-{f}", None))  # filled in by the test: needs the run's other checkpoint
    cases += [
        ("manifest-garbage", lambda c, r: (c / "manifest.json").write_bytes(r.randbytes(300))),
        ("manifest-null", _write("manifest.json", b"null")),
        ("manifest-list", _write("manifest.json", b"[1, 2]")),
        ("manifest-empty-object", _write("manifest.json", b"{}")),
        ("manifest-dir", lambda c, r: ((c / "manifest.json").unlink(), (c / "manifest.json").mkdir())),
        ("manifest-latin1", _write("manifest.json", "{\"format\": \"\xe9\"}".encode("latin-1"))),
    ]
    edits = [
        ("step", _set("step", 999)), ("step-str", _set("step", "abc")), ("format", _set("format", "other")),
        ("version", _set("format_version", 2)), ("file-hash", _set("files", "model.safetensors", "0" * 64)),
        ("files-missing", _delete("files", "state.safetensors")), ("files-list", _set("files", [])),
        ("model-config", _set("model", "config", "hidden", 33)), ("model-name", _set("model", "name", "gpt")),
        ("model-unknown", _set("model", "name", "nope")), ("model-not-dict", _set("model", [1])),
        ("suite-unknown", _set("suite", "name", "nope")), ("suite-missing", _delete("suite")),
        ("suite-options", _set("suite", "options", {"bogus": 1})),
        ("suite-weights", _set("suite", "weights", {"ood": 1.0})),
        ("alias", _set("aliases", {"extra.weight": "missing.weight"})),
        ("model-config-neg", _set("model", "config", "hidden", -3)),
        ("model-config-str", _set("model", "config", "depth", "two")),
        ("suite-seed-str", _set("suite", "seed", "x")),
        ("state-missing-tensor", _set("state", "base_lrs", {"__tensor__": "s.nothing"})),
        ("trainer-missing", _delete("trainer")), ("trainer-config-bad", _set("trainer", "config", "steps", "x")),
        ("trainer-config-unknown", _set("trainer", "config", "bogus", 1)),
    ]
    for rehash in (False, True):
        for name, edit in edits:
            cases.append((f"edit{'-rehashed' if rehash else ''}-{name}", _edit_manifest(rehash, edit)))
    return cases


CASES = _cases()
# Forged manifests (edited, digest recomputed) whose model, suite and weights still agree: load may succeed.
LOADABLE_FORGERIES = {"edit-rehashed-step", "edit-rehashed-state-missing-tensor", "edit-rehashed-trainer-missing",
                      "edit-rehashed-trainer-config-bad", "edit-rehashed-trainer-config-unknown"}


def _single_checkpoint_run(tiny_mix_run, dest: Path) -> Path:
    """A copy of the tiny run holding only its last checkpoint (and ckpt-000002's files as a swap source)."""
    run = copy_run(tiny_mix_run, dest)
    keep = (ck.checkpoint_name(TINY_MIX["steps"]), ck.checkpoint_name(2))
    for c in ck.list_checkpoints(run):
        if c.name not in keep:
            shutil.rmtree(c)
    shutil.move(run / keep[1], run / "swap-source")
    return run


def _expect_clean_error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def _clean_error_or_success(fn):
    try:
        return fn()
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return None


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_corrupt_checkpoint_gives_a_clean_error(tmp_path, tiny_mix_run, case):
    name, mutate = CASES[case]
    run = _single_checkpoint_run(tiny_mix_run, tmp_path / "run")
    final = run / ck.checkpoint_name(TINY_MIX["steps"])
    if name.startswith("swap-"):
        mutate = _swap(name[len("swap-"):], run / "swap-source")
    mutate(final, random.Random(case))
    if name.startswith("edit-rehashed-"):
        # a self-consistent forgery: loading must still refuse weights that do not fit the model or suite
        if name in LOADABLE_FORGERIES:
            _clean_error_or_success(lambda: landscape.load(run))
        else:
            _expect_clean_error(lambda: landscape.load(run))
            _expect_clean_error(lambda: landscape.load(final))
        # resuming rebuilds the model from the trainer config: it may go on, or stop cleanly
        r = invoke_cli("train", "--resume", "--out", run)
        if r.exit_code != 0:
            assert_one_line_error(r.exit_code, r.stderr)
        return
    _expect_clean_error(lambda: landscape.load(run))
    _expect_clean_error(lambda: landscape.load(final))
    _expect_clean_error(lambda: resume(run, device="cpu"))
    r = invoke_cli("train", "--resume", "--out", run)
    assert_one_line_error(r.exit_code, r.stderr)
    # nothing was written into the run: no new checkpoint
    assert [p.name for p in run.iterdir() if p.name.startswith("ckpt-")] == [final.name]


LATEST = [
    ("missing", None), ("nowhere", b'{"checkpoint": "ckpt-999999", "step": 999999}'), ("empty", b""),
    ("garbage", b"\x00\xff{{"), ("null", b"null"), ("list", b"[]"), ("escape", b'{"checkpoint": "../run", "step": 1}'),
    ("number", b'{"checkpoint": 12, "step": 12}'), ("tmp", b'{"checkpoint": ".ckpt-000006.tmp-1", "step": 6}'),
]


@pytest.mark.parametrize("what,content", LATEST, ids=[c[0] for c in LATEST])
@pytest.mark.parametrize("final_broken", [False, True], ids=["final-ok", "final-corrupt"])
def test_broken_latest_json_falls_back_to_a_complete_checkpoint_or_errors(tmp_path, tiny_mix_run, what, content,
                                                                          final_broken):
    run = copy_run(tiny_mix_run, tmp_path / "run")
    final = run / ck.checkpoint_name(TINY_MIX["steps"])
    if what == "tmp":  # a half-written directory beside the checkpoints
        shutil.copytree(final, run / ".ckpt-000006.tmp-1")
        _truncate(run / ".ckpt-000006.tmp-1" / "model.safetensors", random.Random(0))
    if content is None:
        (run / "latest.json").unlink()
    else:
        (run / "latest.json").write_bytes(content)
    if final_broken:
        _flip(final / "model.safetensors", random.Random(1), 3)
    complete = {c.name for c in ck.list_checkpoints(run)} - ({final.name} if final_broken else set())
    try:
        obj = landscape.load(run)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        loaded = Path(obj.meta["path"])
        assert loaded.parent == run and loaded.name in complete
        assert_same_tensors(loaded / "model.safetensors", tiny_mix_run.path / loaded.name / "model.safetensors")
    r = invoke_cli("train", "--resume", "--out", run)
    if r.exit_code != 0:
        assert_one_line_error(r.exit_code, r.stderr)
    else:  # resumed from a complete checkpoint, ending where the uninterrupted run ended
        assert_same_tensors(run / final.name / "model.safetensors", tiny_mix_run.path / final.name / "model.safetensors")


def test_checkpoint_round_trip_of_nested_state(tmp_path):
    """pack/unpack keep tuples, non-string keys, non-finite floats and tensors; nothing is pickled."""
    model = torch.nn.Linear(3, 2)
    state = {"t": (1, 2.5, float("inf"), float("nan")), 7: torch.arange(4), "nested": {"x": [torch.ones(2), None]},
             "__dunder": True}
    path = ck.save_checkpoint(tmp_path, 5, model, {"note": "hi"}, state)
    c = ck.read_checkpoint(tmp_path)
    assert c.path == path and c.step == 5 and c.manifest["note"] == "hi"
    back = c.state()
    assert back["t"][:3] == (1, 2.5, float("inf")) and back["t"][3] != back["t"][3]
    assert torch.equal(back[7], torch.arange(4)) and torch.equal(back["nested"]["x"][0], torch.ones(2))
    assert back["nested"]["x"][1] is None and back["__dunder"] is True
    ms = c.model_state()
    assert torch.equal(ms["weight"], model.weight.detach()) and torch.equal(ms["bias"], model.bias.detach())
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "ckpt-000005", "step": 5}
    with pytest.raises(TypeError):
        ck.save_checkpoint(tmp_path, 6, model, {}, {"bad": object()})
    assert ck.read_checkpoint(tmp_path).step == 5  # the failed save left the last checkpoint in place
