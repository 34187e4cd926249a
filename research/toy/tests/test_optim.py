"""The toy's shared optimiser and schedule (`research.toy.optim`)."""

import math
from types import SimpleNamespace

import torch

from research.toy.optim import lr_at, toy_adamw


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_five_percent():
    schedule = SimpleNamespace(lr=1e-3, warmup=10, steps=110)
    assert [lr_at(s, schedule) for s in (0, 4, 9)] == [1e-4, 5e-4, 1e-3]
    middle = 60  # half-way through the decay: cos(pi / 2) = 0
    assert math.isclose(lr_at(middle, schedule), 1e-3 * (0.05 + 0.95 * 0.5))
    assert math.isclose(lr_at(110, schedule), 0.05e-3)


def test_adamw_decays_matrices_only():
    linear, norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)
    optimizer = toy_adamw([*linear.parameters(), *norm.parameters()], lr=2e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [(3, 4)] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0  # bias, norm weight and bias
    assert decayed["lr"] == 2e-3 and decayed["betas"] == (0.9, 0.98)
