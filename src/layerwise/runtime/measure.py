"""From a measured timeline: the bubble, and the per-stage costs to feed the simulator with.

Comparing the measured bubble with the simulator's prediction from the same run's measured costs
tells whether the runtime adds overhead the theory does not account for.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from ..schedule.actions import Kind, TimedAction
from ..schedule.comm import matching
from ..schedule.core import Schedule
from ..schedule.simulate import Costs, SimResult, simulate


def measured_bubble(events: Sequence[TimedAction], num_ranks: int) -> float:
    """1 - (busy time summed over ranks) / (ranks x makespan), as the simulator defines it.

    Busy is compute plus posting sends (serializing and handing a message over is work, and
    :func:`costs_from_events` charges it to the producing action); waiting for a receive is idle.
    The step starts with its first compute action: when steps run back to back, a later stage
    posts its first receive while the first stage is still finishing the previous step, and that
    wait belongs to the previous step (the simulator starts every rank at 0).
    """
    if not events:
        raise ValueError("no events: run the pipeline with record=True")
    starts = [e.start for e in events if e.action.kind.is_compute] or [e.start for e in events]
    makespan = max(e.end for e in events) - min(starts)
    busy = sum(e.duration for e in events if e.action.kind.is_compute or e.action.kind in _SENDS)
    return 1.0 - busy / (num_ranks * makespan) if makespan > 0 else 0.0


_SENDS = (Kind.SEND_F, Kind.SEND_B)


def costs_from_events(events: Sequence[TimedAction], schedule: Schedule) -> Costs:
    """Per-stage mean F / I / W (or B) durations, plus communication, from a measured step.

    Means, not medians, so that the simulated compute time of each rank equals the measured one
    and a difference in the bubble comes only from how the actions wait for each other.

    The time a rank spends posting a send is added to the action that produced the tensor (the
    simulator's sends are free); a message's latency is the mean time from its send being
    posted to its receive completing, over the receives that were already waiting then (the
    runtime posts receives ahead, so only those show the whole transfer).
    """
    n = schedule.num_stages
    by: dict[tuple[int, Kind], list[float]] = defaultdict(list)
    for e in events:
        by[(e.action.stage, e.action.kind)].append(e.duration)

    def med(stage: int, kind: Kind) -> float:
        vals = by.get((stage, kind))
        return statistics.fmean(vals) if vals else 0.0

    fwd = [med(s, Kind.F) + med(s, Kind.SEND_F) for s in range(n)]
    if schedule.split_backward:
        inp = [med(s, Kind.I) + med(s, Kind.SEND_B) for s in range(n)]
        wgt = [med(s, Kind.W) for s in range(n)]
    else:
        full = [med(s, Kind.B) + med(s, Kind.SEND_B) for s in range(n)]
        inp, wgt = [b / 2 for b in full], [b / 2 for b in full]
    ends = {e.action: e for e in events}
    delays = []
    for e in events:
        if e.action.kind in (Kind.RECV_F, Kind.RECV_B):
            send = ends.get(matching(e.action))
            if send is not None and e.start <= send.end:
                delays.append(max(0.0, e.end - send.end))
    latency = statistics.fmean(delays) if delays else 0.0  # the slow messages are real costs
    return Costs(forward=tuple(fwd), input_grad=tuple(inp), weight_grad=tuple(wgt), latency=latency)


def predict(events: Sequence[TimedAction], schedule: Schedule) -> SimResult:
    """Simulate ``schedule`` with the costs measured in ``events``."""
    return simulate(schedule, costs_from_events(events, schedule))


def replay(events: Sequence[TimedAction], schedule: Schedule) -> SimResult:
    """Simulate ``schedule`` with every compute action taking exactly its measured time (plus its
    send, as in :func:`costs_from_events`), instead of its stage's mean.

    :func:`predict` - :func:`replay` is what the variation of actions around their stage's mean
    costs (the max-plus dynamics of a pipeline make a slow action cost more than a fast one
    saves); :func:`replay` - measured is what the simulator's model of waiting leaves out.
    """
    costs = costs_from_events(events, schedule)
    sends = {(e.action.stage, e.action.microbatch, e.action.kind): e.duration
             for e in events if e.action.kind in _SENDS}  # fmt: skip
    per_action = {}
    for e in events:
        k = e.action.kind
        if k.is_compute:
            send = Kind.SEND_F if k is Kind.F else Kind.SEND_B if k in (Kind.B, Kind.I) else None
            per_action[e.action] = e.duration + sends.get((e.action.stage, e.action.microbatch, send), 0.0)
    return simulate(schedule, replace(costs, per_action=per_action))

