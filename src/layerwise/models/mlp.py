"""A stack of Linear + Tanh blocks: the simplest model to split."""

from __future__ import annotations

from torch import nn


def mlp(width: int = 32, depth: int = 8) -> nn.Sequential:
    """``depth`` blocks of ``Linear(width, width)`` followed by Tanh; each block is one layer."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
