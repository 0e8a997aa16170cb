"""Input checks shared by the solver and its helpers, and the normalised problem they produce.

Every check raises :class:`PartitionError` with the argument's name, the offending index and
value, so a caller can fix the call without reading this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_MIB = 1024.0**2


class PartitionError(ValueError):
    """The arguments do not describe a valid partitioning problem."""


class InfeasiblePartitionError(PartitionError):
    """No contiguous partition fits every stage's memory budget.

    ``closest`` is the partition that minimises the largest overflow, and ``missing_bytes`` maps
    each stage that still overflows in it to the number of bytes it lacks.
    """

    def __init__(self, message: str, *, closest: list[int], missing_bytes: dict[int, float]) -> None:
        super().__init__(message)
        self.closest = closest
        self.missing_bytes = missing_bytes


@dataclass(frozen=True)
class Problem:
    """A validated problem: per-layer lists of length L, per-stage lists of length S."""

    times: list[float]  # per layer, seconds at speed 1
    memory: list[float]  # per layer, static bytes
    activations: list[float]  # per layer, bytes per microbatch in flight
    inflight: list[float]  # per stage, microbatches whose activations are held at once
    speeds: list[float]  # per stage
    budgets: list[float]  # per stage, math.inf = unlimited
    names: list[str]  # per stage, for messages

    @property
    def num_layers(self) -> int:
        return len(self.times)

    @property
    def num_stages(self) -> int:
        return len(self.speeds)


def format_bytes(num: float) -> str:
    """Human-readable bytes in binary units, e.g. ``1.50 MiB``."""
    for unit, scale in (("GiB", 1024.0**3), ("MiB", _MIB), ("KiB", 1024.0)):
        if abs(num) >= scale:
            return f"{num / scale:.2f} {unit}"
    return f"{num:.0f} B"


def check_stages(num_layers: int, stages: int) -> None:
    if isinstance(stages, bool) or not isinstance(stages, int):
        raise PartitionError(f"stages must be an int, got {stages!r}")
    if stages < 1:
        raise PartitionError(f"stages must be >= 1, got {stages}")
    if stages > num_layers:
        raise PartitionError(
            f"cannot split {num_layers} layers into {stages} stages: every stage needs at least "
            f"one layer. Use stages <= {num_layers} (e.g. stages={num_layers}), or split the "
            f"model into finer layers."
        )


def check_values(name: str, values: Sequence[float], length: int, per: str) -> list[float]:
    """Check ``values`` has ``length`` finite entries >= 0 (one per ``per``) and return a list."""
    out = list(values)
    if len(out) != length:
        raise PartitionError(f"{name} has {len(out)} entries, expected one per {per} ({length})")
    for k, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise PartitionError(f"{name}[{k}] must be a finite number >= 0, got {v!r}")
    return [float(v) for v in out]


def check_partition(partition: Sequence[int], num_layers: int) -> list[int]:
    """Check ``partition`` is a list of positive layer counts summing to ``num_layers``."""
    counts = list(partition)
    for s, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise PartitionError(f"partition[{s}] must be an int >= 1 (layers in stage {s}), got {c!r}")
    if sum(counts) != num_layers:
        raise PartitionError(
            f"partition {counts} covers {sum(counts)} layers, but there are {num_layers}"
        )
    return counts


def build_problem(
    times: Sequence[float],
    stages: int,
    memory: Sequence[float] | None,
    activations: Sequence[float] | None,
    inflight: Sequence[float] | None,
    speeds: Sequence[float] | None,
    budgets: Sequence[float | None] | None,
    names: Sequence[str] | None,
) -> Problem:
    """Validate the arguments of :func:`solve` and fill in the defaults."""
    layers = check_values("times", times, len(times), "layer")
    n = len(layers)
    check_stages(n, stages)
    zeros = [0.0] * n
    mem = zeros if memory is None else check_values("memory", memory, n, "layer")
    act = zeros if activations is None else check_values("activations", activations, n, "layer")
    infl = [1.0] * stages if inflight is None else check_values("inflight", inflight, stages, "stage")
    spd = [1.0] * stages if speeds is None else check_values("speeds", speeds, stages, "stage")
    for s, v in enumerate(spd):
        if v <= 0:
            raise PartitionError(f"speeds[{s}] must be > 0 (relative device speed), got {v!r}")
    if budgets is None:
        bud = [math.inf] * stages
    else:
        raw = list(budgets)
        known = check_values(
            "budgets", [0.0 if b is None else b for b in raw], stages, "stage"
        )
        bud = [math.inf if b is None else v for b, v in zip(raw, known)]
    if names is None:
        label = [""] * stages
    else:
        label = [str(x) for x in names]
        if len(label) != stages:
            raise PartitionError(f"names has {len(label)} entries, expected one per stage ({stages})")
    return Problem(layers, mem, act, infl, spd, bud, label)
