"""The transport interface stages talk through, and its torch.distributed implementation.

The runtime only ever calls :class:`Transport`, so a later P2P mode can carry the same stages and
schedules over a network transport. Sends are posted without blocking; receives block. This is the
semantics the schedule validator checks for deadlock freedom.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .errors import PeerLostError
from .wire import HEADER_SLOTS, Structure, decode_header, decode_payload, encode


class Transport(Protocol):
    rank: int
    world_size: int

    def send(self, tensors: list[torch.Tensor], structure: Structure, dst: int, tag: int) -> None:
        """Post a message to rank ``dst``; returns at once."""

    def recv(self, src: int, tag: int) -> tuple[list[torch.Tensor], Structure]:
        """Block until the message with ``tag`` from rank ``src`` arrives."""

    def flush(self) -> None:
        """Wait until every posted send has completed."""


class DistTransport:
    """Point-to-point over a torch.distributed process group (gloo on CPU, NCCL on GPU).

    Each message is two transfers (header, payload) under tags derived from the action, so
    messages between the same pair of ranks cannot be confused even when the sender and the
    receiver post them in different orders (gloo matches by tag).
    """

    def __init__(self, group: Any, describe_rank: Any, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._describe = describe_rank
        self._device = device
        self._pending: list[tuple[Any, torch.Tensor, torch.Tensor]] = []

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def send(self, tensors: list[torch.Tensor], structure: Structure, dst: int, tag: int) -> None:
        header, payload = encode(tensors, structure)
        header = header.to(self._device)
        peer = self._global(dst)
        try:
            w1 = dist.isend(header, peer, group=self.group, tag=2 * tag)
            w2 = dist.isend(payload, peer, group=self.group, tag=2 * tag + 1)
        except RuntimeError as e:
            raise self._lost(dst, "sending to", e) from None
        self._pending.append((w1, header, payload))
        self._pending.append((w2, header, payload))

    def recv(self, src: int, tag: int) -> tuple[list[torch.Tensor], Structure]:
        peer = self._global(src)
        header = torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self._device)
        try:
            dist.recv(header, peer, group=self.group, tag=2 * tag)
            meta = decode_header(header.cpu(), self._describe(src))
            payload = torch.empty(meta.nbytes, dtype=torch.uint8, device=self._device)
            if meta.nbytes:
                dist.recv(payload, peer, group=self.group, tag=2 * tag + 1)
            else:  # zero-byte messages are still sent so that tags stay paired
                dist.recv(torch.empty(0, dtype=torch.uint8, device=self._device), peer, group=self.group, tag=2 * tag + 1)
        except RuntimeError as e:
            raise self._lost(src, "receiving from", e) from None
        return decode_payload(meta, payload), meta.structure

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for work, _, _ in pending:
            try:
                work.wait()
            except RuntimeError as e:
                raise self._lost(None, "completing a send", e) from None

    def _lost(self, peer: int | None, doing: str, err: BaseException) -> PeerLostError:
        who = self._describe(peer) if peer is not None else "a peer"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first).split(". This is")[0]
        return PeerLostError(
            f"{self._describe(self.rank)}: lost {who} while {doing} it ({first}). "
            f"{who[0].upper() + who[1:]} probably failed or hung: look for its own error; "
            f"the timeout that bounds this wait is Pipeline(timeout=...)."
        )


def default_timeout(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
