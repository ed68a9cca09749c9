"""The package's layers, checked in fresh interpreters: the analyzers never import the trainer, the optimizer
needs only torch, no library module touches the matplotlib backend, and modules stay small."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ("nexus_opt.train", "nexus_opt.checkpoint", "nexus_opt.models", "nexus_opt.suites", "nexus_opt.evaluate")
RAW_BACKEND = "dict.__getitem__(matplotlib.rcParams, 'backend')"  # get_backend() itself would load pyplot

# one fresh interpreter for the library checks (torch imports take seconds on a shared CPU)
_LIBRARY = f"""
import sys, json, matplotlib
backend = {RAW_BACKEND}
import landscape, landscape.render.surface, landscape.render.geometry, landscape.render.flatness
import landscape.render.toys, landscape.render.training, landscape.render.style
library = sorted(sys.modules)
import landscape.app.report, landscape.app.demo_report
after_report = {{"backend_kept": {RAW_BACKEND} == backend, "pyplot": "matplotlib.pyplot" in sys.modules}}
import landscape.app.demo
print(json.dumps({{"library": library, "report": after_report, "app": sorted(sys.modules)}}))
"""
_NEXUS = """
import sys, json, torch, torch.optim
before = set(sys.modules)
import nexus_opt.nexus
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _run(code: str):
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.fixture(scope="module")
def library():
    return _run(_LIBRARY)


def _is_trainer(m: str) -> bool:
    return any(m == t or m.startswith(t + ".") for t in TRAINER)


def test_import_landscape_pulls_in_no_trainer_module(library):
    mods = library["library"]
    assert "landscape.surface.api" in mods and "nexus_opt.util" in mods  # the check is not vacuous
    assert [m for m in mods if _is_trainer(m)] == []
    assert [m for m in mods if m.startswith("landscape.app")] == []  # the application layer is not the library's
    assert "nexus_opt.train" in library["app"]  # ...and the same check does see the trainer where it is used


def test_import_nexus_needs_only_torch_and_the_standard_library():
    extra = [m for m in _run(_NEXUS) if m.split(".")[0] not in sys.stdlib_module_names]
    assert extra == ["nexus_opt", "nexus_opt.errors", "nexus_opt.nexus"]


def test_no_library_module_switches_the_matplotlib_backend_or_loads_pyplot(library):
    assert library["report"] == {"backend_kept": True, "pyplot": False}
    assert "matplotlib.figure" in library["library"]
    for p in (ROOT / "landscape").rglob("*.py"):
        assert "matplotlib.use(" not in p.read_text(), p


def test_landscape_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "landscape").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}
