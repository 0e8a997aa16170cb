"""The shared-memory transport's slot bookkeeping and route checks, without processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from layerwise.runtime import shm
from layerwise.runtime.errors import ProtocolError
from layerwise.runtime.wire import HEADER_SLOTS, ROUTE, decode_header, encode, flatten


def _transport(tmp_path: Path) -> shm.ShmTransport:
    t = object.__new__(shm.ShmTransport)  # no process group: only the bookkeeping is exercised
    t.rank = 0
    t.prefix = str(tmp_path / "layerwise-test")
    t._rings, t._mapped, t._created = {}, {}, set()
    t._describe = lambda r: f"rank {r}"
    read, write = os.pipe()
    os.set_blocking(read, False)
    t._ack_in, t._ack_out = {0: read}, {0: write}  # the receiver's acknowledgements, by hand
    return t


def _send(t: shm.ShmTransport, ring: shm._Ring, n: int) -> int:
    """What send() does with the ring, minus the header pipe."""
    i = t._slot_for(ring, 0, n)
    assert i != shm._INLINE
    ring.slots[i].last_seq = ring.seq
    ring.seq += 1
    return i


def _ack(t: shm.ShmTransport) -> None:
    os.write(t._ack_out[0], b"\x01")  # the receiver copied the oldest unacknowledged message out


def test_a_slot_is_reused_only_once_its_message_was_acknowledged(tmp_path: Path) -> None:
    t = _transport(tmp_path)
    ring = shm._Ring()
    a = _send(t, ring, 1000)
    b = _send(t, ring, 1000)
    assert a != b  # message 0 is unread
    _ack(t)  # message 0 copied out: its slot is free
    c = _send(t, ring, 1000)
    assert c == a and ring.consumed == 1
    d = _send(t, ring, 1000)
    assert d not in (a, b)  # messages 1 and 2 are unread
    _ack(t)
    _ack(t)  # messages 1 and 2 copied out: slots a and b are free, message 3 (slot d) is not
    assert _send(t, ring, 1000) == a and ring.consumed == 3 and len(ring.slots) == 3
    assert _send(t, ring, 1000) == b


def test_a_free_slot_too_small_is_replaced_by_a_larger_generation(tmp_path: Path) -> None:
    t = _transport(tmp_path)
    ring = shm._Ring()
    a = _send(t, ring, 10)
    _send(t, ring, 10)
    _ack(t)  # slot a is free again, but 64 KiB is too small for the next message
    c = _send(t, ring, 200_000)
    assert c == a and ring.slots[a].gen == 1 and ring.slots[a].size >= 200_000
    assert sorted(os.path.basename(p) for p in t._created) == ["layerwise-test-0-0-0-0", "layerwise-test-0-0-0-1",
                                                               "layerwise-test-0-0-1-0"]  # fmt: skip


def test_no_slot_left_means_the_process_group_carries_the_payload(tmp_path: Path, monkeypatch: Any) -> None:
    t = _transport(tmp_path)
    ring = shm._Ring()
    monkeypatch.setattr(shm, "MAX_SLOTS", 1)
    _send(t, ring, 10)
    assert t._slot_for(ring, 0, 10) == shm._INLINE
    t2 = _transport(tmp_path / "missing")  # a folder that does not exist: creating a slot fails
    assert t2._slot_for(shm._Ring(), 0, 10) == shm._INLINE


def test_the_receiver_maps_a_slot_once_and_unlinks_it(tmp_path: Path) -> None:
    sender, receiver = _transport(tmp_path), _transport(tmp_path)
    ring = shm._Ring()
    i = _send(sender, ring, 100)
    sender._rings[0] = ring
    payload = torch.arange(25, dtype=torch.float32).view(torch.uint8)
    ring.slots[i].buf[:100].copy_(payload)
    view = receiver._slot_view(0, 0, i, 0, ring.slots[i].size, 100)
    assert torch.equal(view[:100], payload)
    assert not os.path.exists(sender._path(0, 0, i, 0)), "mapped once by both: unlinked"
    assert receiver._slot_view(0, 0, i, 0, ring.slots[i].size, 100) is view  # cached


@pytest.mark.parametrize(
    "route, why",
    [((-2, 0, 1 << 16), "invalid shared-memory route"), ((shm.MAX_SLOTS, 0, 1 << 16), "invalid shared-memory route"),
     ((0, -1, 1 << 16), "invalid shared-memory route"), ((0, 0, 10), "invalid shared-memory route"),
     ((0, 0, 1 << 40), "invalid shared-memory route"), ((3, 0, 1 << 16), "cannot open")],
)  # fmt: skip
def test_a_bad_route_is_a_protocol_error_naming_the_peer(tmp_path: Path, route: tuple[int, int, int], why: str) -> None:
    t = _transport(tmp_path)
    with pytest.raises(ProtocolError, match=why) as info:
        t._slot_view(1, 0, *route, nbytes=100)
    assert str(info.value).startswith("rank 1 ")


def test_a_slot_file_smaller_than_announced_is_refused(tmp_path: Path) -> None:
    t = _transport(tmp_path)
    with open(t._path(1, 0, 0, 0), "wb") as f:
        f.write(b"\0" * 100)
    with pytest.raises(ProtocolError, match="smaller than its message"):
        t._slot_view(1, 0, 0, 0, 1 << 16, 100)


def test_close_removes_the_slots_nobody_mapped(tmp_path: Path) -> None:
    t = _transport(tmp_path)
    ring = shm._Ring()
    _send(t, ring, 10)
    _send(t, ring, 10)
    t.close()
    assert list(tmp_path.iterdir()) == []


def test_the_message_description_never_uses_the_transport_slots() -> None:
    tensors = [torch.randn(2) for _ in range((ROUTE - 6) // 3)]  # as many as fit
    header, _ = encode(tensors, flatten(tuple(tensors))[1])
    assert header[ROUTE:].tolist() == [0] * (HEADER_SLOTS - ROUTE)
    header[ROUTE : ROUTE + 3] = torch.tensor([5, 7, 1 << 16])  # set by the transport
    assert len(decode_header(header, "rank 0").shapes) == len(tensors)


def test_an_unknown_transport_is_refused_before_any_communication() -> None:
    with pytest.raises(ValueError, match="'auto', 'shm' or 'dist'"):
        shm.make_transport("tcp", None, str, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CPU tensors"):
        shm.make_transport("shm", None, str, torch.device("meta"))


def test_host_key_is_stable_and_non_negative() -> None:
    assert shm.host_key() == shm.host_key() >= 0
