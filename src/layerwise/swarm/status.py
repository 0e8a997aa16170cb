"""``layerwise swarm status``: ask the live peers and the trainer what they hold and do."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from .access_client import Client
from .errors import SwarmError
from .identity import Identity
from .membership import Membership
from .net import Node, config, open_session, trainer_key
from .wire import Message


class StatusProbe:
    """One zenoh session kept open, so that ``poll`` can be called every second (the web page)."""

    def __init__(self, swarm: str, join: Sequence[str], lease_ms: int = 1000, identity: str | None = None,
                 crl: str | None = None, relay: Sequence[str] = ()) -> None:  # fmt: skip
        self.swarm, self.join, self.lease_ms, self.relay = swarm, tuple(join), lease_ms, tuple(relay)
        self.identity = Identity(identity, crl) if identity else None  # --identity: mutual TLS, signed hello

    def __enter__(self) -> StatusProbe:
        self.session = open_session(config(connect=self.join, lease_ms=self.lease_ms, identity=self.identity,
                                           relay=self.relay), "status", self.relay, self.identity)  # fmt: skip
        self.members = Membership(self.session, self.swarm)
        self.node = Node(self.session, self.swarm, auth=Client(self.identity) if self.identity else None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.members.close()
        self.session.close()

    def poll(self, timeout: float = 10.0) -> dict[str, Any]:
        """Every announced peer's and the trainer's own status; the requests run in parallel, so a
        hung peer costs one ``timeout``, not one per peer."""
        names = sorted(self.members.snapshot())
        got: dict[str, Any] = {}

        def ask(name: str, key: str | None) -> None:
            try:
                got[name] = self.node.request(name, Message("status"), timeout, key=key).meta
            except SwarmError as e:
                got[name] = {"error": str(e)}

        jobs = [(p, None) for p in names] + [("\0trainer", trainer_key(self.swarm))]
        threads = [threading.Thread(target=ask, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 10.0)
        trainer = got.pop("\0trainer", None)
        if trainer is not None and "error" in trainer:
            trainer = None  # no trainer is running (or it is between sessions)
        return {"swarm": self.swarm, "peers": {p: got.get(p, {"error": "no reply"}) for p in names},
                "trainer": trainer, "at": time.time()}  # fmt: skip


def query_status(swarm: str, join: Sequence[str], lease_ms: int = 1000, settle_s: float = 1.0,
                 identity: str | None = None, crl: str | None = None,
                 relay: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    with StatusProbe(swarm, join, lease_ms, identity, crl, relay) as probe:
        time.sleep(settle_s)  # liveliness history and gossip need a moment to arrive
        return probe.poll()
