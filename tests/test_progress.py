"""Issue 22: long analyzers report progress also when stderr is a file or a pipe (a line every few seconds)."""
from __future__ import annotations

from conftest import run_cli_process


def test_flatness_prints_progress_lines_to_a_pipe(tiny_mix_run):
    p = run_cli_process("flatness", tiny_mix_run.path, "--top-k", "2", env={"LANDSCAPE_PROGRESS_SECONDS": "0.2"})
    assert p.returncode == 0, p.stderr
    lines = [s for s in p.stderr.splitlines() if " HVPs (" in s]
    assert lines and all(s.startswith("train: ") and s.endswith(" s)") for s in lines), p.stderr
    assert "estimate:" in p.stderr.splitlines()[0]  # the cost comes before the work


def test_progress_lines_keep_coming_during_one_long_step(capsys, monkeypatch):
    """The timer prints the latest state every period even when no update arrives (one slow product)."""
    import time

    from cli.common import _progress_lines

    monkeypatch.setenv("LANDSCAPE_PROGRESS_SECONDS", "0.05")
    with _progress_lines("HVPs") as update:
        update(3, 40, "train: eigenvalues")
        time.sleep(0.4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 3 and all(s.startswith("train: eigenvalues: 3/40 HVPs (") for s in err), err
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # and stops with the block
