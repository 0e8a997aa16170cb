"""AdamW's groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerwise.train.optim import WarmupCosine, adamw, set_current_lr, warmup_cosine


def test_warmup_is_linear_then_cosine_down_to_the_floor() -> None:
    f = WarmupCosine(warmup=4, total=24, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: (1 + cos(pi / 2)) / 2 = 1/2
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # the floor, also past the end
    values = [f(s) for s in range(4, 25)]
    assert all(a > b for a, b in zip(values, values[1:])), "strictly decreasing after the warm-up"
    assert WarmupCosine(warmup=0, total=10, min_ratio=0.0)(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_decay_applies_to_matrices_only() -> None:
    lin, norm = torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)
    opt = adamw([*lin.parameters(), *norm.parameters()], lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [(3, 3)] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_the_schedule_state_round_trips_through_json() -> None:
    w = torch.nn.Parameter(torch.randn(2, 2))
    opt = adamw([w], lr=1.0, weight_decay=0.0)
    sched = warmup_cosine(opt, warmup=3, total=10, min_ratio=0.0)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = adamw([torch.nn.Parameter(torch.randn(2, 2))], lr=1.0, weight_decay=0.0)
    sched2 = warmup_cosine(opt2, warmup=3, total=10, min_ratio=0.0)
    sched2.load_state_dict(state)
    set_current_lr(opt2, sched2)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(WarmupCosine(warmup=3, total=10, min_ratio=0.0)(6))
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
