"""Balance contiguous pipeline stages over devices of different speed and memory.

    plan = layerwise.partition(model, stages=2, sample=x, devices=[Device(name="gpu0"),
                                                                   Device(name="gpu1", speed=0.5)])
    pipe = layerwise.Pipeline(model, partition=plan, ...)  # a Plan is a list of layer counts

or, one piece at a time:

    costs = profile_layers(model, sample)                  # measure (needs torch)
    counts = balance(costs, [Device(name="gpu0"), Device(name="gpu1", speed=0.5)], microbatches=8)

The solver is pure Python: ``from layerwise.partition import solve`` does not import torch. The
torch-based profilers are loaded on first use.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from . import api as _api
from .api import BALANCE_MODES, profile_with_loss
from .costs import Device, LayerCost
from .plan import balance, inflight_1f1b
from .report import Plan
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
    "BALANCE_MODES",
    "Device",
    "InfeasiblePartitionError",
    "LayerCost",
    "PartitionError",
    "Plan",
    "ProfileError",
    "balance",
    "balance_by_params",
    "estimate_layers",
    "inflight_1f1b",
    "profile_layers",
    "profile_with_loss",
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


class _CallablePackage(types.ModuleType):
    """This package, callable: ``layerwise.partition(model, stages=4)`` runs :func:`api.partition`.

    The one-call API and the package that holds the solver share the name ``partition``. A
    function of that name in ``layerwise/__init__.py`` would shadow the subpackage, breaking
    ``import layerwise.partition.solver`` users and ``from layerwise.partition import solve``, so
    the package module itself is made callable by giving it this class (allowed for module
    objects since Python 3.5). Import-time cost is unchanged: nothing here imports torch.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Plan:
        return _api.partition(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
