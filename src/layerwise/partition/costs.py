"""What one layer costs and what one device offers: the inputs of the stage balancer.

Pure data, no torch: costs come from :func:`layerwise.partition.profile_layers` (measured),
:func:`layerwise.partition.estimate_layers` (FLOP model), or are written by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_non_negative(owner: str, field: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}.{field} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """The cost of one layer for one microbatch, in seconds and bytes."""

    forward_s: float  # forward time of one microbatch
    backward_s: float  # backward time of one microbatch (input and weight gradients)
    param_bytes: float  # parameters (and buffers) the stage holds for this layer
    grad_bytes: float  # gradients of the trainable parameters
    optimizer_bytes: float  # optimizer state, e.g. Adam's two moments = 2 x grad_bytes
    activation_bytes: float  # saved for backward, held from forward to backward, per microbatch

    def __post_init__(self) -> None:
        for name in (
            "forward_s",
            "backward_s",
            "param_bytes",
            "grad_bytes",
            "optimizer_bytes",
            "activation_bytes",
        ):
            _check_non_negative("LayerCost", name, getattr(self, name))

    @property
    def time_s(self) -> float:
        """Forward plus backward time of one microbatch."""
        return self.forward_s + self.backward_s

    @property
    def static_bytes(self) -> float:
        """Memory held for the whole step regardless of microbatches: weights, grads, optimizer."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


@dataclass(frozen=True, kw_only=True)
class Device:
    """A device that holds one pipeline stage."""

    name: str  # used in error messages, e.g. "cuda:1" or "peer-7"
    speed: float = 1.0  # relative throughput: 0.5 = half as fast, so its stage takes 2x as long
    memory_bytes: float | None = None  # memory budget for its stage; None = unlimited

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Device.name must be a non-empty string, got {self.name!r}")
        speed = self.speed
        if not (isinstance(speed, (int, float)) and math.isfinite(speed) and speed > 0):
            raise ValueError(
                f"Device {self.name!r}: speed must be a finite number > 0 "
                f"(1.0 = reference, 0.5 = half as fast), got {speed!r}"
            )
        if self.memory_bytes is not None:
            _check_non_negative(f"Device({self.name!r})", "memory_bytes", self.memory_bytes)
