"""Event simulation of a schedule under per-stage costs and a communication cost model.

Costs may differ per stage (uneven layers) and per rank (devices of different speed). Sends take
no time on the sender (they are posted, ``isend``). A message moves once both its send and its
receive are posted (gloo's rendezvous: the data is written when the receiver's buffer exists)
and takes ``latency + bytes / bandwidth``. As in the runtime, a rank posts each channel's next
receive as soon as the previous one on that channel completed (the first at the step's start),
so a message can land while the receiver computes; the receive action ends when it has landed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .actions import Action, Kind, TimedAction
from .core import Schedule
from .comm import matching
from .deps import requirements, satisfied_by
from .validate import validate


def _per_stage(value: float | Sequence[float], n: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(value) for _ in range(n)) if isinstance(value, (int, float)) else tuple(value)
    if len(vals) != n:
        raise ValueError(f"{what} has {len(vals)} values but the schedule has {n} stages")
    if any(v < 0 or math.isnan(v) for v in vals):
        raise ValueError(f"{what} must be >= 0, got {list(vals)}")
    return vals


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Per-stage seconds for one microbatch, and the communication model."""

    forward: tuple[Any, ...]  # F per stage
    input_grad: tuple[Any, ...]  # I per stage (the input-gradient part of the backward)
    weight_grad: tuple[Any, ...]  # W per stage; a full backward B costs I + W
    latency: float = 0  # seconds per message; int 0, not 0.0, so Fraction costs stay exact
    message_bytes: tuple[float, ...] = ()  # bytes crossing boundary s -> s+1 per microbatch
    bandwidth: float = math.inf  # bytes per second
    rank_speed: tuple[float, ...] = ()  # relative speed per rank (0.5 = twice as slow); empty = 1
    # Seconds of individual compute actions, overriding the per-stage costs: a measured step
    # replayed action by action (see layerwise.runtime.measure.replay).
    per_action: Mapping[Action, Any] = field(default_factory=dict)

    @classmethod
    def uniform(
        cls,
        stages: int,
        forward: Any = 1,
        backward: Any = 1,
        weight: Any = None,
        *,
        latency: float = 0,
        message_bytes: float = 0.0,
        bandwidth: float = math.inf,
        rank_speed: Sequence[float] = (),
    ) -> Costs:
        """Same costs on every stage.

        With ``weight`` given, ``backward`` is the input-gradient part only (the zero-bubble
        paper's T_B) and a full backward costs ``backward + weight``. Without it, ``backward`` is
        the full backward, split evenly into I and W.
        """
        if weight is None:
            i = w = backward / 2
        else:
            i, w = backward, weight
        return cls(
            forward=(forward,) * stages,
            input_grad=(i,) * stages,
            weight_grad=(w,) * stages,
            latency=latency,
            message_bytes=(message_bytes,) * max(stages - 1, 0),
            bandwidth=bandwidth,
            rank_speed=tuple(rank_speed),
        )

    def duration(self, a: Action, rank: int) -> Any:
        speed = self.rank_speed[rank] if self.rank_speed else 1
        if a in self.per_action:
            return self.per_action[a] / speed if speed != 1 else self.per_action[a]
        s = a.stage
        base = {
            Kind.F: self.forward[s],
            Kind.B: self.input_grad[s] + self.weight_grad[s],
            Kind.I: self.input_grad[s],
            Kind.W: self.weight_grad[s],
        }.get(a.kind, 0)
        return base / speed if speed != 1 else base

    def transfer(self, a: Action) -> Any:
        """Time for the message a send action posts to reach its receiver."""
        boundary = a.stage if a.kind is Kind.SEND_F else a.stage - 1
        nbytes = self.message_bytes[boundary] if self.message_bytes else 0
        return self.latency + (nbytes / self.bandwidth if nbytes else 0)


@dataclass(frozen=True)
class SimResult:
    makespan: Any
    busy: tuple[Any, ...]  # compute seconds per rank
    idle: tuple[Any, ...]  # makespan - busy, per rank
    bubble_fraction: float  # sum(idle) / (ranks * makespan)
    peak_inflight: tuple[int, ...]  # per stage: max microbatches whose activations it holds
    timeline: tuple[TimedAction, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "makespan": float(self.makespan),
            "bubble_fraction": float(self.bubble_fraction),
            "peak_inflight": list(self.peak_inflight),
            "busy": [float(b) for b in self.busy],
            "idle": [float(b) for b in self.idle],
        }


def check_costs(schedule: Schedule, costs: Costs) -> None:
    n = schedule.num_stages
    for name in ("forward", "input_grad", "weight_grad"):
        _per_stage(getattr(costs, name), n, name)
    if costs.message_bytes and len(costs.message_bytes) != max(n - 1, 0):
        raise ValueError(f"message_bytes needs {n - 1} values (one per stage boundary)")
    if costs.rank_speed and (len(costs.rank_speed) != schedule.num_ranks or min(costs.rank_speed) <= 0):
        raise ValueError(f"rank_speed needs {schedule.num_ranks} positive values")


def simulate(schedule: Schedule, costs: Costs) -> SimResult:
    """Run ``schedule`` in simulated time. The schedule is validated (and lowered) first."""
    check_costs(schedule, costs)
    sch = validate(schedule)
    end: dict[Action, Any] = {}
    free = [0] * sch.num_ranks
    pc = [0] * sch.num_ranks
    posted: dict[tuple[int, Kind], Any] = {}  # channel -> when its next receive is posted
    timeline: list[TimedAction] = []
    remaining = sum(len(a) for a in sch.ranks)
    while remaining:
        for r, acts in enumerate(sch.ranks):
            while pc[r] < len(acts):
                a = acts[pc[r]]
                ready = free[r]
                blocked = False
                for q in requirements(a, sch.stage_to_rank):
                    hit = next((x for x in satisfied_by(q) if x in end), None)
                    if hit is None:
                        blocked = True
                        break
                    if a.kind not in (Kind.RECV_F, Kind.RECV_B):
                        ready = max(ready, end[hit])
                if blocked:
                    break
                if a.kind.is_compute:
                    start, stop = ready, ready + costs.duration(a, r)
                elif a.kind in (Kind.SEND_F, Kind.SEND_B):
                    start = stop = ready
                else:  # receive: drawn only while the message moves, the wait before that is
                    # idle time (a gap, not communication)
                    send = matching(a)
                    moves = max(end[send], posted.get((send.stage, send.kind), 0))
                    landed = moves + costs.transfer(send)
                    posted[(send.stage, send.kind)] = max(free[r], landed)
                    start, stop = max(free[r], moves), max(free[r], landed)
                end[a] = stop
                free[r] = stop
                timeline.append(TimedAction(r, a, start, stop))
                pc[r] += 1
                remaining -= 1
    makespan = max(free) if free else 0
    busy = tuple(
        sum((t.end - t.start for t in timeline if t.rank == r and t.action.kind.is_compute), 0)
        for r in range(sch.num_ranks)
    )
    idle = tuple(makespan - b for b in busy)
    bubble = float(sum(idle, 0) / (sch.num_ranks * makespan)) if makespan else 0.0
    return SimResult(makespan, busy, idle, bubble, peak_inflight(sch), tuple(timeline))


def peak_inflight(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the most microbatches whose activations are held at once.

    A microbatch is held from its F until its B (or, split, its W: W still needs the inputs).
    """
    peak = [0] * schedule.num_stages
    held = [0] * schedule.num_stages
    for acts in schedule.ranks:
        for a in acts:
            if a.kind is Kind.F:
                held[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], held[a.stage])
            elif a.kind in (Kind.B, Kind.W):
                held[a.stage] -= 1
    return tuple(peak)


def lower_bound(schedule: Schedule, costs: Costs) -> Any:
    """A makespan no schedule can beat: the larger of the busiest rank's work and the critical
    path of one microbatch (forward through every stage, then backward and W on the way back).
    """
    sch = validate(schedule)
    work = max(
        sum((costs.duration(a, r) for a in acts if a.kind.is_compute), 0) for r, acts in enumerate(sch.ranks)
    )
    n = sch.num_stages

    def d(kind: Kind, s: int) -> Any:  # duration on the stage's rank, its speed included
        return costs.duration(Action(s, kind, 0), sch.stage_to_rank[s])

    def hop(s: int) -> Any:  # message time across the boundary s -> s + 1, if it crosses ranks
        if sch.stage_to_rank[s] == sch.stage_to_rank[s + 1]:
            return 0
        return costs.transfer(Action(s, Kind.SEND_F, 0))

    fwd = sum((d(Kind.F, s) for s in range(n)), 0) + sum((hop(s) for s in range(n - 1)), 0)
    back_kind = Kind.I if sch.split_backward else Kind.B
    path, best = fwd, fwd
    for s in reversed(range(n)):
        if s < n - 1:
            path += hop(s)
        path += d(back_kind, s)
        tail = d(Kind.W, s) if sch.split_backward else 0
        best = max(best, path + tail)
    return max(work, best)
