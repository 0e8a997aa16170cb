"""``layerwise swarm status``: ask the live peers and the trainer what they hold and do."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import zenoh

from .errors import SwarmError
from .membership import Membership
from .net import Node, config, trainer_key
from .wire import Message


def query_status(swarm: str, join: Sequence[str], lease_ms: int = 1000, settle_s: float = 1.0,
                 relay: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    with zenoh.open(config(connect=join, lease_ms=lease_ms, relay=relay)) as session:
        members = Membership(session, swarm)
        time.sleep(settle_s)  # liveliness history and gossip need a moment to arrive
        node = Node(session, swarm)
        peers: dict[str, Any] = {}
        for p in sorted(members.snapshot()):
            try:
                peers[p] = node.request(p, Message("status"), 10.0).meta
            except SwarmError as e:
                peers[p] = {"error": str(e)}
        try:
            trainer = node.request("trainer", Message("status"), 10.0, key=trainer_key(swarm)).meta
        except SwarmError:
            trainer = None
        members.close()
    return {"swarm": swarm, "peers": peers, "trainer": trainer}
