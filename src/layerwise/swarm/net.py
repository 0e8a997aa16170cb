"""The zenoh side: session configuration, key names, and a request that fails fast.

Peers run in zenoh's peer mode with gossip scouting from the seed endpoints (multicast scouting
is off unless asked for, so swarms on one host or LAN never join each other by accident). Every
node sets the transport lease, because that is what bounds how long a hung (SIGSTOPped) peer goes
unnoticed: zenoh closes its link after the lease and the in-flight request ends with no reply.
Failure shows as an empty reply list, not an exception (see ../shared/ANCHORS.md), so
:meth:`Node.request` turns "no reply" into :class:`PeerLost`.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Sequence
from typing import Any

import zenoh

from .errors import PeerLost, PeerRefused
from .wire import MAX_MESSAGE, Message, decode_message, encode_message

DEFAULT_LEASE_MS = 1000


def config(*, listen: Sequence[str] = (), connect: Sequence[str] = (), lease_ms: int = DEFAULT_LEASE_MS,
           multicast: bool = False, relay: Sequence[str] = ()) -> zenoh.Config:  # fmt: skip
    if relay:  # behind NAT: a client of the relay, which carries everything (relay.py)
        from .relay import client_config

        return client_config(relay, lease_ms)
    c = zenoh.Config()
    c.insert_json5("mode", '"peer"')
    c.insert_json5("listen/endpoints", json.dumps(list(listen) or ["tcp/127.0.0.1:0"]))
    c.insert_json5("connect/endpoints", json.dumps(list(connect)))
    c.insert_json5("scouting/multicast/enabled", "true" if multicast else "false")
    c.insert_json5("scouting/gossip/enabled", "true")
    c.insert_json5("transport/link/tx/lease", str(int(lease_ms)))
    return c


def alive_key(swarm: str, peer: str = "*") -> str:
    return f"lw/{swarm}/alive/{peer}"


def peer_key(swarm: str, peer: str) -> str:
    return f"lw/{swarm}/peer/{peer}"


def trainer_key(swarm: str) -> str:
    return f"lw/{swarm}/trainer"


class Node:
    """One zenoh session; ``request`` sends a message to a peer and waits for its one reply."""

    def __init__(self, session: zenoh.Session, swarm: str) -> None:
        self.session = session
        self.swarm = swarm
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_by_kind: dict[str, int] = {}  # request kind -> bytes sent and received (bench/trust)

    def request(self, peer: str, msg: Message, timeout: float = 120.0, key: str | None = None) -> Message:
        data = encode_message(msg)
        self.bytes_sent += len(data)
        self.bytes_by_kind[msg.kind] = self.bytes_by_kind.get(msg.kind, 0) + len(data)
        replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.session.get(
            key or peer_key(self.swarm, peer),
            zenoh.handlers.Callback(replies.put, lambda: replies.put(None)),
            payload=data, timeout=timeout, congestion_control=zenoh.CongestionControl.BLOCK,
        )  # fmt: skip
        got: Message | None = None
        why = "left (no reply)"
        start = time.monotonic()
        while True:
            try:
                reply = replies.get(timeout=timeout + 5.0)
            except queue.Empty:
                raise PeerLost(peer, f"did not answer {msg.describe()} within {timeout:.0f} s") from None
            if reply is None:
                break
            if reply.ok is None:
                why = f"failed: {reply.err.payload.to_string()[:200]}"
                continue
            raw = reply.ok.payload.to_bytes()
            self.bytes_received += len(raw)
            self.bytes_by_kind[msg.kind] += len(raw)
            if got is None:
                got = decode_message(raw, f"peer {peer}", MAX_MESSAGE)
        if got is None:
            waited = time.monotonic() - start
            raise PeerLost(peer, f"{why} during {msg.describe()} after {waited:.2f} s")
        if got.kind == "error":
            raise PeerRefused(f"peer {peer} refused {msg.describe()}: {got.meta.get('error', '?')}")
        return got
