"""Replicas of a stage: its microbatches dealt among several holders, and what a replica's death costs.

A stage may have several *slots* (:attr:`StageSpan.slots`): slot 0 is its holder, the others are
replicas, each a full holder of the stage's layers and AdamW state. Microbatch ``mb`` of a step
goes to slot ``mb % slots`` (round robin, so every replica starts at once), and each slot's
peer sums its microbatches' weight gradients in their schedule order as *group* ``slot``. At the
commit (:mod:`.commit`) the trainer adds the groups in slot order and sends that one sum to every
replica, which all apply the same AdamW step: they stay bit-identical, so each is a live fail-over
copy of the others and a replicated stage needs no separate copy.

When a replica dies mid-step, its slot goes to a spare peer (given the state of a live replica)
or, with no spare, to a live replica of the same stage, which then serves two slots and keeps
their sums apart; the dead slot's completed microbatches are replayed there from the trainer's
cache. The groups and their order do not change, so the step's result is bit-identical to a
failure-free run. A slot served by a peer of another slot stays so until the next re-assignment
(which deals the microbatches anew and may change the order of the sum: within rounding).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import PeerLost
from ..replay import StepCache
from ..wire import Message
from . import copies

if TYPE_CHECKING:
    from .trainer import Trainer


def group_mbs(microbatches: int, slots: int, slot: int) -> list[int]:
    """The microbatches slot ``slot`` of ``slots`` runs, in order."""
    return [mb for mb in range(microbatches) if mb % slots == slot]


def peer_of(tr: Trainer, s: int, slot: int) -> str:
    with tr._lock:
        return tr.assignment.stages[s].slots[slot]


def recover_slot(tr: Trainer, s: int, dead: str, cache: StepCache | None, phase: str = "boundary",
                 force: bool = False) -> None:  # fmt: skip
    """Give every slot of stage ``s`` that ``dead`` served a live peer; mark those slots for replay.
    With ``force`` the peer is moved off although it answers (its reply was rejected)."""
    with tr._lock:
        copies.settle(tr, s, on_lost="drop")  # the copy may be handed over below: up to date, or none
        span = tr.assignment.stages[s]
        if dead not in span.slots:
            return  # another thread already recovered it
        if not force and not tr._gone(dead):
            return  # a moment without a route, not a failure
        failure = tr.note_lost(dead, phase)
        failure.interrupted(phase, s)
        failure.left_at = failure.left_at or tr.membership.left_at(dead)
        live = [p for p in dict.fromkeys(span.slots) if p != dead and _usable(tr, p)]
        copy = span.copy if span.copy and _usable(tr, span.copy) else None
        fresh = tr.fresh_spare(span, phase) if not live and copy is None else None
        if not live and copy is None and fresh is None:
            raise tr._lost(span)
        spares = [p.id for p in tr.peers() if p.id not in tr.assignment.peers()]
        try:
            if fresh is not None:  # nobody holds its state, but before the first commit that is the seeded init
                tr._install(fresh, span, "holder", None, tr.epoch)
                new, step, copy_left = fresh, len(tr.losses), span.copy
            elif spares:  # a peer with nothing to do takes the slot, from a live replica's (or the copy's) state
                r = tr.node.request(live[0] if live else str(copy), Message("get_state", stage=s, epoch=tr.epoch))
                tr._install(spares[0], span, "holder", None, tr.epoch, r.tensors, int(r.meta["step"]))
                new, step, copy_left = spares[0], int(r.meta["step"]), span.copy
            elif live:  # a replica of the same stage serves the slot too, its sum kept apart
                r = tr.node.request(live[0], Message("status"))
                new, copy_left = live[0], span.copy
                step = next(int(d["step"]) for d in r.meta["spans"] if d["stage"] == s)
            else:  # the copy becomes a replica
                r = tr.node.request(str(copy), Message("promote", stage=s, epoch=tr.epoch))
                new, step, copy_left = str(copy), int(r.meta["step"]), None
        except PeerLost as e:
            tr.note_lost(e.peer)
            raise tr._lost(span) from None
        slots = tuple(new if p == dead else p for p in span.slots)
        tr._set(replace(span, holder=slots[0], replicas=slots[1:], copy=copy_left))
        if not tr.assignment.stages[s].safe:  # one peer left serving the stage: a copy now, not at the
            tr.recopy(s)  # boundary, so a second loss loses nothing and its outputs can still be spot-checked
        replay = False
        if cache is not None and step == cache.step and not cache.committing:  # a commit brings its gradients
            for slot, p in enumerate(span.slots):
                if p == dead and any(mb % len(slots) == slot for _, mb in cache.done[s]):
                    tr.slot_replay.add((s, slot))
                    replay = True
        if not replay:
            tr.mark_recovered(s)


def _usable(tr: Trainer, peer: str) -> bool:
    return tr.membership.is_alive(peer) and not tr.trust.banned(peer)


def replay_slot(tr: Trainer, cache: StepCache, s: int, slot: int, peer: str) -> None:
    """Run slot ``slot``'s completed actions of this step again on ``peer``, in the same order."""
    from .driver import _message  # the driver imports this module

    done = [(kind, mb) for kind, mb in list(cache.done[s]) if mb % cache.slots[s] == slot]
    for kind, mb in done:
        tr.trust.request(s, _message(tr, cache, s, kind, mb), peer, None)  # replies checked, never spot-checked
    tr.replayed += len(done)
    tr.slot_replay.discard((s, slot))
    tr.mark_recovered(s)


def heal(tr: Trainer, s: int) -> None:
    """At a step boundary: give the slots of dead replicas live peers, and the stage a copy if a
    single live peer is left holding it."""
    span = tr.assignment.stages[s]
    for p in dict.fromkeys(span.slots):
        if tr._lost_peer(p):
            recover_slot(tr, s, p, None, force=True)
    span = tr.assignment.stages[s]
    if span.copy is not None and tr._lost_peer(span.copy):
        tr.note_lost(span.copy)
        tr._set(replace(span, copy=None))
    if not tr.assignment.stages[s].safe:
        tr.recopy(s)


def fill(tr: Trainer, idle: list[str]) -> list[str]:
    """Idle peers take over slots that a replica of the same stage serves twice; the rest are returned."""
    for s, span in enumerate(tr.assignment.stages):
        doubled = [slot for slot, p in enumerate(span.slots) if span.slots.index(p) != slot]
        for slot in doubled:  # the first slot a peer serves stays with it
            if not idle:
                return idle
            peer = idle.pop(0)
            try:
                r = tr.node.request(span.slots[slot], Message("get_state", stage=s, epoch=tr.epoch))
                tr._install(peer, span, "holder", None, tr.epoch, r.tensors, int(r.meta["step"]))
            except PeerLost as e:
                tr.note_lost(e.peer)
                continue
            slots = list(tr.assignment.stages[s].slots)
            slots[slot] = peer
            span = replace(span, holder=slots[0], replicas=tuple(slots[1:]))
            tr._set(span)
    return idle
