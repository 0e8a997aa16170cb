"""Errors of the swarm: each names the peer, stage, layers or message, and what to do."""

from __future__ import annotations


class SwarmError(RuntimeError):
    """Base class of the swarm's errors."""


class PeerLost(SwarmError):
    """A peer died, hung past its lease, or left while a request to it was in flight."""

    def __init__(self, peer: str, why: str) -> None:
        super().__init__(f"peer {peer} {why}")
        self.peer = peer


class PeerRefused(SwarmError):
    """A live peer answered a request with an error (a bug or a version mismatch, not a failure)."""


class StageLost(SwarmError):
    """No live peer holds a stage's layers: neither its holder nor its copy survived."""


class WireError(SwarmError):
    """A message is malformed, too large, or of an unknown kind; ``reason`` names which (:mod:`.guard`)."""

    def __init__(self, text: str, reason: str = "malformed") -> None:
        super().__init__(text)
        self.reason = reason
