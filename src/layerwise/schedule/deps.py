"""What each action waits for, in a lowered schedule (one with send/receive actions).

Shared by the validator (dry run) and the simulator (timed run), so both judge a schedule by the
same rules.
"""

from __future__ import annotations

from .actions import Action, Kind
from .comm import matching

# A requirement is an action that must have run before. B stands for I and W together, so a
# requirement on I(s, i) is also met by B(s, i): see :func:`satisfied_by`.


def requirements(a: Action, stage_to_rank: tuple[int, ...]) -> list[Action]:
    """The actions that must have completed before ``a`` can start."""
    s, i, k = a.stage, a.microbatch, a.kind
    last = len(stage_to_rank) - 1
    same_prev = s > 0 and stage_to_rank[s - 1] == stage_to_rank[s]
    same_next = s < last and stage_to_rank[s + 1] == stage_to_rank[s]
    if k is Kind.F:
        if s == 0:
            return []
        return [Action(s - 1, Kind.F, i) if same_prev else Action(s, Kind.RECV_F, i)]
    if k in (Kind.B, Kind.I):
        reqs = [Action(s, Kind.F, i)]
        if s < last:
            reqs.append(Action(s + 1, Kind.I, i) if same_next else Action(s, Kind.RECV_B, i))
        return reqs
    if k is Kind.W:
        return [Action(s, Kind.I, i)]
    if k is Kind.SEND_F:
        return [Action(s, Kind.F, i)]
    if k is Kind.SEND_B:
        return [Action(s, Kind.I, i)]
    # receives wait for the peer's matching send
    return [matching(a)]


def satisfied_by(req: Action) -> tuple[Action, ...]:
    """Actions whose completion meets the requirement ``req``."""
    if req.kind is Kind.I:
        return (req, Action(req.stage, Kind.B, req.microbatch))
    return (req,)


def describe(a: Action) -> str:
    """Plain words for an action, for error messages."""
    what = {
        Kind.F: "forward",
        Kind.B: "backward",
        Kind.I: "input-gradient backward",
        Kind.W: "weight-gradient backward",
        Kind.SEND_F: "send of the activation",
        Kind.RECV_F: "receive of the activation",
        Kind.SEND_B: "send of the gradient",
        Kind.RECV_B: "receive of the gradient",
    }[a.kind]
    return f"{a} (stage {a.stage} {what} of microbatch {a.microbatch})"
