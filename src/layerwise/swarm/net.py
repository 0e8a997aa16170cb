"""The zenoh side: session configuration, key names, and a request that fails fast.

Peers run in zenoh's peer mode with gossip scouting from the seed endpoints (multicast scouting
is off unless asked for, so swarms on one host or LAN never join each other by accident). Every
node sets the transport lease, because that is what bounds how long a hung (SIGSTOPped) peer goes
unnoticed: zenoh closes its link after the lease and the in-flight request ends with no reply.
Failure shows as an empty reply list, not an exception (see ../shared/ANCHORS.md), so
:meth:`Node.request` turns "no reply" into :class:`PeerLost`.

With an identity (``--identity DIR``) every link is mutual TLS against the swarm's CA (``tls/``
endpoints only) and every request goes through the signed hello and MAC of :mod:`.access`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zenoh

from .errors import PeerLost, PeerRefused, SwarmError
from .wire import MAX_MESSAGE, Message, decode_message, encode_message

if TYPE_CHECKING:
    from .access_client import Client
    from .identity import Identity

DEFAULT_LEASE_MS = 1000
# Idle TCP connections that never start a zenoh handshake each hold one of ``accept_pending``
# slots (zenoh default 100) for ``accept_timeout`` (default 10 s): 150 of them blocked every new
# session for 11 s here. With 4096 slots freed after 2 s, an attacker needs over 2000 new
# connections a second to shut a peer's door (5000 idle ones still did: 22 s), see guard.py.
ACCEPT_PENDING = 4096
ACCEPT_TIMEOUT_MS = 2000


def config(*, listen: Sequence[str] = (), connect: Sequence[str] = (), lease_ms: int = DEFAULT_LEASE_MS,
           multicast: bool = False, identity: Identity | None = None,
           relay: Sequence[str] = ()) -> zenoh.Config:  # fmt: skip
    if relay:  # behind NAT: a client of the relay, which carries everything (relay.py)
        from .relay import client_config

        return client_config(relay, lease_ms, identity)
    listen = list(listen) or [f"{'tls' if identity else 'tcp'}/127.0.0.1:0"]
    c = base_config("peer", listen=listen, connect=connect, lease_ms=lease_ms, identity=identity, multicast=multicast)
    c.insert_json5("scouting/gossip/enabled", "true")
    return c


def base_config(mode: str, *, listen: Sequence[str], connect: Sequence[str], lease_ms: int,
                identity: Identity | None, multicast: bool = False) -> zenoh.Config:  # fmt: skip
    """What every process of a swarm sets, peer or relay: endpoints, the lease, the accept limits, TLS."""
    c = zenoh.Config()
    c.insert_json5("mode", json.dumps(mode))
    c.insert_json5("listen/endpoints", json.dumps(list(listen)))
    c.insert_json5("connect/endpoints", json.dumps(list(connect)))
    c.insert_json5("scouting/multicast/enabled", "true" if multicast else "false")
    c.insert_json5("transport/link/tx/lease", str(int(lease_ms)))
    c.insert_json5("transport/unicast/accept_pending", str(ACCEPT_PENDING))
    c.insert_json5("transport/unicast/accept_timeout", str(ACCEPT_TIMEOUT_MS))
    if identity is not None:
        tls_config(c, str(identity.dir))
    return c


def open_session(cfg: zenoh.Config, who: str, relay: Sequence[str] = (), identity: Identity | None = None) -> zenoh.Session:
    """``zenoh.open``, but a client that reaches none of its relays gets one line naming itself.

    A relay's mutual TLS refuses another swarm's certificate (or none) in silence, like a peer; a
    client then waits out zenoh's connect timeout and fails with no reason (see relay.py)."""
    try:
        return zenoh.open(cfg)
    except zenoh.ZError as e:
        if not relay:
            raise
        how = (f"its certificate ({identity.name}) is not of the relay's swarm CA, or expired, or the relay has no "
               f"certificate of this swarm" if identity is not None else
               "a relay that runs with --identity refuses processes without one")  # fmt: skip
        first = str(e).split(" at /")[0]
        raise SwarmError(f"{who}: reached no relay at {', '.join(relay)} ({first}): {how}; or no relay listens "
                         f"there") from None  # fmt: skip


def tls_config(c: zenoh.Config, identity_dir: str) -> None:
    """Mutual TLS on every link, against the swarm CA in ``identity_dir`` (zenoh 1.10 keys).

    The certificates name processes, not hosts, so the listener's host name is not checked
    (``verify_name_on_connect``); the CA pins who may link. A link closes when the other side's
    certificate expires. Only ``tls`` links: gossip cannot open a plain one around it.
    """
    tls = {"root_ca_certificate": f"{identity_dir}/ca.pem", "enable_mtls": True,
           "listen_certificate": f"{identity_dir}/cert.pem", "listen_private_key": f"{identity_dir}/key.pem",
           "connect_certificate": f"{identity_dir}/cert.pem", "connect_private_key": f"{identity_dir}/key.pem",
           "verify_name_on_connect": False, "close_link_on_expiration": True}  # fmt: skip
    c.insert_json5("transport/link/tls", json.dumps(tls))
    c.insert_json5("transport/link/protocols", '["tls"]')


def alive_key(swarm: str, peer: str = "*") -> str:
    return f"lw/{swarm}/alive/{peer}"


def peer_key(swarm: str, peer: str) -> str:
    return f"lw/{swarm}/peer/{peer}"


def trainer_key(swarm: str) -> str:
    return f"lw/{swarm}/trainer"


class Node:
    """One zenoh session; ``request`` sends a message to a peer and waits for its one reply."""

    def __init__(self, session: zenoh.Session, swarm: str, auth: Client | None = None) -> None:
        self.session = session
        self.swarm = swarm
        self.auth = auth  # with an identity: the signed hello and a MAC on every request (access.py)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_by_kind: dict[str, int] = {}  # request kind -> bytes sent and received (bench/trust)

    def request(self, peer: str, msg: Message, timeout: float = 120.0, key: str | None = None,
                limit: int = MAX_MESSAGE) -> Message:  # fmt: skip
        data = encode_message(msg)
        self.bytes_sent += len(data)
        self.bytes_by_kind[msg.kind] = self.bytes_by_kind.get(msg.kind, 0) + len(data)
        if self.auth is not None:
            return self.auth.request(self, peer, key or peer_key(self.swarm, peer), key is None, msg, data, timeout,
                                     limit)  # fmt: skip
        return self.exchange(peer, key or peer_key(self.swarm, peer), msg, data, timeout, limit=limit)

    def exchange(self, peer: str, key: str, msg: Message, data: bytes, timeout: float, attachment: bytes | None = None,
                 check: Callable[[bytes | None, bytes], bool] | None = None, limit: int = MAX_MESSAGE) -> Message:  # fmt: skip
        """One query, one decoded reply (at most ``limit`` bytes); ``check(attachment, payload)``
        filters replies (a MAC)."""
        # zenoh's own channel, drained here: a Python callback would make zenoh start a Python
        # thread per query while it holds the session's lock, and a peer's death (which closes
        # every query to it from zenoh's threads) could then deadlock on the GIL.
        replies = self.session.get(
            key, payload=data, timeout=timeout, congestion_control=zenoh.CongestionControl.BLOCK, attachment=attachment,
        )  # fmt: skip
        got: Message | None = None
        why, refused = "left (no reply)", False
        start = time.monotonic()
        for reply in replies:  # ends when the query is final: every reply in, the peer gone, or the timeout
            if reply.ok is None:
                why = f"failed: {reply.err.payload.to_string()[:200]}"
                continue
            raw = reply.ok.payload.to_bytes()
            self.bytes_received += len(raw)
            if check is not None and not check(_attachment(reply.ok), raw):
                why, refused = _unsealed(raw, peer)  # a refusal before any session, or an impostor
                continue
            self.bytes_by_kind[msg.kind] = self.bytes_by_kind.get(msg.kind, 0) + len(raw)
            if got is None:
                got = decode_message(raw, f"peer {peer}", limit)
        if got is None and refused:
            raise PeerRefused(f"peer {peer} {why}")
        if got is None:
            waited = time.monotonic() - start
            raise PeerLost(peer, f"{why} during {msg.describe()} after {waited:.2f} s")
        if got.kind == "error":
            raise PeerRefused(f"peer {peer} refused {msg.describe()}: {got.meta.get('error', '?')}")
        return got


def _attachment(sample: Any) -> bytes | None:
    att = sample.attachment
    return att.to_bytes() if att is not None else None


def _unsealed(raw: bytes, peer: str) -> tuple[str, bool]:
    try:
        m = decode_message(raw, f"peer {peer}", MAX_MESSAGE)
    except Exception:
        return "sent a reply without a valid MAC", False
    if m.kind == "error":
        return str(m.meta.get("error", "refused")), True
    return "sent a reply without a valid MAC (another process answering on its key?)", False
