"""Lowering: add the send/receive actions a multi-process runtime needs.

A send is placed right after the action that produces the tensor, a receive right before the
action that consumes it. The runtime posts sends without blocking (``isend``) and blocks on
receives, which is the semantics the validator checks; under it this placement is deadlock-free
exactly when the compute order is.
"""

from __future__ import annotations

from .actions import Action, Kind
from .core import Schedule


def lower(schedule: Schedule) -> Schedule:
    """Return the schedule with communication actions inserted (idempotent)."""
    if schedule.has_comm():
        return schedule
    where = schedule.stage_to_rank
    last = schedule.num_stages - 1
    out: list[list[Action]] = []
    for rank, acts in enumerate(schedule.ranks):
        lowered: list[Action] = []
        for a in acts:
            s, i = a.stage, a.microbatch
            if a.kind is Kind.F:
                if s > 0 and where[s - 1] != rank:
                    lowered.append(Action(s, Kind.RECV_F, i))
                lowered.append(a)
                if s < last and where[s + 1] != rank:
                    lowered.append(Action(s, Kind.SEND_F, i))
            elif a.kind in (Kind.B, Kind.I):
                if s < last and where[s + 1] != rank:
                    lowered.append(Action(s, Kind.RECV_B, i))
                lowered.append(a)
                if s > 0 and where[s - 1] != rank:
                    lowered.append(Action(s, Kind.SEND_B, i))
            else:
                lowered.append(a)
        out.append(lowered)
    return schedule.with_ranks(out)


def peer_stage(action: Action) -> int:
    """The stage at the other end of a communication action."""
    if action.kind in (Kind.SEND_F, Kind.RECV_B):
        return action.stage + 1
    if action.kind in (Kind.RECV_F, Kind.SEND_B):
        return action.stage - 1
    raise ValueError(f"{action} is not a communication action")


def matching(action: Action) -> Action:
    """The action on the peer that completes this send or receive (``0SF3`` <-> ``1RF3``)."""
    peer = peer_stage(action)
    pair = {
        Kind.SEND_F: Kind.RECV_F,
        Kind.RECV_F: Kind.SEND_F,
        Kind.SEND_B: Kind.RECV_B,
        Kind.RECV_B: Kind.SEND_B,
    }[action.kind]
    return Action(peer, pair, action.microbatch)
