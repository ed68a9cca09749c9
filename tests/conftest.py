"""Shared test helpers: tiny trained runs (session-scoped, read-only) and CLI runners.

Fixtures here are cheap or session-scoped; nothing is autouse.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tiny configurations (seconds on two shared CPU cores). Keys are TrainConfig fields.
TINY_MIX = dict(suite="mix", steps=6, batch_size=8, accum=2, warmup=1, eval_every=1, ckpt_every=2,
                seed=0, device="cpu")
TINY_TEXT = dict(suite="text", suite_options={"block_size": 16, "eval_batches": 2, "eval_batch_size": 4},
                 model_config={"n_embd": 16, "n_layer": 1, "n_head": 2}, steps=4, batch_size=4, accum=2,
                 warmup=1, eval_every=2, ckpt_every=2, seed=0, device="cpu")


def tiny_config(base: dict, out, **overrides):
    """A TrainConfig from one of the TINY_* dicts (deep-copied), writing into `out`."""
    from nexus_opt.train import TrainConfig

    kw = json.loads(json.dumps(base))
    kw.update(overrides)
    return TrainConfig(out=str(out), **kw)


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished training run: its directory (treat as read-only; copy it to mutate), config and result."""

    path: Path
    config: dict
    result: dict


def _train_run(tmp_path_factory, name: str, base: dict) -> Run:
    from nexus_opt.train import train

    out = tmp_path_factory.mktemp(name) / "run"
    res = train(tiny_config(base, out))
    return Run(out, dict(base), res)


TINY_BOWLS = dict(suite="bowls", steps=2, batch_size=2, accum=1, warmup=1, eval_every=1, ckpt_every=2, seed=0,
                  device="cpu")


@pytest.fixture(scope="session")
def bowls_run(tmp_path_factory) -> Path:
    """A 2-step run of the 2-D bowls (a Point model; checkpoints at steps 0 and 2): every analyzer on it takes a
    fraction of a second. Read-only."""
    return _train_run(tmp_path_factory, "tiny_bowls", TINY_BOWLS).path


@pytest.fixture(scope="session")
def tiny_mix_run(tmp_path_factory) -> Run:
    """A 6-step AdamW run on the mix suite (checkpoints at 0, 2, 4, 6; eval every step). Read-only."""
    return _train_run(tmp_path_factory, "tiny_mix", TINY_MIX)


@pytest.fixture(scope="session")
def tiny_text_run(tmp_path_factory) -> Run:
    """A 4-step AdamW run of a tiny GPT on the text suite (checkpoints at 0, 2, 4). Read-only."""
    return _train_run(tmp_path_factory, "tiny_text", TINY_TEXT)


def copy_run(run: Run | Path, dest: Path) -> Path:
    """A private copy of a run directory that a test may modify."""
    src = run.path if isinstance(run, Run) else Path(run)
    shutil.copytree(src, dest)
    return dest


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl (strict JSON: NaN/Infinity are rejected)."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c} in metrics.jsonl")

    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=bad) for line in text.splitlines() if line.strip()]


# -- the CLI ---------------------------------------------------------------------------------------
def invoke_cli(*args: str):
    """Run `landscape ARGS` in-process (typer's CliRunner); returns the click Result (.exit_code, .stderr)."""
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def run_cli_process(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m cli.main ARGS` in a fresh process from the repository root (text mode)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "cli.main", *[str(a) for a in args]], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(exit_code: int, stderr: str, *, contains: str | None = None) -> str:
    """The CLI's bad-input contract: exit 2, exactly one non-empty line on stderr, `error: ...`, no traceback."""
    lines = stderr.splitlines()
    assert exit_code == 2, f"exit {exit_code}, stderr: {stderr!r}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), lines
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small float64 products (two shared cores oversubscribe badly); restored."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """The full hostile-input cross product is deselected (not skipped one by one) unless `-m hostile_full`."""
    if "hostile_full" in (config.getoption("-m") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("hostile_full") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("hostile_full") is not None])
        items[:] = keep


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_after(rank: int, worker, *args) -> None:
    """Run one spawned worker; on success leave at once (os._exit), skipping interpreter teardown, where gloo's
    threads have aborted a finished rank ("terminate called without an active exception", SIGABRT)."""
    import os
    import sys

    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_and_wait(worker, args: tuple, nprocs: int, timeout: float, what: str) -> None:
    """Run worker(rank, *args) in `nprocs` spawned processes (spawn, not fork: a forked child of a process whose
    OpenMP pool already ran can deadlock); fail the test if they do not finish within `timeout` seconds."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_exit_after, args=(worker,) + tuple(args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
