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

**With mutual TLS** (``--identity DIR`` of a ``relay`` certificate, ``layerwise swarm invite NAME
--role relay``; ``tls/`` endpoints): the router accepts only links from certificates of the same
swarm CA, and its clients (``--identity`` + ``--relay tls/...``) accept only a router with one. TLS
ends at the router, which could read the messages; it cannot forge or alter them: the signed hello
and the MAC of :mod:`.access` run end to end between trainer and peer, through it. A ``relay``
certificate is good for nothing else (every process refuses it in a hello). zenoh has no
revocation list: the router links a revoked certificate of its CA, and the trainer and peers
refuse it in the hello as without a relay. The relay judges its own certificate at start against
the identity directory's ``crl.pem`` (a copy as of the invitation: replace it with the CA's newer
list to stop a revoked relay from starting again).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import zenoh

from .net import base_config, tls_config

if TYPE_CHECKING:
    from .identity import Identity

CONNECT_TIMEOUT_MS = 60_000  # a process started before its relay waits this long for it


def client_config(relay: Sequence[str], lease_ms: int, identity: Identity | None = None) -> zenoh.Config:
    """A zenoh client of the relay(s): connects out only; everything goes through the router."""
    c = zenoh.Config()
    c.insert_json5("mode", '"client"')
    c.insert_json5("connect/endpoints", json.dumps(list(relay)))
    c.insert_json5("connect/timeout_ms", str(CONNECT_TIMEOUT_MS))  # zenoh's client default: fail at once
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("transport/link/tx/lease", str(int(lease_ms)))
    if identity is not None:
        tls_config(c, str(identity.dir))
    return c


def router_config(listen: Sequence[str], lease_ms: int, identity: Identity | None = None) -> zenoh.Config:
    return base_config("router", listen=listen, connect=(), lease_ms=lease_ms, identity=identity)


def run_relay(listen: Sequence[str], lease_ms: int = 1000, *, identity: Identity | None = None,
              stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Serve as the swarm's router until ``stop`` is set (or SIGINT / SIGTERM when none is given)."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())  # type: ignore[union-attr]
    # RUST_LOG=warn shows each handshake its TLS refused ("received fatal alert ..."), though not from whom
    zenoh.try_init_log_from_env()
    with zenoh.open(router_config(listen, lease_ms, identity)):
        if on_ready is not None:
            on_ready()
        while not stop.wait(0.5):
            pass
