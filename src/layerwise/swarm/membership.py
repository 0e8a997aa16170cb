"""Who is alive: zenoh liveliness tokens, one per peer, watched by the trainer.

A peer's token disappears when its process dies (the TCP link closes: milliseconds) or when it
hangs past the zenoh lease (SIGSTOP: about the lease). Each change is timestamped here, which is
what the demo reports as detection time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import zenoh

from .net import alive_key


@dataclass(frozen=True)
class Change:
    at: float  # time.time()
    peer: str
    joined: bool


class Membership:
    def __init__(self, session: zenoh.Session, swarm: str) -> None:
        self._cond = threading.Condition()
        self.alive: dict[str, float] = {}  # peer -> when it was first seen
        self.changes: list[Change] = []
        self._prefix = alive_key(swarm, "")
        self._sub = session.liveliness().declare_subscriber(alive_key(swarm), self._on_sample, history=True)

    def _on_sample(self, sample: Any) -> None:
        peer = str(sample.key_expr)[len(self._prefix) :]
        joined = sample.kind == zenoh.SampleKind.PUT
        now = time.time()
        with self._cond:
            if joined and peer not in self.alive:
                self.alive[peer] = now
            elif not joined:
                self.alive.pop(peer, None)
            self.changes.append(Change(now, peer, joined))
            self._cond.notify_all()

    def snapshot(self) -> dict[str, float]:
        with self._cond:
            return dict(self.alive)

    def is_alive(self, peer: str | None) -> bool:
        with self._cond:
            return peer is not None and peer in self.alive

    def left_at(self, peer: str) -> float | None:
        with self._cond:
            return next((c.at for c in reversed(self.changes) if c.peer == peer and not c.joined), None)

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.alive) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_gone(self, peer: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while peer in self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def settle(self, quiet_s: float, timeout: float) -> None:
        """Wait until no peer has joined or left for ``quiet_s`` (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                last = self.changes[-1].at if self.changes else 0.0
            if time.time() - last >= quiet_s:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self._sub.undeclare()
