"""A fast replay of :func:`layerwise.schedule.simulate.simulate` for the planner's search.

The general simulator validates and lowers the schedule and then looks up every dependency in
a dictionary keyed by action objects: 2.9 s on this machine for one 64-stage, 256-microbatch
1F1B step. The planner needs hundreds of such runs, so this module replays the same timing rules
on a compute-only schedule from :mod:`layerwise.schedule.generators` with arrays indexed by
(stage, microbatch): ~50 ms for the same schedule. The rules are the general simulator's, read off
its code, and ``tests/unit/test_planner_pipesim.py`` checks that both give the same makespan,
busy time and per-rank finish time, exactly (in integer and Fraction arithmetic), on every
generator and on random costs:

* a compute action starts when its rank is free and its inputs are there;
* a message between ranks moves once its send is posted (the producing compute ended) and the
  previous receive on the same channel completed, and takes ``transfer[boundary]``;
* a receive runs right before the compute that consumes it (where lowering puts it), so a rank
  waiting for a message cannot start anything else.

Schedules given here must be valid (the generators' are); an invalid one raises ValueError
instead of the general simulator's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..schedule.actions import Kind
from ..schedule.core import Schedule

_F, _B, _I, _W = Kind.F, Kind.B, Kind.I, Kind.W


@dataclass(frozen=True)
class PipeTiming:
    makespan: Any
    busy: tuple[Any, ...]  # compute seconds per rank
    finish: tuple[Any, ...]  # per rank, when its last compute action ends
    last_backward: tuple[Any, ...]  # per rank, when its last B (or W) action started

    @property
    def bubble_fraction(self) -> float:
        """Idle over total rank time, as :class:`layerwise.schedule.simulate.SimResult` defines it."""
        if not self.makespan:
            return 0.0
        ranks = len(self.busy)
        return float((ranks * self.makespan - sum(self.busy, 0)) / (ranks * self.makespan))


def simulate(
    schedule: Schedule,
    forward: Sequence[Any],
    input_grad: Sequence[Any],
    weight_grad: Sequence[Any],
    transfer: Sequence[Any] = (),
) -> PipeTiming:
    """Simulate one step of a compute-only ``schedule``.

    Args:
        forward, input_grad, weight_grad: per stage, seconds of F, I and W for one microbatch (a
            full backward B costs I + W), as in :class:`layerwise.schedule.simulate.Costs`.
        transfer: per stage boundary ``s -> s + 1``, seconds a message takes to cross it (either
            direction); empty means 0. This is ``Costs.transfer``: latency + bytes / bandwidth.
    """
    S, m, R = schedule.num_stages, schedule.num_microbatches, schedule.num_ranks
    where = schedule.stage_to_rank
    if len(forward) != S or len(input_grad) != S or len(weight_grad) != S:
        raise ValueError(f"costs need one value per stage ({S})")
    hop = list(transfer) if transfer else [0] * max(S - 1, 0)
    if len(hop) != max(S - 1, 0):
        raise ValueError(f"transfer needs {S - 1} values (one per stage boundary)")
    none = None
    fend: list[list[Any]] = [[none] * m for _ in range(S)]
    iend: list[list[Any]] = [[none] * m for _ in range(S)]  # end of I, or of B
    post_f: list[Any] = [0] * S  # channel s -> s+1: when its next receive is posted
    post_b: list[Any] = [0] * S  # channel s -> s-1
    free: list[Any] = [0] * R
    busy: list[Any] = [0] * R
    last_b: list[Any] = [0] * R
    pc = [0] * R
    ranks = schedule.ranks
    remaining = sum(len(a) for a in ranks)
    last = S - 1
    while remaining:
        progressed = False
        for r in range(R):
            acts = ranks[r]
            n = len(acts)
            t_free = free[r]
            while pc[r] < n:
                a = acts[pc[r]]
                s, i, k = a.stage, a.microbatch, a.kind
                t = t_free
                if k is _F:
                    if s > 0:
                        prev = fend[s - 1][i]
                        if prev is None:
                            break
                        if where[s - 1] != r:  # receive the activation, then compute
                            moves = prev if prev > post_f[s - 1] else post_f[s - 1]
                            landed = moves + hop[s - 1]
                            if landed > t:
                                t = landed
                            post_f[s - 1] = t
                        elif prev > t:
                            t = prev
                    dur = forward[s]
                    end = t + dur
                    fend[s][i] = end
                elif k is _B or k is _I:
                    f_end = fend[s][i]
                    if f_end is None:
                        break
                    if s < last:
                        nxt = iend[s + 1][i]
                        if nxt is None:
                            break
                        if where[s + 1] != r:  # receive the gradient, then compute
                            moves = nxt if nxt > post_b[s + 1] else post_b[s + 1]
                            landed = moves + hop[s]
                            if landed > t:
                                t = landed
                            post_b[s + 1] = t
                        elif nxt > t:
                            t = nxt
                    if f_end > t:
                        t = f_end
                    dur = input_grad[s] + weight_grad[s] if k is _B else input_grad[s]
                    end = t + dur
                    iend[s][i] = end
                    if k is _B:
                        last_b[r] = t
                elif k is _W:
                    dep = iend[s][i]
                    if dep is None:
                        break
                    if dep > t:
                        t = dep
                    dur = weight_grad[s]
                    end = t + dur
                    last_b[r] = t
                else:
                    raise ValueError(f"{a}: give a compute-only schedule (before lowering)")
                t_free = end
                busy[r] += dur
                pc[r] += 1
                remaining -= 1
                progressed = True
            free[r] = t_free
        if not progressed:
            stuck = [str(ranks[r][pc[r]]) for r in range(R) if pc[r] < len(ranks[r])]
            raise ValueError(f"schedule {schedule.name!r} deadlocks at {', '.join(stuck)}")
    makespan = max(free) if free else 0
    return PipeTiming(makespan, tuple(busy), tuple(free), tuple(last_b))


def rank_peak_activations(schedule: Schedule, per_stage: Sequence[float]) -> list[float]:
    """Per rank, the most activation bytes it holds at once when stage ``s`` keeps
    ``per_stage[s]`` bytes per microbatch from its F until its B (or W), walking the rank's own
    order. For one stage per rank this is ``peak_inflight[s] * per_stage[s]``; with interleaving
    it adds up the chunks as they overlap, which a per-stage peak cannot."""
    out = []
    for acts in schedule.ranks:
        held = peak = 0.0
        for a in acts:
            if a.kind is _F:
                held += per_stage[a.stage]
                if held > peak:
                    peak = held
            elif a.kind is _B or a.kind is _W:
                held -= per_stage[a.stage]
        out.append(peak)
    return out
