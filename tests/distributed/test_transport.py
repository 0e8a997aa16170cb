"""The transports: garbage is refused (a protocol error, not a lost peer); the shared-memory
transport reuses and grows its slots and leaves nothing behind."""

from __future__ import annotations

import glob

import pytest

import layerwise

from .workers import garbage_header, pipeline_prefix, shm_garbage_route, shm_messages, shm_wrong_tag

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def test_messages_of_changing_size_arrive_intact_and_slots_are_reused() -> None:
    # grows past a slot (64 KiB = 16384 floats), shrinks, grows again: 24 messages
    sizes = [100, 5000, 20000, 300, 70000, 12, 70000, 1, 40000] * 2 + [0, 3, 0, 100000, 8, 9]
    sender, receiver = layerwise.launch(shm_messages, 2, sizes, timeout=120)
    assert receiver["ok"] == [True] * len(sizes)
    # every message got a slot (none fell back), yet far fewer slots than messages exist
    assert 2 <= sender["slots"] <= 5, sender
    assert max(sender["sizes"]) >= 100000 * 4
    assert glob.glob(sender["prefix"] + "*") == [], "the receiver unlinks every slot it maps"


def test_a_route_to_a_missing_slot_is_a_protocol_error_naming_the_peer() -> None:
    _, text = layerwise.launch(shm_garbage_route, 2, timeout=120)
    assert text.startswith("rank 0 named a shared-memory slot this rank cannot open"), text
    assert "transport='dist'" in text


def test_auto_uses_shared_memory_on_one_host_and_cleans_up() -> None:
    prefixes = layerwise.launch(pipeline_prefix, 2, timeout=120)
    assert prefixes[0] is not None and prefixes[0] == prefixes[1]
    assert prefixes[0].startswith("/dev/shm/layerwise-")
    assert glob.glob(prefixes[0] + "*") == []


@pytest.mark.parametrize("kind", ["dist", "shm"])
def test_a_garbage_header_is_a_protocol_error_naming_the_peer(kind: str) -> None:
    _, text = layerwise.launch(garbage_header, 2, kind, timeout=120)
    assert text.startswith("rank 0 sent an invalid message header (wrong magic number)"), text


def test_a_message_out_of_schedule_order_is_a_protocol_error() -> None:
    _, text = layerwise.launch(shm_wrong_tag, 2, timeout=120)
    assert text.startswith("rank 0 sent message 5 where this rank expected 0"), text
    assert "different schedules" in text
