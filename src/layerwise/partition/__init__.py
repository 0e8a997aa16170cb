"""Balance contiguous pipeline stages over devices of different speed and memory.

    costs = profile_layers(model, sample)                  # measure (needs torch)
    counts = balance(costs, [Device(name="gpu0"), Device(name="gpu1", speed=0.5)], microbatches=8)

The solver is pure Python: ``from layerwise.partition import solve`` does not import torch. The
torch-based profilers are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .costs import Device, LayerCost
from .plan import balance, inflight_1f1b
from .solver import (
    InfeasiblePartitionError,
    PartitionError,
    balance_by_params,
    solve,
    stage_memory,
    stage_times,
    uniform,
)

if TYPE_CHECKING:
    from .profile import ProfileError, estimate_layers, profile_layers

__all__ = [
    "Device",
    "InfeasiblePartitionError",
    "LayerCost",
    "PartitionError",
    "ProfileError",
    "balance",
    "balance_by_params",
    "estimate_layers",
    "inflight_1f1b",
    "profile_layers",
    "solve",
    "stage_memory",
    "stage_times",
    "uniform",
]

_LAZY = frozenset({"ProfileError", "estimate_layers", "profile_layers"})


def __getattr__(name: str) -> Any:
    # PEP 562: import torch only when a profiler is actually asked for.
    if name in _LAZY:
        from . import profile

        return getattr(profile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
