"""ZB-H2 and ZB-V against the papers' claims, in exact arithmetic (Qi et al. 2023 and 2024).

In one training step the last rank cannot start before the first forward reaches it, so no
schedule beats ``m (T_F + T_I + T_W) + (p - 1) T_F`` per full stage; "zero bubble" in the papers
means reaching that startup-only bound (the papers then overlap it with the next iteration).
"""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest

from layerwise.schedule.actions import Kind
from layerwise.schedule.core import Schedule
from layerwise.schedule.generators import ScheduleConfigError, build, chunks_per_rank
from layerwise.schedule.simulate import Costs, SimResult, lower_bound, simulate
from layerwise.schedule.zero_bubble import v_placement

RANKS = range(1, 9)


@functools.lru_cache(maxsize=None)
def _run(name: str, p: int, m: int, f: Fraction = Fraction(1), i: Fraction = Fraction(1),
         w: Fraction = Fraction(1)) -> tuple[Schedule, SimResult]:  # fmt: skip
    """Per full stage F, I, W; a rank with two chunks runs each chunk at half of that."""
    sch = build(name, stages=p, microbatches=m)
    v = chunks_per_rank(name)
    return sch, simulate(sch, Costs.uniform(sch.num_stages, f / v, i / v, w / v))


def _rank_peak(sch: Schedule, rank: int) -> int:
    """Most activations a rank holds at once, in microbatches of one of its stages (F to W)."""
    held = peak = 0
    for a in sch.ranks[rank]:
        held += {Kind.F: 1, Kind.W: -1}.get(a.kind, 0)
        peak = max(peak, held)
    return peak


def test_zbv_places_two_chunks_per_rank_in_a_v() -> None:
    for p in RANKS:
        sch = build("zbv", stages=p, microbatches=3)
        assert sch.stage_to_rank == v_placement(p) == tuple(range(p)) + tuple(reversed(range(p)))
        assert sch.num_stages == 2 * p and sch.split_backward
        assert all(sch.stages_of(r) == [r, 2 * p - 1 - r] for r in range(p))


def test_zbv_is_near_zero_bubble_for_m_at_least_2p() -> None:
    # A chunk is half a stage, so the startup is (p - 1) / 2 of a stage's forward: the bound is
    # 3m + (p - 1) / 2 with T_F = T_I = T_W = 1. Both of its orders (list scheduler, handcrafted) reach it within one action.
    for p in RANKS:
        for m in range(2 * p, 2 * p + 9):
            _, r = _run("zbv", p, m)
            bound = 3 * m + Fraction(p - 1, 2)
            assert bound <= r.makespan <= bound + 1, (p, m, r.makespan)


def test_zbv_beats_zb_h1_at_the_same_peak_memory() -> None:
    # Qi et al. 2024, Sec. 6: ZB-V keeps 1F1B's peak activation memory, p microbatches of a full
    # stage = 2p of a half-stage chunk, and halves ZB-H1's startup bubble.
    for p in RANKS:
        for m in range(1, 17):
            sch, zbv = _run("zbv", p, m)
            _, h1 = _run("zb-h1", p, m)
            _, one = _run("1f1b", p, m)
            assert max(_rank_peak(sch, r) for r in range(p)) <= 2 * min(m, p), (p, m)
            assert zbv.makespan <= h1.makespan <= one.makespan, (p, m)
            if p > 1:
                assert zbv.makespan < h1.makespan, (p, m)


def test_zb_h2_reaches_the_startup_bound_when_input_grads_cost_more() -> None:
    # Qi et al. 2023, Sec. 3.1: ZB-H1 idles (p - 1)(T_F + T_I - T_W) per rank; ZB-H2, with up to
    # 2p - 1 microbatches in flight, only the startup (p - 1) T_F. Here T_I = 2 > T_W = 1.
    f, i, w = Fraction(1), Fraction(2), Fraction(1)
    for p in RANKS:
        for m in range(2 * p, 2 * p + 7):
            sch, h2 = _run("zb-h2", p, m, f, i, w)
            _, h1 = _run("zb-h1", p, m, f, i, w)
            assert h2.makespan == m * (f + i + w) + (p - 1) * f, (p, m)
            assert h1.makespan - h2.makespan == (p - 1) * (i - w), (p, m)
            assert max(h2.peak_inflight) <= 2 * p - 1, (p, m)


def test_zb_h2_equals_zb_h1_under_the_papers_equal_costs() -> None:
    # With T_I = T_W ZB-H1 already reaches the startup bound 3m + p - 1 (m >= p); ZB-H2 must too.
    for p in RANKS:
        for m in range(p, 2 * p + 5):
            _, h2 = _run("zb-h2", p, m)
            assert h2.makespan == 3 * m + p - 1, (p, m)


@pytest.mark.parametrize("name", ["zb-h2", "zbv"])
def test_never_below_the_lower_bound_and_every_microbatch_once(name: str) -> None:
    for p in RANKS:
        for m in (1, 2, 3, p, 2 * p + 1):
            sch, r = _run(name, p, m)
            unit = Fraction(1, chunks_per_rank(name))
            assert r.makespan >= lower_bound(sch, Costs.uniform(sch.num_stages, unit, unit, unit))
            for s in range(sch.num_stages):
                for kind in (Kind.F, Kind.I, Kind.W):
                    mbs = [a.microbatch for acts in sch.ranks for a in acts if a.stage == s and a.kind is kind]
                    assert mbs == list(range(m)), (name, p, m, s, kind)  # in microbatch order


@pytest.mark.parametrize("name", ["zb-h2", "zbv"])
def test_bad_sizes_are_refused(name: str) -> None:
    with pytest.raises(ScheduleConfigError, match="stages must be >= 1"):
        build(name, stages=0, microbatches=4)
    with pytest.raises(ScheduleConfigError, match="microbatches must be >= 1"):
        build(name, stages=2, microbatches=0)
