"""Who is alive: zenoh liveliness tokens, one per peer, watched by the trainer.

A peer's token disappears when its process dies (the TCP link closes: milliseconds) or when it
hangs past the zenoh lease (SIGSTOP: about the lease). Each change is timestamped here, which is
what the demo reports as detection time. A token may also vanish for a moment while gossip
replaces one link by another: the peer then stays in :meth:`snapshot` for a short grace, so the
assignment does not lose every peer at once to a flap.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import zenoh

from .net import alive_key

GRACE_S = 0.25


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
        self._leaving: dict[str, float] = {}  # peer -> when its token went away (not yet counted gone)
        self.banned: set[str] = set()  # peers refused for good (a revoked certificate): never alive again
        self._prefix = alive_key(swarm, "")
        self._sub = session.liveliness().declare_subscriber(alive_key(swarm), self._on_sample, history=True)

    def _on_sample(self, sample: Any) -> None:
        peer = str(sample.key_expr)[len(self._prefix) :]
        joined = sample.kind == zenoh.SampleKind.PUT
        now = time.time()
        with self._cond:
            if peer in self.banned:
                return
            self.changes.append(Change(now, peer, joined))
            if joined:
                self.alive.setdefault(peer, now)
                self._leaving.pop(peer, None)
            elif peer in self.alive:
                # A token can vanish and come back within milliseconds while gossip replaces one link
                # by another; the peer counts as gone only if it stays away for GRACE_S. Failed
                # requests do not wait for this: they are handled at once (Trainer._gone).
                self._leaving[peer] = now
                threading.Timer(GRACE_S, self._expire, (peer, now)).start()
            self._cond.notify_all()

    def _expire(self, peer: str, since: float) -> None:
        with self._cond:
            if self._leaving.get(peer) == since:
                del self._leaving[peer]
                self.alive.pop(peer, None)
                self._cond.notify_all()

    def ban(self, peer: str) -> None:
        """Count ``peer`` as gone from now on, whatever its token says."""
        with self._cond:
            self.banned.add(peer)
            if self.alive.pop(peer, None) is not None:
                self.changes.append(Change(time.time(), peer, False))
            self._leaving.pop(peer, None)
            self._cond.notify_all()

    def snapshot(self) -> dict[str, float]:
        with self._cond:
            return dict(self.alive)

    def is_alive(self, peer: str | None) -> bool:
        """Announced and not leaving (a token that just vanished does not count as alive)."""
        with self._cond:
            return peer is not None and peer in self.alive and peer not in self._leaving

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
