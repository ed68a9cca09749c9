"""Nexus and the rest of torch's training engine, in one process: outer optimizers that need a closure are refused,
the local walk (sync="outer") equals a plain loop simulating R ranks, bf16 weights walk in a float32 master copy,
and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nexus_opt import Nexus


def test_outer_optimizer_that_needs_a_closure_is_refused():
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match=r"cannot wrap LBFGS: its step\(\) needs a closure") as e:
        Nexus(torch.optim.LBFGS(model.parameters()))
    assert "\n" not in str(e.value)
    Nexus(torch.optim.SGD(model.parameters(), lr=0.1))  # closure optional: fine
