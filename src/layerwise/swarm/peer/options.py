"""What a peer is started with (``layerwise swarm serve``): its options, identity and test hook, checked at once."""

from __future__ import annotations

from dataclasses import dataclass

from ..access import Guard
from ..identity import Identity
from ..wire import MAX_MESSAGE
from .fault import parse_tamper


@dataclass(frozen=True, kw_only=True)
class PeerOptions:
    swarm: str = "layerwise"  # the swarm's name: peers and trainers of one swarm share it
    join: tuple[str, ...] = ()  # seed endpoints to connect to
    listen: tuple[str, ...] = ()  # endpoints to listen on (default: a free port on 127.0.0.1)
    name: str | None = None  # peer id; default host-pid-random
    memory_gib: float | None = None  # memory budget; default half the machine's RAM
    speed: float = 1.0  # emulated speed: 0.5 makes every compute take twice as long
    latency_ms: float = 0.0  # emulated one-way latency added to every request and reply
    bandwidth_mbit: float | None = None  # emulated link cap for this peer's traffic
    lease_ms: int = 1000  # zenoh link lease: a hung peer is dropped after about this long
    threads: int = 1  # torch threads
    max_message: int = MAX_MESSAGE
    identity: str | None = None  # an identity directory: mutual TLS and the signed hello (access.py)
    crl: str | None = None  # a revocation list file to re-read (default: the identity's crl.pem)
    fault: str = ""  # MODE:P, e.g. corrupt:0.05: lie in a fraction P of outputs (see .fault)
    relay: tuple[str, ...] = ()  # relays (zenoh routers) to connect out to, as a zenoh client (relay.py)

    def __post_init__(self) -> None:
        parse_tamper(self.fault)  # raises ValueError on a bad --fault
        if self.max_message < 1 << 16:
            raise ValueError(f"--max-message must be at least 64 KiB, got {self.max_message} bytes")
        if not self.speed > 0:
            raise ValueError(f"--speed must be > 0 (1.0 = full speed), got {self.speed}")
        if self.memory_gib is not None and not self.memory_gib > 0:
            raise ValueError(f"--memory must be > 0 GiB, got {self.memory_gib}")
        if self.latency_ms < 0 or (self.bandwidth_mbit is not None and not self.bandwidth_mbit > 0):
            raise ValueError("--latency-ms must be >= 0 and --bandwidth-mbit > 0")
        if not self.join and not self.listen and not self.relay:
            raise ValueError("a peer needs --join ENDPOINT (or --listen ENDPOINT for the first process of a swarm)")



def identity_of(opts: PeerOptions) -> tuple[Identity | None, Guard | None]:
    if opts.identity is None:
        return None, None
    ident = Identity(opts.identity, opts.crl)
    if ident.role != "peer":
        raise ValueError(f"--identity {opts.identity} holds a {ident.role} certificate; serve needs a peer one")
    if opts.name is not None and opts.name != ident.name:
        raise ValueError(f"--name {opts.name} differs from the certificate's name {ident.name!r}: leave --name out")
    return ident, Guard(ident)


def parse_fault_hook(text: str) -> tuple[str, str, int | None, int | None] | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("kill", "stop"):
        raise ValueError(f"LAYERWISE_SWARM_FAULT={text!r}: expected kill|stop:KIND:STEP:MICROBATCH")
    return parts[0], parts[1], None if parts[2] == "*" else int(parts[2]), None if parts[3] == "*" else int(parts[3])
