"""The timed requests of the trainer's current and last finished step (the status page's Gantt chart).

Only two steps are kept: the one running (filled as its stage threads send requests) and the last
finished one, which is what ``status()`` shows. Times are seconds since the step began.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class StepTimeline:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._step = -1
        self._t0 = 0.0
        self._current: list[dict[str, Any]] = []
        self._last: dict[str, Any] | None = None

    def begin(self, step: int) -> None:
        with self._lock:
            self._step, self._t0, self._current = step, time.perf_counter(), []

    def record(self, stage: int, kind: str, microbatch: int, peer: str, start: float, end: float) -> None:
        """One request: ``start`` and ``end`` from :func:`time.perf_counter`."""
        with self._lock:
            self._current.append({"stage": stage, "kind": kind, "mb": microbatch, "peer": peer,
                                  "start": round(start - self._t0, 6), "end": round(end - self._t0, 6)})  # fmt: skip

    def end(self) -> None:
        with self._lock:
            took = time.perf_counter() - self._t0
            self._last = {"step": self._step, "seconds": round(took, 6), "actions": self._current}
            self._current = []

    def last(self) -> dict[str, Any] | None:
        """``{"step", "seconds", "actions": [{"stage", "kind", "mb", "peer", "start", "end"}]}``."""
        with self._lock:
            return None if self._last is None else dict(self._last, actions=list(self._last["actions"]))
