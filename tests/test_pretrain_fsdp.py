"""scripts/pretrain_fsdp.py under torchrun with 2 CPU processes: FSDP2 + bf16 autocast + Nexus(AdamW) + schedule +
sharded checkpoints + the gradient-cosine tracker; a run stopped and resumed ends where the straight run ends."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import ROOT, free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()) or
                                shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                                reason="needs torch.distributed with gloo and torchrun")
TINY = ["--n-embd", "16", "--n-layer", "1", "--block-size", "16", "--batch-size", "4", "--inner-steps", "2",
        "--steps", "3", "--track-every", "2", "--ckpt-every", "0"]


def _torchrun(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(ROOT / "scripts" / "pretrain_fsdp.py"), *TINY, "--out", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # three torchrun launches of 2 interpreters each: ~30 s on 2 busy cores
def test_pretrain_fsdp_runs_and_resumes_exactly(tmp_path):
    straight = _torchrun(tmp_path / "a")
    assert [r["step"] for r in straight[:-1]] == [1, 2, 3] and straight[-1]["world"] == 2
    assert "gradsim_mean_cosine" in straight[1] and straight[-1]["gradsim_rows"] == 1
    assert (tmp_path / "a" / "ckpt-000003" / "nexus.json").is_file()
    first = _torchrun(tmp_path / "b", "--stop-at", "2")
    assert first[-1]["final_step"] == 2
    second = _torchrun(tmp_path / "b", "--resume")
    assert [r["step"] for r in second[:-1]] == [3]
    assert second[0]["train_loss"] == straight[2]["train_loss"]
    assert second[-1]["eval_loss"] == straight[-1]["eval_loss"]
