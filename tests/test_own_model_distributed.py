"""Curvature and gradient cosines sharded over 2 gloo processes equal one process (1e-10); under torchrun
the CLI writes its outputs from rank 0 only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, free_port, spawn_and_wait

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
WORLD = 2
CFG = {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}


def _write_texts(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "code.txt"), "w") as f:
        f.write("def add(x, y):\n    return x + y\n" * 30)
    with open(os.path.join(d, "math.txt"), "w") as f:
        f.write("".join(f"{a} * {b} = {a * b}\n" for a in range(12) for b in range(6)))
    return {"code": os.path.join(d, "code.txt"), "math": os.path.join(d, "math.txt")}


def _measure(d: str) -> dict:
    """Top eigenvalues (Hessian, GGN), three products of each and the gradient cosines, on this process."""
    from landscape import Objective
    from landscape.data import load_domains
    from landscape.distributed import gradient_cosines
    from landscape.flatness import flatness
    from landscape.gradsim import gradient_similarity
    from landscape.ggn import make_operator
    from landscape.losses import TokenCrossEntropy
    from nexus_opt.models import GPT

    torch.manual_seed(0)
    model = GPT(**CFG).eval()
    doms, _ = load_domains(_write_texts(d), batch_size=2, seq_len=8, num_batches=3, seed=0)  # 3: unequal shares
    obj = Objective(model, doms, TokenCrossEntropy())
    V = torch.randn(obj.num_params(), 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {"cos": gradient_cosines(obj)["cosine"]}
    gs = gradient_similarity(obj, seed=3, resamples=20, per_layer=False)  # rows sharded over ranks
    out.update(gs_cos=gs.cosine, gs_split=[gs.split_half[d] for d in gs.domains], gs_se=gs.cosine_stderr,
               gs_loss=[gs.loss[d] for d in gs.domains])
    from landscape.closeness import closeness
    calls = [0]
    base = obj.loss_fn

    def counted(m, b):
        calls[0] += 1
        return base(m, b)
    cobj = Objective(model, doms, counted)
    cl = closeness(cobj, max_evals=25, barrier_points=3)  # descents, losses and curvature sharded like flatness
    out["calls"] = calls[0]
    out.update(cl_reached=[cl.reached[d] for d in cl.domains], cl_loss=[cl.loss_min[d] for d in cl.domains],
               cl_grad=[cl.bound.get("stationarity") or 0.0])
    for c in ("hessian", "ggn"):
        out[f"{c}_eig"] = flatness(obj, k=1, which="top", trace=False, curvature=c, max_hvps=12).eigenvalues
        op = make_operator(obj, "code", c)
        out[f"{c}_hv"] = op.matmat(V).tolist()
        out[f"{c}_loss"] = op.loss()
    return out


def _worker(rank: int, port: int, d: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        out = _measure(d)
        from landscape.surface import engine
        # each rank's own timing would pick differently here; the run must still use rank 0's one choice
        engine.probe = lambda *a, **k: {"pick": "loop" if rank == 0 else "vmap"}
        out["engine"] = engine.choose_batch("auto", "cpu", object(), names=["code"])
        with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _close(a, b, tol=1e-10):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return (ta - tb).abs().max().item() <= tol * max(1.0, tb.abs().max().item())


@pytest.mark.slow  # two spawned interpreters import torch: ~10-20 s on 2 busy cores
def test_two_gloo_processes_equal_one(tmp_path, one_thread):
    single = _measure(str(tmp_path / "single"))
    spawn_and_wait(_worker, (free_port(), str(tmp_path)), WORLD, 180, "workers")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    engines = [r.pop("engine") for r in ranks]
    assert engines == ["loop", "loop"]  # rank 0's pick, broadcast (rank 1's own probe said vmap)
    calls = [r.pop("calls") for r in ranks]
    assert max(calls) < single.pop("calls")  # each rank evaluates only its share of closeness's batches
    assert ranks[0] == ranks[1]  # every rank holds the same all-reduced numbers
    for k, v in single.items():
        assert _close(ranks[0][k], v, 1e-8 if k.startswith("cl_") else 1e-10), k
    assert single["hessian_eig"][0] != single["ggn_eig"][0]


@pytest.mark.slow  # torchrun starts two CLI processes: ~20-30 s on 2 busy cores
def test_cli_under_torchrun_writes_from_rank0_only(tmp_path):
    texts = _write_texts(str(tmp_path))
    from nexus_opt.models import GPT
    from safetensors.torch import save_model
    torch.manual_seed(0)
    save_model(GPT(**CFG), str(tmp_path / "m.safetensors"))
    args = ["flatness", str(tmp_path / "m.safetensors"), "--factory", "nexus_opt.models:GPT", "--factory-config",
            json.dumps(CFG), "--trust-remote-code", "--data", f"code={texts['code']},math={texts['math']}",
            "--batch-size", "2", "--seq-len", "8", "--num-batches", "3", "-k", "1", "--which", "top", "--no-trace"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    one = subprocess.run([sys.executable, "-m", "cli.main", *args, "--json", str(tmp_path / "one.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "cli.main", *args,
                          "--json", str(tmp_path / "two.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("Hessian eigenvalues") == 1  # rank 0 prints, rank 1 does not
    a = json.loads((tmp_path / "one.json").read_text())["results"][0]["result"]["results"]["train"]
    b = json.loads((tmp_path / "two.json").read_text())["results"][0]["result"]["results"]["train"]
    assert _close(b["eigenvalues"], a["eigenvalues"]) and abs(a["loss"] - b["loss"]) < 1e-10
