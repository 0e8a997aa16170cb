"""Swarm pieces without processes: the wire format, the assignment and the spec."""

from __future__ import annotations

import struct
from typing import Any
from pathlib import Path

import pytest
import torch

from layerwise.commands.swarm import format_status
from layerwise.swarm import checkpoint
from layerwise.swarm.assignment import PeerInfo, assign, relative_speeds, step_time, worth_moving
from layerwise.swarm.errors import SwarmError, WireError
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.wire import Message, decode_message, encode_message


def test_a_message_round_trips_with_many_tensors_of_mixed_dtypes() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, i + 1, generator=g) for i in range(69)] + [torch.arange(7)]
    msg = Message("install", step=4, stage=2, mb=-1, epoch=9, meta={"first": 3, "role": "copy"}, tensors=tensors)
    got = decode_message(encode_message(msg), "test")
    assert (got.kind, got.step, got.stage, got.mb, got.epoch, got.meta) == ("install", 4, 2, -1, 9, msg.meta)
    assert len(got.tensors) == len(tensors)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got.tensors, tensors))


def test_malformed_messages_are_refused_not_decoded() -> None:
    good = encode_message(Message("forward", 1, 0, 0, tensors=[torch.ones(4)]))
    with pytest.raises(WireError, match="over the limit"):
        decode_message(good, "peer x", limit=len(good) - 1)
    with pytest.raises(WireError, match="truncated"):
        decode_message(good[:10], "peer x")
    with pytest.raises(WireError, match="not layerwise"):
        decode_message(b"PICK" + good[4:], "peer x")
    with pytest.raises(WireError):
        decode_message(good[:-3], "peer x")  # payload shorter than its header says
    bad_kind = bytearray(good)
    struct.pack_into("<H", bad_kind, 6, 999)
    with pytest.raises(WireError, match="malformed"):
        decode_message(bytes(bad_kind), "peer x")
    with pytest.raises(WireError):
        encode_message(Message("exec"))


def test_spans_follow_speeds_and_every_stage_gets_a_copy_elsewhere() -> None:
    spec = SwarmSpec(blocks=6)
    peers = [PeerInfo(id="fast", speed=1.0, memory_bytes=1e12), PeerInfo(id="slow", speed=0.5, memory_bytes=1e12)]
    a = assign(spec, peers, epoch=1)
    counts = a.counts()
    assert sum(counts) == spec.layers and counts[0] > counts[1]  # the fast peer takes more layers
    assert all(s.copy is not None and s.copy != s.holder for s in a.stages)
    blind = assign(spec, [PeerInfo(id=p.id, speed=1.0, memory_bytes=1e12) for p in peers], epoch=1)
    speeds = {"fast": 1.0, "slow": 0.5}
    assert step_time(a, spec, speeds) < step_time(blind, spec, speeds)


def test_rebalancing_needs_a_real_gain() -> None:
    spec = SwarmSpec(blocks=4)
    peers = [PeerInfo(id=f"p{i}", speed=1.0, memory_bytes=1e12) for i in range(4)]
    three = assign(spec, peers[:3], epoch=1)
    four = assign(spec, peers, epoch=2, order=[s.holder for s in three.stages])
    assert worth_moving(three, four, spec, {}) and not worth_moving(four, four, spec, {})
    assert [s.holder for s in four.stages][:3] == [s.holder for s in three.stages]  # kept in place


def test_measured_speeds_are_rounded_so_noise_does_not_move_layers() -> None:
    assert relative_speeds({"a": 0.010, "b": 0.0105, "c": 0.021}) == {"a": 1.0, "b": 1.0, "c": 0.5}


def test_spec_is_validated_and_survives_json() -> None:
    spec = SwarmSpec(width=32, heads=2, batch_size=6, microbatches=3)
    assert SwarmSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="divide"):
        SwarmSpec(batch_size=7, microbatches=2)
    with pytest.raises(ValueError, match="not a swarm spec"):
        SwarmSpec.from_json({"width": 8, "__class__": "os.system"})


def test_a_checkpoint_round_trips_and_refuses_another_model(tmp_path: Path) -> None:
    spec = SwarmSpec(width=16, heads=2, blocks=1)
    g = torch.Generator().manual_seed(1)
    layers = [([torch.randn(4, 3, generator=g) for _ in range(3 * n)], 7) for n in (2, 3)]
    checkpoint.save(tmp_path, spec, layers, [5.0, 4.0, 3.5])
    got, losses = checkpoint.load(tmp_path, spec)
    assert checkpoint.last_step(tmp_path) == 7 and losses == [5.0, 4.0, 3.5]
    assert all(torch.equal(a, b) for (x, _), (y, _) in zip(layers, got) for a, b in zip(x, y))
    with pytest.raises(SwarmError, match="another model"):
        checkpoint.load(tmp_path, SwarmSpec(width=32, heads=2, blocks=1))
    assert checkpoint.last_step(tmp_path / "none") is None


def test_status_text_names_stages_copies_and_failures() -> None:
    got = {"swarm": "s", "peers": {"a": {"speed": 1.0, "spans": []}},
           "trainer": {"step": 4, "loss": 3.2, "steps_per_s": 2.5,
                       "stages": [{"stage": 0, "layers": [0, 5], "holder": "a", "copy": "b"}],
                       "failures": [{"peer": "c", "step": 2, "phase": "forward", "stages": [0]}]}}  # fmt: skip
    text = format_status(got)
    assert "stage 0 layers 0-5: a (copy b)" in text and "failure: c at step 2 (forward)" in text
    assert "no trainer" in format_status({"swarm": "s", "peers": {}, "trainer": None})


def _peer(memory_gib: float = 1.0) -> Any:
    from layerwise.swarm.peer import Peer, PeerOptions

    return Peer(PeerOptions(listen=("tcp/127.0.0.1:1",), name="t", memory_gib=memory_gib))


def _handle(peer: Any, msg: Message) -> Message:
    from layerwise.swarm.peer.server import _Refuse

    try:
        return peer.handle(msg)
    except _Refuse as e:
        return Message("error", meta={"error": str(e)})


def test_a_peer_refuses_stale_duplicate_and_oversized_work() -> None:
    spec = SwarmSpec(width=16, heads=2, blocks=2, seq=8, batch_size=4, microbatches=2)
    peer = _peer()
    meta = {"spec": spec.to_json(), "first": 0, "count": 2, "role": "holder"}
    assert _handle(peer, Message("install", stage=0, epoch=3, meta=meta)).kind == "ok"
    x = torch.randint(0, 256, (2, 8))
    assert _handle(peer, Message("forward", 0, 0, 0, 3, {"weight": 0.5}, [x])).kind == "ok"
    g = [torch.randn(2, 8, 16)]
    assert _handle(peer, Message("backward", 0, 0, 0, 3, tensors=g)).kind == "ok"
    dup = _handle(peer, Message("backward", 0, 0, 0, 3, tensors=g))
    assert dup.kind == "error" and "duplicate" in dup.meta["error"]
    early = _handle(peer, Message("forward", 1, 0, 1, 3, {"weight": 0.5}, [x]))
    assert early.kind == "error" and "stale or early" in early.meta["error"]
    stale = _handle(peer, Message("forward", 0, 0, 1, 2, {"weight": 0.5}, [x]))
    assert stale.kind == "error" and "stale assignment epoch 2" in stale.meta["error"]
    short = _handle(peer, Message("commit", 0, 0, -1, 3, {"lr": 1e-3, "microbatches": 2}))
    assert short.kind == "error" and "1 of 2 backwards" in short.meta["error"]
    assert _handle(peer, Message("forward", 0, 0, 1, 3, {"weight": 0.5}, [x])).kind == "ok"
    assert _handle(peer, Message("backward", 0, 0, 1, 3, tensors=g)).kind == "ok"
    first = _handle(peer, Message("commit", 0, 0, -1, 3, {"lr": 1e-3, "microbatches": 2}))
    again = _handle(peer, Message("commit", 0, 0, -1, 3, {"lr": 1e-3, "microbatches": 2}))
    assert first.meta == {"already": False} and len(first.tensors) == len(peer.spans[0].params)
    assert again.meta == {"already": True} and peer.spans[0].step == 1  # applied once
    big = _handle(_peer(1e-6), Message("install", stage=0, epoch=1, meta=meta))
    assert big.kind == "error" and "memory budget" in big.meta["error"]


def test_swarm_train_says_a_lost_peer_and_new_spans_when_they_happen() -> None:
    from types import SimpleNamespace

    from layerwise.commands.swarm import news
    from layerwise.swarm.assignment import Assignment, StageSpan
    from layerwise.swarm.trainer.options import Failure

    a = (StageSpan(stage=0, first=0, count=3, holder="p1", copy="p2"), StageSpan(stage=1, first=3, count=3, holder="p2", copy="p1"))
    tr = SimpleNamespace(failures=[], assignment=Assignment(epoch=1, stages=a))
    seen: dict = {"failures": 0, "spans": None}
    assert news(tr, seen) == ["spans: stage 0 layers 0-2 on p1 (copy on p2), stage 1 layers 3-5 on p2 (copy on p1)"]
    assert news(tr, seen) == []  # nothing new: nothing said
    tr.failures.append(Failure(peer="p2", step=7, phase="backward", noticed_at=100.0, left_at=99.9,
                               stages=[1], recovered_at=100.15))  # fmt: skip
    tr.assignment = Assignment(epoch=1, stages=(a[0], StageSpan(stage=1, first=3, count=3, holder="p1", copy=None)))
    assert news(tr, seen) == ["peer p2 lost at step 7 (backward); stages [1]: recovered in 0.25 s, no step lost",
                              "spans: stage 0 layers 0-2 on p1 (copy on p2), stage 1 layers 3-5 on p1 (no copy)"]
    assert news(tr, seen) == []


def test_a_failure_records_every_phase_it_interrupted() -> None:
    from types import SimpleNamespace

    from layerwise.commands.swarm import news
    from layerwise.swarm.assignment import Assignment, StageSpan
    from layerwise.swarm.trainer.options import Failure

    # First seen as a copy (relay), then failing stage 0's backward, then stage 5's commit.
    f = Failure(peer="p3", step=6, phase="relay", noticed_at=1.0, left_at=None)
    f.interrupted("backward", 0)
    f.interrupted("commit", 5)
    f.interrupted("commit", 5)
    assert (f.phase, f.phases, f.stages) == ("backward", ["backward", "commit"], [0, 5])
    f.recovered_at = 1.5
    a = (StageSpan(stage=0, first=0, count=3, holder="p1", copy=None),)
    tr = SimpleNamespace(failures=[f], assignment=Assignment(epoch=1, stages=a))
    assert news(tr, {"failures": 0, "spans": None})[0] == (
        "peer p3 lost at step 6 (backward, commit); stages [0, 5]: recovered in 0.50 s, no step lost")
