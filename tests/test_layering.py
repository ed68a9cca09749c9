"""The package's layers, checked in fresh interpreters: the analyzers never import the trainer, the optimizer
needs only torch, no library module touches the matplotlib backend, and modules stay small."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ("nexus_opt.train", "nexus_opt.checkpoint", "nexus_opt.models", "nexus_opt.suites", "nexus_opt.evaluate")


def _modules_after(code: str) -> set[str]:
    """The names in sys.modules after running `code` in a fresh interpreter at the repository root."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def _is_trainer(m: str) -> bool:
    return any(m == t or m.startswith(t + ".") for t in TRAINER)


def test_import_landscape_pulls_in_no_trainer_module():
    mods = _modules_after("import landscape, landscape.render.surface, landscape.render.geometry, "
                          "landscape.render.flatness")
    assert "landscape.surface" in mods and "nexus_opt.util" in mods  # the check is not vacuous
    assert sorted(m for m in mods if _is_trainer(m)) == []
    assert not any(m.startswith("landscape.app") for m in mods)  # the application layer is not the library's


def test_the_application_layer_does_use_the_trainer():
    """The same check run on landscape.app.demo finds the trainer: the test above can fail."""
    mods = _modules_after("import landscape.app.demo")
    assert "nexus_opt.train" in mods


def test_import_nexus_needs_only_torch_and_the_standard_library():
    torch_only = _modules_after("import torch, torch.optim")
    mods = _modules_after("import nexus_opt.nexus")
    extra = sorted(m for m in mods - torch_only if m.split(".")[0] not in sys.stdlib_module_names)
    assert extra == ["nexus_opt", "nexus_opt.errors", "nexus_opt.nexus"]


def test_no_library_module_switches_the_matplotlib_backend_or_loads_pyplot():
    code = ("import matplotlib; b = matplotlib.get_backend(); import landscape.render.surface, "
            "landscape.render.geometry, landscape.render.flatness, landscape.render.toys, landscape.render.training, "
            "landscape.render.style, landscape.app.demo_report, landscape.app.report\n"
            "assert matplotlib.get_backend() == b, (b, matplotlib.get_backend())")
    mods = _modules_after(code)
    assert "matplotlib.pyplot" not in mods
    for p in (ROOT / "landscape").rglob("*.py"):
        assert 'matplotlib.use(' not in p.read_text(), p


def test_landscape_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "landscape").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}
