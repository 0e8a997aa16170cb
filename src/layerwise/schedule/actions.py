"""Pipeline actions as plain data, and their compact text form.

An action is ``(stage, kind, microbatch)``. Compute kinds follow PyTorch's pipelining notation
(``1F0`` = stage 1, forward, microbatch 0); zero-bubble schedules split B into I (input gradient)
and W (weight gradient) as in Qi et al., "Zero Bubble Pipeline Parallelism" (2023). Communication
kinds are written with two letters: ``0SF3`` (stage 0 sends the activation of microbatch 3 to stage
1), ``1RF3`` (stage 1 receives it), ``1SB3`` (stage 1 sends the input gradient of microbatch 3 to
stage 0) and ``0RB3`` (stage 0 receives it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """What an action does. The value is its text form."""

    F = "F"  # forward
    B = "B"  # full backward (input and weight gradients together)
    I = "I"  # noqa: E741  backward for the input gradient only (zero-bubble)
    W = "W"  # backward for the weight gradient only (zero-bubble)
    SEND_F = "SF"  # send activation to stage + 1
    RECV_F = "RF"  # receive activation from stage - 1
    SEND_B = "SB"  # send input gradient to stage - 1
    RECV_B = "RB"  # receive input gradient from stage + 1

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_comm(self) -> bool:
        return not self.is_compute


_COMPUTE = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
_PATTERN = re.compile(r"^\s*(\d+)(SF|RF|SB|RB|F|B|I|W)(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one stage: ``Action(2, Kind.F, 5)`` is written ``2F5``."""

    stage: int
    kind: Kind
    microbatch: int

    def __post_init__(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, got {self!r}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form (``2F5``, ``0SB3``) back into an action."""
        match = _PATTERN.match(text)
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> with kind one of "
                f"{', '.join(k.value for k in Kind)} (for example '2F5' or '0SF3')"
            )
        return cls(int(match.group(1)), Kind(match.group(2)), int(match.group(3)))


@dataclass(frozen=True)
class TimedAction:
    """An action as it ran (measured) or would run (simulated) on one rank, in seconds."""

    rank: int
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def format_actions(actions: list[Action]) -> str:
    """The text form of one rank's action list: space-separated actions."""
    return " ".join(str(a) for a in actions)


def parse_actions(text: str) -> list[Action]:
    """Parse one rank's action list written by :func:`format_actions`."""
    return [Action.parse(tok) for tok in text.split()]
