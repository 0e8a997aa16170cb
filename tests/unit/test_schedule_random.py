"""Property tests: every generated schedule validates and simulates, corrupted ones are rejected.

Costs are drawn per stage and independently for F, I and W, so a schedule that only works under
the papers' uniform costs (or a simulator that only gets uniform costs right) is caught.
"""

from __future__ import annotations

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from layerwise.schedule.actions import Action, Kind
from layerwise.schedule.core import Schedule
from layerwise.schedule.deps import requirements, satisfied_by
from layerwise.schedule.generators import SCHEDULES, build
from layerwise.schedule.simulate import Costs, lower_bound, simulate
from layerwise.schedule.validate import ScheduleError, validate

REL_EPS = 1e-9  # float rounding only: the simulator and the bound add the same numbers
FAST = settings(max_examples=150, deadline=None)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 8))
    m = draw(st.integers(1, 24))
    v = draw(st.integers(2, 3))
    if name == "interleaved" and draw(st.booleans()):
        m = max(p, m - m % p)  # the paper's case; other m take the generator's longer warm-up
    return build(name, stages=p, microbatches=m, chunks=v)


@st.composite
def costed(draw: st.DrawFn) -> tuple[Schedule, Costs]:
    schedule = draw(schedules())
    n, p = schedule.num_stages, schedule.num_ranks
    seconds = st.floats(0.01, 10, allow_nan=False, allow_infinity=False)
    per_stage = st.lists(seconds, min_size=n, max_size=n).map(tuple)
    costs = Costs(
        forward=draw(per_stage),
        input_grad=draw(per_stage),
        weight_grad=draw(per_stage),
        latency=draw(st.floats(0, 5)),
        message_bytes=draw(st.lists(st.floats(0, 1e6), min_size=n - 1, max_size=n - 1).map(tuple)),
        bandwidth=draw(st.floats(1e4, 1e8)),
        rank_speed=draw(st.lists(st.floats(0.25, 4), min_size=p, max_size=p).map(tuple)),
    )
    return schedule, costs


def _largest() -> tuple[Schedule, Costs]:
    """The biggest case the strategies allow, so it runs every time, not only when drawn."""
    schedule = build("interleaved", stages=8, microbatches=24, chunks=3)
    n = schedule.num_stages
    uneven = tuple(0.01 + (7 * s % 10) for s in range(n))
    speeds = tuple(0.25 + r / 2 for r in range(8))
    return schedule, Costs(forward=uneven, input_grad=uneven[::-1], weight_grad=(0.5,) * n,
                           latency=0.3, rank_speed=speeds)


@FAST
@given(costed())
@example(_largest())
def test_generated_schedules_validate_and_simulate(case: tuple[Schedule, Costs]) -> None:
    schedule, costs = case
    lowered = validate(schedule)
    result = simulate(schedule, costs)  # returns only if no rank is left waiting
    assert sorted(t.action for t in result.timeline) == sorted(a for r in lowered.ranks for a in r)
    assert result.makespan >= lower_bound(schedule, costs) * (1 - REL_EPS)

    end = {t.action: t.end for t in result.timeline}
    last_end = [0.0] * schedule.num_ranks
    for t in sorted(result.timeline, key=lambda t: (t.rank, t.start, t.end)):
        assert t.start >= last_end[t.rank] * (1 - REL_EPS), f"overlap on rank {t.rank} at {t.action}"
        last_end[t.rank] = t.end
        for q in requirements(t.action, lowered.stage_to_rank):
            done = min(end[x] for x in satisfied_by(q) if x in end)
            if t.action.kind in (Kind.RECV_F, Kind.RECV_B):  # q is the send; waits inside its span
                assert t.end >= (done + costs.transfer(q)) * (1 - REL_EPS), t.action
            else:
                assert t.start >= done * (1 - REL_EPS), t.action
    for r in range(schedule.num_ranks):
        work = sum(costs.duration(a, r) for a in schedule.ranks[r])
        assert abs(result.busy[r] - work) <= REL_EPS * work


def _dependent_pairs(schedule: Schedule, rank: int) -> list[tuple[int, int]]:
    """Positions (i, j), i < j, on one rank where action j needs action i (F then B or I,
    I then W, and for stages sharing a rank, the previous stage's F or the next stage's I)."""
    acts = schedule.ranks[rank]
    where = {a: n for n, a in enumerate(acts)}
    pairs = []
    for j, a in enumerate(acts):
        for q in requirements(a, schedule.stage_to_rank):
            pairs += [(where[x], j) for x in satisfied_by(q) if where.get(x, j) < j]
    return pairs


@FAST
@given(schedules(), st.randoms(use_true_random=False))
def test_swapping_a_dependent_pair_is_rejected(schedule: Schedule, rng: random.Random) -> None:
    rank = rng.randrange(schedule.num_ranks)
    pairs = _dependent_pairs(schedule, rank)
    assert pairs  # every rank runs some microbatch's F and its backward
    i, j = rng.choice(pairs)
    ranks = [list(r) for r in schedule.ranks]
    ranks[rank][i], ranks[rank][j] = ranks[rank][j], ranks[rank][i]
    try:
        validate(schedule.with_ranks(ranks))
    except ScheduleError as err:
        # The stuck cell is not always the moved action: an earlier one on the rank may wait on
        # a peer that in turn waits on this rank. Something must be marked, though.
        assert ">>" in str(err), str(err)
    else:
        raise AssertionError(f"swap of steps {i} and {j} on rank {rank} was accepted")


@FAST
@given(schedules(), st.randoms(use_true_random=False))
def test_dropping_an_action_is_rejected(schedule: Schedule, rng: random.Random) -> None:
    # Dropped from the lowered schedule, so sends and receives are dropped too.
    lowered = validate(schedule)
    rank = rng.randrange(lowered.num_ranks)
    ranks = [list(r) for r in lowered.ranks]
    dropped: Action = ranks[rank].pop(rng.randrange(len(ranks[rank])))
    try:
        validate(lowered.with_ranks(ranks))
    except ScheduleError as err:
        assert ">>" in str(err), f"nothing marked after dropping {dropped}:\n{err}"
    else:
        raise AssertionError(f"dropping {dropped} from rank {rank} was accepted")
