"""A relay for peers behind NAT: a zenoh router that every process of a swarm connects out to.

``layerwise swarm relay --listen tcp/0.0.0.0:7447`` runs a process in zenoh's *router* mode on a
host that everyone can reach; peers, trainers and ``status`` started with ``--relay ENDPOINT``
open a zenoh *client* session to it instead of a peer session. A client only connects out (no
listening port, nothing to open in a NAT or firewall), and the router carries all of its traffic:
liveliness tokens (membership), requests and replies. That is why ``--relay`` makes the process a
client rather than a peer that joins the router: zenoh peers expect a full mesh and, when they
cannot reach each other directly (two NATs), their queries find no route through a router
(checked with zenoh 1.10 in two network namespaces joined only through a router's namespace).

Costs: every message crosses two links (sender -> relay -> receiver), the relay's bandwidth is
shared by the whole swarm, and the relay is one more single point of failure besides the
trainer (peers and the trainer lose each other when it dies). Several relays may be given
(``--relay`` repeated): zenoh connects to the first it reaches. A process started before its
relay waits up to a minute for it (zenoh's clients otherwise give up at once). The relay is content-blind:
it forwards the same messages the peers would exchange directly, so training is unchanged
(equal to one process with ``--compress none``).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Sequence

import zenoh


CONNECT_TIMEOUT_MS = 60_000  # a process started before its relay waits this long for it


def client_config(relay: Sequence[str], lease_ms: int) -> zenoh.Config:
    """A zenoh client of the relay(s): connects out only; everything goes through the router."""
    c = zenoh.Config()
    c.insert_json5("mode", '"client"')
    c.insert_json5("connect/endpoints", json.dumps(list(relay)))
    c.insert_json5("connect/timeout_ms", str(CONNECT_TIMEOUT_MS))  # zenoh's client default: fail at once
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("transport/link/tx/lease", str(int(lease_ms)))
    return c


def router_config(listen: Sequence[str], lease_ms: int) -> zenoh.Config:
    c = zenoh.Config()
    c.insert_json5("mode", '"router"')
    c.insert_json5("listen/endpoints", json.dumps(list(listen)))
    c.insert_json5("connect/endpoints", "[]")
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("transport/link/tx/lease", str(int(lease_ms)))
    return c


def run_relay(listen: Sequence[str], lease_ms: int = 1000, *, stop: threading.Event | None = None,
              on_ready: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Serve as the swarm's router until ``stop`` is set (or SIGINT / SIGTERM when none is given)."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())  # type: ignore[union-attr]
    with zenoh.open(router_config(listen, lease_ms)):
        if on_ready is not None:
            on_ready()
        while not stop.wait(0.5):
            pass
