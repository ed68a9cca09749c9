"""What a new user meets first (issue 23): install hints that work, output that survives a pipe, one spelling per
option, readable help."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80")
    env.pop("FORCE_COLOR", None)
    return subprocess.run(args, cwd=kw.pop("cwd", ROOT), env=env, capture_output=True, text=True, timeout=120, **kw)


# --- install story ---------------------------------------------------------------------------------------------

def test_setup_sh_options_parse_before_any_work():
    """--help lists --hf and --test; an unknown option is one line, exit 2, before a venv is touched."""
    r = _run(["bash", str(ROOT / "scripts/setup.sh"), "--help"], cwd="/")
    assert r.returncode == 0 and "--hf" in r.stdout and "--test" in r.stdout
    r = _run(["bash", str(ROOT / "scripts/setup.sh"), "--nope"], cwd="/")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--hf" in r.stderr


def test_train_hf_gpt2_without_transformers_is_one_line():
    """The script that needs the hf extra says how to get it, in one line, exit 2 (no ModuleNotFoundError)."""
    code = ("import runpy, sys; sys.modules['transformers'] = None; sys.argv = ['x', '--out', sys.argv[1]]; "
            "runpy.run_path('scripts/train_hf_gpt2.py', run_name='__main__')")
    r = _run([sys.executable, "-c", code, "/nonexistent-never-written"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "scripts/setup.sh --hf" in r.stderr and "Traceback" not in r.stderr


def test_missing_transformers_error_names_the_working_install(monkeypatch):
    from nexus_opt.errors import UserError
    from landscape import sources

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError) as e:
        sources._require_transformers()
    assert "scripts/setup.sh --hf" in str(e.value) and "nexus-landscape[hf]" not in str(e.value)
