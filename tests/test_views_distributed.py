"""The researcher views under 2 gloo processes equal one process: eigen and trajectory surfaces (rows sharded,
the eigen plane's curvature products sharded and all-reduced), sharpness and connectivity (every rank the same)."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import free_port, spawn_and_wait

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
WORLD = 2


def _objective():
    from landscape import Objective
    from landscape.losses import MeanSquaredError

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    g = torch.Generator().manual_seed(1)
    doms = {d: [{"x": torch.randn(8, 3, generator=g, dtype=torch.float64),
                 "y": torch.randn(8, generator=g, dtype=torch.float64)} for _ in range(3)] for d in ("a", "b")}
    return Objective(net, doms, MeanSquaredError())


def _measure() -> dict:
    from landscape import connect, sharpness, surface
    from landscape.params import get_flat

    obj = _objective()
    theta = get_flat(obj.params(), torch.float64)
    g = torch.Generator().manual_seed(2)
    u, w = (torch.randn(theta.numel(), generator=g, dtype=torch.float64) for _ in range(2))
    runs = {"r": {f"s{i}": theta + (1 - t) * u + t * (1 - t) * w for i, t in enumerate((0.0, 0.3, 0.6, 1.0))}}
    out = {}
    e = surface(obj, plane="eigen", grid=5, span=0.3, batch="loop")
    out["eig"] = {d: e.losses[d].tolist() for d in e.losses}
    out["eigvals"] = e.normalization["eigenvalues"]
    tr = surface(obj, plane="trajectory", trajectories=runs, grid=5, batch="loop")
    out["traj"] = {d: tr.losses[d].tolist() for d in tr.losses}
    s = sharpness(obj, samples=4, steps=3, seed=1)
    out["sharp"] = [[s[d].worst, s[d].average] for d in s.domains]
    c = connect(obj, theta + 0.1 * u, points=5)
    out["barrier"] = [c.barrier[d] for d in c.domains]
    return out


def _worker(rank: int, port: int, d: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
            json.dump(_measure(), f)
    finally:
        dist.destroy_process_group()


def _close(a, b, tol=1e-10) -> bool:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return (ta - tb).abs().max().item() <= tol * max(1.0, tb.abs().max().item())


@pytest.mark.slow  # two spawned interpreters import torch: ~10-20 s on 2 busy cores
def test_two_gloo_processes_equal_one(tmp_path, one_thread):
    single = _measure()
    spawn_and_wait(_worker, (free_port(), str(tmp_path)), WORLD, 240, "workers")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]
    for k in ("eigvals", "sharp", "barrier"):
        assert _close(ranks[0][k], single[k]), k
    for k in ("eig", "traj"):
        for d, v in single[k].items():
            assert _close(ranks[0][k][d], v), (k, d)
