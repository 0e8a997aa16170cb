"""From layer costs and devices to a balanced partition: :func:`solve` in the library's own types."""

from __future__ import annotations

from collections.abc import Sequence

from ._checks import PartitionError
from .costs import Device, LayerCost
from .solver import solve


def inflight_1f1b(stages: int, microbatches: int) -> list[int]:
    """Microbatches whose activations stage ``s`` holds at the peak of 1F1B: ``min(m, p - s)``.

    In 1F1B (Narayanan et al., PipeDream-Flush, 2021) stage ``s`` runs ``p - s`` forwards before
    its first backward, so the first stage holds the most activations.
    """
    if microbatches < 1:
        raise PartitionError(f"microbatches must be >= 1, got {microbatches}")
    return [min(microbatches, stages - s) for s in range(stages)]


def balance(
    costs: Sequence[LayerCost],
    devices: Sequence[Device] | int,
    *,
    microbatches: int = 1,
    inflight: Sequence[float] | None = None,
) -> list[int]:
    """Layers per stage for ``costs`` on ``devices`` (one stage per device, in pipeline order).

    ``devices`` may be an int for that many identical, unlimited devices. Activations are
    counted ``inflight[s]`` times on stage ``s``; by default the 1F1B peak
    ``min(microbatches, stages - s)``. Raises :class:`InfeasiblePartitionError` naming the device
    that runs out of memory.
    """
    devs = [Device(name=f"stage{s}") for s in range(devices)] if isinstance(devices, int) else list(devices)
    if not devs:
        raise PartitionError("need at least one device")
    return solve(
        [c.time_s for c in costs],
        stages=len(devs),
        memory=[c.static_bytes for c in costs],
        activations=[c.activation_bytes for c in costs],
        inflight=inflight_1f1b(len(devs), microbatches) if inflight is None else inflight,
        speeds=[d.speed for d in devs],
        budgets=[d.memory_bytes for d in devs],
        names=[d.name for d in devs],
    )
