"""The transport interface stages talk through, and its torch.distributed implementation.

The runtime only ever calls :class:`Transport`, so a later P2P mode can carry the same stages and
schedules over a network transport. Sends are posted without blocking; receives block. This is the
semantics the schedule validator checks for deadlock freedom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .distributed import to_global
from .errors import PeerLostError, PipelineError
from .wire import HEADER_SLOTS, Structure, decode_header, decode_payload, encode


class Transport(Protocol):
    rank: int
    world_size: int

    def send(self, tensors: list[torch.Tensor], structure: Structure, dst: int, tag: int, channel: int) -> None:
        """Post a message to rank ``dst``; returns at once."""

    def post_recv(self, src: int, tag: int, channel: int) -> Any:
        """Post a receive now (so data can land while this rank computes); returns a handle."""

    def wait_recv(self, handle: Any) -> tuple[list[torch.Tensor], Structure]:
        """Block until the posted receive has its message."""

    def flush(self) -> None:
        """Wait until every posted send has completed."""


@dataclass
class _Posted:
    """A receive posted ahead of its action."""

    src: int
    tag: int
    channel: int
    capacity: int
    header: torch.Tensor
    buf: torch.Tensor
    works: list[Any]


class DistTransport:
    """Point-to-point over a torch.distributed process group (gloo on CPU, NCCL on GPU).

    gloo moves a message only once both sides have posted it, and a receive buffer must be at
    least as large as the message. Receiving the header first and only then posting the payload
    would cost two such rendezvous per message, the second one often waiting for a sender busy
    computing. So each channel (one stage boundary, one direction; messages on it arrive in the
    order sent, which the schedule validator checks) keeps a capacity that sender and receiver
    update identically: the receiver posts the header and a payload buffer of that capacity
    together, one rendezvous. A message larger than the capacity is the slow path: an empty
    message on the payload tag, then the real payload on a third tag; both sides then grow the
    capacity to its size.
    """

    def __init__(self, group: Any, describe_rank: Any, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._describe = describe_rank
        self._device = device
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self._capacity: dict[int, int] = {}  # channel -> payload bytes the receiver posts

    def send(self, tensors: list[torch.Tensor], structure: Structure, dst: int, tag: int, channel: int) -> None:
        header, payload = encode(tensors, structure)
        header = header.to(self._device)
        peer = to_global(self.group, dst)
        cap = self._capacity.get(channel, 0)
        parts = [(header, 3 * tag)]
        if payload.numel() <= cap:
            parts.append((payload, 3 * tag + 1))
        else:
            empty = torch.empty(0, dtype=torch.uint8, device=self._device)
            parts += [(empty, 3 * tag + 1), (payload, 3 * tag + 2)]
            self._capacity[channel] = payload.numel()
        try:
            for t, t_tag in parts:
                self._pending.append((dist.isend(t, peer, group=self.group, tag=t_tag), t))
        except RuntimeError as e:
            raise self._lost(dst, "sending to", e) from None

    def post_recv(self, src: int, tag: int, channel: int) -> _Posted:
        """Post the header and a payload buffer of the channel's capacity, both at once.

        Post a channel's next receive only after its previous one completed: the capacity must
        be the one the sender will use for this message.
        """
        cap = self._capacity.get(channel, 0)
        header = torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self._device)
        buf = torch.empty(cap, dtype=torch.uint8, device=self._device)
        peer = to_global(self.group, src)
        try:
            works = [
                dist.irecv(header, peer, group=self.group, tag=3 * tag),
                dist.irecv(buf, peer, group=self.group, tag=3 * tag + 1),
            ]
        except RuntimeError as e:
            raise self._lost(src, "receiving from", e) from None
        return _Posted(src, tag, channel, cap, header, buf, works)

    def wait_recv(self, posted: _Posted) -> tuple[list[torch.Tensor], Structure]:
        src, peer = posted.src, to_global(self.group, posted.src)
        try:
            for w in posted.works:
                w.wait()
            meta = decode_header(posted.header.cpu(), self._describe(src))
            if meta.nbytes <= posted.capacity:
                payload = posted.buf[: meta.nbytes]
            else:  # the slow path: the message outgrew the channel's buffer
                payload = torch.empty(meta.nbytes, dtype=torch.uint8, device=self._device)
                dist.recv(payload, peer, group=self.group, tag=3 * posted.tag + 2)
                self._capacity[posted.channel] = meta.nbytes
        except PipelineError:  # a malformed message: not a lost peer
            raise
        except RuntimeError as e:
            raise self._lost(src, "receiving from", e) from None
        return decode_payload(meta, payload), meta.structure

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for work, _ in pending:
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

