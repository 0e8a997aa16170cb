"""Measured bubble and costs from a timeline, checked on hand-made events and on the simulator's own.

The simulator is the ground truth here: a timeline it produced under known costs, read back as if
it had been measured, must give back those costs, and simulating with them must give back the
same bubble.
"""

from __future__ import annotations

import pytest

from layerwise.runtime.measure import costs_from_events, measured_bubble, predict
from layerwise.schedule.actions import Action, TimedAction
from layerwise.schedule.generators import build
from layerwise.schedule.simulate import Costs, simulate


def _ev(rank: int, text: str, start: float, end: float) -> TimedAction:
    return TimedAction(rank, Action.parse(text), start, end)


def _hand_made(offset: float = 0.0) -> list[TimedAction]:
    """GPipe, 2 ranks, 2 microbatches, with communication events that must not count as busy."""
    o = offset
    return [
        _ev(0, "0F0", o + 0, o + 1), _ev(0, "0SF0", o + 1, o + 1),
        _ev(0, "0F1", o + 1, o + 2), _ev(0, "0SF1", o + 2, o + 2),
        _ev(1, "1RF0", o + 1, o + 1.5), _ev(1, "1F0", o + 1.5, o + 2.5),
        _ev(1, "1RF1", o + 2.5, o + 2.5), _ev(1, "1F1", o + 2.5, o + 3.5),
        _ev(1, "1B0", o + 3.5, o + 5), _ev(1, "1SB0", o + 5, o + 5),
        _ev(1, "1B1", o + 5, o + 8), _ev(1, "1SB1", o + 8, o + 8),
        _ev(0, "0RB0", o + 2, o + 5), _ev(0, "0B0", o + 5, o + 7),
        _ev(0, "0RB1", o + 7, o + 8), _ev(0, "0B1", o + 8, o + 10),
    ]  # fmt: skip


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_measured_bubble_of_a_hand_made_timeline(offset: float) -> None:
    # busy: rank 0 = 1 + 1 + 2 + 2 = 6, rank 1 = 1 + 1 + 1.5 + 3 = 6.5; makespan 10 on 2 ranks
    assert measured_bubble(_hand_made(offset), 2) == 1 - 12.5 / 20 == 0.375


def test_measured_bubble_edge_cases() -> None:
    with pytest.raises(ValueError, match="record=True"):
        measured_bubble([], 2)
    assert measured_bubble([_ev(0, "0F0", 3.0, 3.0)], 1) == 0.0
    assert measured_bubble([_ev(0, "0F0", 0.0, 2.0), _ev(1, "1RF0", 0.0, 2.0)], 2) == 0.5


def test_costs_from_hand_made_events() -> None:
    events = _hand_made() + [_ev(0, "0SF2", 0.0, 0.25)]  # a send that took time to post
    schedule = build("gpipe", stages=2, microbatches=2)
    costs = costs_from_events(events, schedule)
    # F means, plus the mean time spent posting the sends (0, 0, 0.25 -> 1/12) on stage 0
    assert costs.forward == (1.0 + 0.25 / 3, 1.0)
    # full backward means (2, 2) -> 2 and (1.5, 3) -> 2.25, split evenly into I and W
    assert costs.input_grad == costs.weight_grad == (1.0, 1.125)
    # latency: the receives already waiting when their send was posted: 1RF0 (send posted at 1,
    # landed at 1.5), 0RB0 (posted at 5, landed at 5), 0RB1 (posted at 8, landed at 8); 1RF1
    # started after its message was posted, so it does not show the transfer
    assert costs.latency == pytest.approx(0.5 / 3)
    assert [e.action for e in events][:3] == [Action.parse(t) for t in ("0F0", "0SF0", "0F1")]


def _costs(n: int, latency: float = 0.0) -> Costs:
    # uneven per stage, binary fractions so that every sum is exact
    return Costs(
        forward=tuple(1.0 + 0.5 * (s % 3) for s in range(n)),
        input_grad=tuple(2.0 - 0.25 * (s % 4) for s in range(n)),
        weight_grad=tuple(0.5 + 0.25 * (s % 2) for s in range(n)),
        latency=latency,
    )


CASES = [
    ("gpipe", 3, 6),
    ("1f1b", 4, 8),
    ("1f1b", 3, 2),
    ("interleaved", 2, 4),
    ("interleaved", 3, 6),
    ("zb-h1", 4, 8),
    ("zb-h1", 3, 5),
]


@pytest.mark.parametrize(("name", "p", "m"), CASES)
def test_costs_from_simulated_events_recover_the_costs(name: str, p: int, m: int) -> None:
    schedule = build(name, stages=p, microbatches=m, chunks=2)
    costs = _costs(schedule.num_stages)
    result = simulate(schedule, costs)
    got = costs_from_events(result.timeline, schedule)
    assert got.forward == costs.forward
    if schedule.split_backward:
        assert got.input_grad == costs.input_grad
        assert got.weight_grad == costs.weight_grad
    else:  # B is measured whole: the split into I and W is a convention, I + W is recovered
        full = tuple(i + w for i, w in zip(costs.input_grad, costs.weight_grad))
        assert tuple(i + w for i, w in zip(got.input_grad, got.weight_grad)) == full
        assert got.input_grad == got.weight_grad
    assert got.latency == 0.0


@pytest.mark.parametrize(("name", "p", "m"), CASES)
def test_predict_reproduces_the_simulated_bubble(name: str, p: int, m: int) -> None:
    schedule = build(name, stages=p, microbatches=m, chunks=2)
    result = simulate(schedule, _costs(schedule.num_stages))
    again = predict(result.timeline, schedule)
    assert again.makespan == result.makespan
    assert again.bubble_fraction == result.bubble_fraction
    assert again.timeline == result.timeline
    # and the bubble measured from the timeline is the simulator's own
    assert measured_bubble(result.timeline, schedule.num_ranks) == pytest.approx(result.bubble_fraction, rel=1e-12)


@pytest.mark.parametrize(("name", "p", "m"), [("gpipe", 3, 6), ("interleaved", 3, 6), ("zb-h1", 3, 6)])
def test_costs_from_simulated_events_recover_the_latency(name: str, p: int, m: int) -> None:
    schedule = build(name, stages=p, microbatches=m, chunks=2)
    costs = _costs(schedule.num_stages, latency=0.25)
    result = simulate(schedule, costs)
    got = costs_from_events(result.timeline, schedule)
    assert got.latency == pytest.approx(0.25)
    assert predict(result.timeline, schedule).bubble_fraction == pytest.approx(result.bubble_fraction)


def test_latency_is_recovered_when_every_receive_waits() -> None:
    # 1F1B with one microbatch: every receive is posted before its message leaves
    schedule = build("1f1b", stages=3, microbatches=1)
    costs = _costs(3, latency=0.25)
    result = simulate(schedule, costs)
    got = costs_from_events(result.timeline, schedule)
    assert got.latency == 0.25
    assert predict(result.timeline, schedule).makespan == result.makespan
