"""``measure.replay``: a timeline replayed action by action gives back its own makespan."""

from __future__ import annotations

import random

import pytest

from layerwise.runtime.measure import predict, replay
from layerwise.schedule.actions import TimedAction
from layerwise.schedule.generators import build
from layerwise.schedule.simulate import Costs, simulate


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "zbv", "interleaved"])
def test_replay_of_a_simulated_step_reproduces_it(name: str) -> None:
    sch = build(name, stages=3, microbatches=5)
    rng = random.Random(0)
    n = sch.num_stages
    # every action of a stage gets its own cost: uneven, as a real step's are
    base = Costs.uniform(n, 1, 1, 1)
    per_action = {a: rng.uniform(0.5, 2.0) for acts in sch.ranks for a in acts if a.kind.is_compute}
    costs = Costs(forward=base.forward, input_grad=base.input_grad, weight_grad=base.weight_grad,
                  per_action=per_action)  # fmt: skip
    sim = simulate(sch, costs)
    events = [TimedAction(t.rank, t.action, float(t.start), float(t.end)) for t in sim.timeline]
    again = replay(events, sch)
    assert again.makespan == pytest.approx(float(sim.makespan), rel=1e-9)
    # the per-stage means lose the variation: the mean-cost prediction differs
    assert predict(events, sch).makespan != pytest.approx(float(sim.makespan), rel=1e-9)
