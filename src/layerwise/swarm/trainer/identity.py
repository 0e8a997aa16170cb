"""The trainer's side of identity and access: its certificate, who it refused, and revocations.

Kept apart from :mod:`.trainer` so that the run's logic does not change with ``--identity``:
:class:`TrainerIdentity` opens the identity, judges each peer at its first hello (through the
:class:`~layerwise.swarm.access_client.Client` of the trainer's :class:`~layerwise.swarm.net.Node`),
and at every step boundary re-reads the revocation list: a revoked peer is banned from the
membership, so the trainer treats it as a peer that died (its stages move to their copies).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..access import Guard, Refusals
from ..access_client import Client
from ..identity import Identity, Refused
from ..membership import Membership
from ..net import peer_key
from ..wire import Message
from .options import TrainerOptions

if TYPE_CHECKING:
    from .trainer import Trainer

COLLECT_S = 5.0  # how often the trainer asks its peers whom they refused (one small request each)


class TrainerIdentity:
    def __init__(self, opts: TrainerOptions) -> None:
        self.swarm = opts.swarm
        self.identity = Identity(opts.identity, opts.crl) if opts.identity else None
        if self.identity is not None and self.identity.role != "trainer":
            raise Refused(self.identity.name, f"--identity {opts.identity} holds a {self.identity.role} certificate; "
                                              f"train needs a trainer one (layerwise swarm invite NAME --role trainer)")  # fmt: skip
        self.client = Client(self.identity) if self.identity else None
        self.guard = Guard(self.identity) if self.identity else None  # for the trainer's status queryable
        self.refusals: Refusals = self.client.refusals if self.client else Refusals()
        self.by_peers: dict[str, list[dict[str, Any]]] = {}  # what each peer refused, as it last said
        self._collected = 0.0

    def at_boundary(self, tr: Trainer) -> None:
        """Revocations first (a revoked peer is then gone for the boundary's recovery), then, every
        few seconds, the peers' own refusals (a peer certificate that tried trainer-only work)."""
        if self.identity is None:
            return
        self.check_revocations(tr.membership)
        if time.monotonic() - self._collected < COLLECT_S:
            return
        self._collected = time.monotonic()
        for peer in sorted({p.id for p in tr.peers()}):
            try:
                got = tr.node.request(peer, Message("status"), timeout=tr.opts.lease_ms / 1000 + 1)
            except Exception:  # a peer that died meanwhile is the failure path's business, not ours
                continue
            self.by_peers[peer] = [dict(r, by=peer) for r in got.meta.get("refused", [])]

    def refused(self, peer: str, err: Refused) -> None:
        self.refusals.add(err.name if err.name not in ("(unknown)", "") else peer, err.why)

    def check_revocations(self, membership: Membership) -> list[str]:
        """Re-read the revocation list; ban peers whose certificate it revokes. Returns them."""
        if self.identity is None or self.client is None or not self.identity.refresh():
            return []
        banned = []
        for key, serial in self.client.serials().items():
            if serial in self.identity.revoked:
                peer = key.rsplit("/", 1)[-1]
                membership.ban(peer)
                self.refusals.add(peer, f"certificate revoked (serial {serial:x}) during the run; its stages move "
                                        f"to their copies")  # fmt: skip
                banned.append(peer)
        self.client.forget()  # the next hellos carry the new list to every peer
        return banned

    def hint(self) -> str:
        """Why peers may be missing with identities: TLS refusals never reach this process."""
        if self.identity is None:
            return ""
        return (f" --identity DIR (a peer certificate of the same CA as {self.identity.name}'s); mutual TLS refuses "
                f"other certificates in silence: a refused peer logs 'linked to no process'")  # fmt: skip

    def identity_of(self, peer: str) -> str | None:
        if self.client is None:
            return None
        sess = self.client.session_for(peer_key(self.swarm, peer))
        return sess[2] if sess else None

    def status(self) -> dict[str, Any]:
        mine = [dict(r, by="trainer") for r in self.refusals.list()]
        if self.guard is not None:
            mine += [dict(r, by="trainer") for r in self.guard.refusals.list()]
        out: dict[str, Any] = {"refused": sorted(mine + [r for v in self.by_peers.values() for r in v],
                                                 key=lambda r: r["at"])[-100:]}  # fmt: skip
        if self.identity is not None:
            out["identity"] = self.identity.name
        return out
