"""Replicas, ties and the two-phase commit without processes: the assignment, the tie names, and a
peer's gradient groups driven through :meth:`Peer.handle` (no zenoh session)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from layerwise.models import lm_loss
from layerwise.swarm.assignment import PeerInfo, assign, step_time, worth_moving
from layerwise.swarm.peer.server import Peer, PeerOptions
from layerwise.swarm.spec import SwarmSpec, build_layers
from layerwise.swarm.ties import cross_ties, span_names, ties
from layerwise.swarm.wire import Message

SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)


def _peers(n: int, speed: float = 1.0) -> list[PeerInfo]:
    return [PeerInfo(id=f"p{i}", speed=speed, memory_bytes=1e12) for i in range(n)]


def test_spare_peers_become_replicas_of_the_slowest_stage() -> None:
    a = assign(SPEC, _peers(4), epoch=1, max_stages=2)
    assert [s.count for s in a.stages] == [3, 3]  # embedding + 2 blocks | 2 blocks + head (the slower)
    assert a.stages[1].replicas == ("p2",) and a.stages[0].replicas == ("p3",)  # then stage 0 is the slower
    assert all(s.copy is None and s.safe for s in a.stages)  # replicas back each other up
    one = assign(SPEC, _peers(2), epoch=1, max_stages=2)
    speeds = dict.fromkeys(a.peers(), 1.0)
    assert step_time(a, SPEC, speeds) == pytest.approx(step_time(one, SPEC, speeds) / 2)
    many = assign(SPEC, _peers(12), epoch=1, max_stages=2)
    assert all(len(s.slots) <= SPEC.microbatches for s in many.stages)  # a replica per microbatch at most


def test_a_replicated_stage_served_twice_by_one_peer_is_not_moved_for_nothing() -> None:
    a = assign(SPEC, _peers(3), epoch=1, max_stages=2)
    assert a.stages[1].slots == ("p1", "p2")
    doubled = replace(a, stages=(a.stages[0], replace(a.stages[1], replicas=("p1",))))  # p2 died, p1 took its slot
    assert not doubled.stages[1].safe
    proposed = assign(SPEC, _peers(2), epoch=2, max_stages=2)
    assert worth_moving(doubled, proposed, SPEC, {})  # safety first: the stage has one live peer
    copied = replace(doubled, stages=(doubled.stages[0], replace(doubled.stages[1], copy="p0")))
    assert not worth_moving(copied, proposed, SPEC, {})  # the same time per step: keep the groups


def test_tied_embeddings_are_one_tensor_in_a_span_and_a_cross_tie_between_spans() -> None:
    tied = replace(SPEC, tie_embeddings=True)
    last = tied.layers - 1
    assert ties(tied) == (((0, 0), (last, 2)),) and ties(SPEC) == ()
    assert cross_ties(tied, 0, 3) == [0]  # the token embedding
    (k,) = cross_ties(tied, 3, 3)
    assert span_names(tied, 3, 3)[k] == (last, 2)  # the head's weight
    whole = span_names(tied, 0, tied.layers)
    assert (last, 2) not in whole and cross_ties(tied, 0, tied.layers) == []
    layers = build_layers(tied)
    assert layers[0].tok.weight is layers[-1].lm.weight


def _peer_with(spec: SwarmSpec, first: int, count: int) -> Peer:
    peer = Peer(PeerOptions(listen=("tcp/127.0.0.1:1",), name="unit"))
    meta = {"spec": spec.to_json(), "first": first, "count": count, "role": "holder"}
    assert peer.handle(Message("install", stage=0, epoch=1, meta=meta)).kind == "ok"
    return peer


def test_a_peer_sums_each_group_apart_in_order_and_reports_it() -> None:
    spec = SPEC
    peer = _peer_with(spec, 3, 3)  # the last stage: 2 blocks and the head, with the loss
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, spec.seq, spec.width, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 256, (2, spec.seq), generator=g) for _ in range(4)]
    for mb in (0, 1, 2, 3):  # two replicas' slots served by one peer: groups 0 (mb 0, 2) and 1 (mb 1, 3)
        fwd = Message("forward", 0, 0, mb, 1, {"weight": 0.25}, [xs[mb], ys[mb]])
        assert peer.handle(fwd).kind == "ok"
        assert peer.handle(Message("backward", 0, 0, mb, 1, {"group": mb % 2})).kind == "ok"
    with pytest.raises(Exception, match="after 2 of 3 backwards"):  # answered as an error by the server loop
        peer.handle(Message("grads", 0, 0, -1, 1, {"group": 0, "mbs": [0, 2, 4], "full": True}))
    got = [peer.handle(Message("grads", 0, 0, -1, 1, {"group": r, "mbs": [r, r + 2], "full": True})) for r in (0, 1)]
    layers = build_layers(spec)[3:]
    params = [p for m in layers for p in m.parameters()]
    for r, reply in enumerate(got):  # one process: the group's microbatches, in order
        for p in params:
            p.grad = None
        for mb in (r, r + 2):
            out = xs[mb]
            for m in layers:
                out = m(out)
            (lm_loss(out, ys[mb]) * 0.25).backward()
        assert all(torch.equal(t, p.grad) for t, p in zip(reply.tensors, params))
        assert reply.meta["norms"] == [float(torch.linalg.vector_norm(p.grad, 2.0)) for p in params]
    with pytest.raises(Exception, match="replaces gradients"):
        peer.handle(Message("commit", 0, 0, -1, 1, {"lr": 1e-3, "microbatches": 4, "replace": [0]}))
    total = [a + b for a, b in zip(got[0].tensors, got[1].tensors)]
    meta = {"lr": 1e-3, "microbatches": 4, "replace": list(range(len(total))), "clip": 0.5}
    done = peer.handle(Message("commit", 0, 0, -1, 1, meta, total))
    assert done.kind == "ok" and all(torch.equal(a, b * 0.5) for a, b in zip(done.tensors, total))
    again = peer.handle(Message("commit", 0, 0, -1, 1, meta, total))
    assert again.meta["already"]  # a second commit of the step is acknowledged, not applied


def test_a_cross_tied_weight_is_kept_per_microbatch() -> None:
    spec = replace(SPEC, tie_embeddings=True)
    peer = _peer_with(spec, 0, 3)  # embedding + 2 blocks: the token embedding is tied to the head
    g = torch.Generator().manual_seed(2)
    for mb in (0, 1):
        x = torch.randint(0, 256, (2, spec.seq), generator=g)
        assert peer.handle(Message("forward", 0, 0, mb, 1, {"weight": 0.5}, [x])).kind == "ok"
        grad = torch.randn(2, spec.seq, spec.width, generator=g)
        assert peer.handle(Message("backward", 0, 0, mb, 1, {}, [grad])).kind == "ok"
    reply = peer.handle(Message("grads", 0, 0, -1, 1, {"group": 0, "mbs": [0, 1]}))
    assert reply.meta["tied"] == [[0, 0], [0, 1]] and len(reply.tensors) == 2
    assert not torch.equal(reply.tensors[0], reply.tensors[1])  # two microbatches' own gradients
    own = peer.handle(Message("grads", 0, 0, -1, 1, {"group": 0, "mbs": [0, 1], "full": True}))
    assert float(own.tensors[0].abs().max()) == 0.0  # the tied weight is not in the group's sum
