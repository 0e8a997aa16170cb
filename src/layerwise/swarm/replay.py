"""What the trainer keeps of the step in flight, so a replacement peer can redo a lost stage's work.

The trainer is the hub every activation and gradient passes through (as a Petals client is), so
it already has, for each stage ``s`` and microbatch ``m``, the input it sent (``inputs[s][m]``)
and the output gradient it sent (``grads[s][m]``), plus the list of actions each stage has
completed this step. When a stage's holder dies, its copy (weights and AdamW state as of the last
commit) takes over and the stage's completed actions are run again in the same order from these
inputs: the recomputed activations and gradients equal the lost ones bit for bit, and the weight
gradients are summed in the same microbatch order. Memory: one activation and one gradient per
stage boundary and microbatch of the current step; freed at the commit.
"""

from __future__ import annotations

import threading
from typing import Any

from .errors import SwarmError


class Aborted(SwarmError):
    """Another stage's thread failed for good; this one stops waiting."""


class StepCache:
    def __init__(self, step: int, stages: int, microbatches: int) -> None:
        self.step, self.stages, self.microbatches = step, stages, microbatches
        self.inputs: list[dict[int, Any]] = [{} for _ in range(stages)]  # stage -> mb -> its input
        self.grads: list[dict[int, Any]] = [{} for _ in range(stages)]  # stage -> mb -> grad of its output
        self.targets: list[Any] = []  # mb -> the last stage's targets
        self.losses: dict[int, float] = {}
        self.done: list[list[tuple[str, int]]] = [[] for _ in range(stages)]  # completed (kind, mb)
        self.slots: list[int] = [1] * stages  # replicas per stage this step (microbatch mb -> mb % slots)
        self.committing = False  # in the commit's second phase: replicas get their gradients with it
        self._cond = threading.Condition()
        self.failed: BaseException | None = None

    def put(self, table: list[dict[int, Any]], stage: int, mb: int, value: Any) -> None:
        with self._cond:
            table[stage][mb] = value
            self._cond.notify_all()

    def wait(self, table: list[dict[int, Any]], stage: int, mb: int) -> Any:
        with self._cond:
            while mb not in table[stage]:
                if self.failed is not None:
                    raise Aborted(f"step {self.step} stopped: {self.failed}")
                self._cond.wait(0.5)
            return table[stage][mb]

    def fail(self, err: BaseException) -> None:
        with self._cond:
            if self.failed is None:
                self.failed = err
            self._cond.notify_all()
