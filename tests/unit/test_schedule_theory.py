"""The simulator against the closed forms of the papers, in exact arithmetic.

Costs are ints or :class:`fractions.Fraction`, so every comparison is ``==`` with no tolerance:
an off-by-one step in a generator shows up as a wrong fraction, not as a rounding error.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest

from layerwise.schedule.actions import Kind
from layerwise.schedule.generators import ScheduleConfigError, build
from layerwise.schedule.simulate import Costs, SimResult, lower_bound, simulate

RANKS = range(1, 9)


@functools.lru_cache(maxsize=None)
def _uniform(name: str, p: int, m: int, t_w: int | None = None) -> SimResult:
    """T_F = T_B = 1 (and T_W = t_w when given), no communication; cached because several
    tests sweep the same p x m grid and the sweep is most of this file's runtime."""
    return simulate(build(name, stages=p, microbatches=m), Costs.uniform(p, 1, 1, t_w))


def _bubble(result: SimResult, ranks: int) -> Fraction:
    """Idle time over total rank time, as an exact fraction."""
    return Fraction(sum(result.idle)) / Fraction(ranks * result.makespan)


# --- GPipe and 1F1B: bubble (p - 1) / (m + p - 1) --------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_fraction_of_gpipe_and_1f1b(name: str) -> None:
    # With T_F = T_B and no communication both take (m + p - 1)(T_F + T_B) and each rank works
    # m (T_F + T_B) of it (Huang et al. 2019; Narayanan et al. 2021, Sec. 2.2.1).
    for p in RANKS:
        for m in range(1, 33):
            result = _uniform(name, p, m)
            assert _bubble(result, p) == Fraction(p - 1, m + p - 1), (name, p, m)
            assert result.makespan == 2 * (m + p - 1), (name, p, m)


def test_peak_inflight_of_1f1b_and_gpipe() -> None:
    # 1F1B stage s warms up with p - s - 1 forwards and then holds one more: min(m, p - s).
    # GPipe runs every forward before any backward, so every stage holds all m.
    for p in RANKS:
        for m in range(1, 33):
            one = _uniform("1f1b", p, m)
            assert list(one.peak_inflight) == [min(m, p - s) for s in range(p)], (p, m)
            gp = _uniform("gpipe", p, m)
            assert list(gp.peak_inflight) == [m] * p, (p, m)


# --- Interleaved 1F1B: bubble (1 / v)(p - 1) / m ---------------------------------------------


@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_bubble_is_one_vth_of_1f1b(v: int) -> None:
    # Narayanan et al. 2021, Sec. 2.2.2: with v chunks per rank the bubble time is
    # (p - 1)(t_f + t_b) / v, so bubble / ideal = (1 / v)(p - 1) / m with ideal = m (t_f + t_b).
    # t_f is a rank's forward of one microbatch over all its chunks, so each chunk costs 1 / v.
    chunk = Fraction(1, v)
    t_f = t_b = 1
    for p in RANKS:
        for m in range(p, 33, p):
            schedule = build("interleaved", stages=p, microbatches=m, chunks=v)
            result = simulate(schedule, Costs.uniform(p * v, chunk, chunk))
            ideal = m * (t_f + t_b)
            assert isinstance(result.makespan, (int, Fraction)), "costs must stay exact"
            assert (result.makespan - ideal) / ideal == Fraction(p - 1, v * m), (p, m)


def test_interleaved_with_m_not_a_multiple_of_p() -> None:
    # The paper needs m to be a multiple of p; the generator also takes other m (shorter last
    # group, longer warm-up where Megatron's would deadlock). No closed form then, but the
    # schedule must be valid and interleaving must not lose to 1F1B on the same model.
    for v in (2, 3):
        for p in range(2, 7):
            for m in (n for n in range(1, 13) if n % p):
                schedule = build("interleaved", stages=p, microbatches=m, chunks=v)
                inter = simulate(schedule, Costs.uniform(p * v, 1, 1, 0))  # a chunk: 1/v of a rank
                one = simulate(build("1f1b", stages=p, microbatches=m), Costs.uniform(p, v, v, 0))
                assert inter.makespan <= one.makespan, (v, p, m)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [({"stages": 0, "microbatches": 4}, "stages must be >= 1"),
     ({"stages": 2, "microbatches": 0}, "microbatches must be >= 1"),
     ({"stages": 2, "microbatches": 4, "chunks": 0}, "chunks must be >= 1")],
)
def test_interleaved_rejects_bad_sizes(kwargs: dict[str, int], says: str) -> None:
    with pytest.raises(ScheduleConfigError, match=says):
        build("interleaved", **kwargs)


# --- ZB-H1: a third of 1F1B's bubble at the same peak memory ---------------------------------


def test_zb_h1_bubble_is_a_third_of_1f1b() -> None:
    # Qi et al. 2023, Sec. 3.1, with T_F = T_B = T_W = 1 (B is the input-gradient half here):
    # 1F1B idles (p - 1)(T_F + T_B + T_W) per rank, ZB-H1 (p - 1)(T_F + T_B - T_W), for m >= p.
    t_f = t_b = t_w = 1
    for p in RANKS:
        for m in range(p, 33):
            zb = _uniform("zb-h1", p, m, t_w)
            one = _uniform("1f1b", p, m, t_w)
            work = m * (t_f + t_b + t_w)
            assert zb.makespan - work == (p - 1) * (t_f + t_b - t_w), (p, m)
            assert one.makespan - work == (p - 1) * (t_f + t_b + t_w), (p, m)
            assert 3 * (zb.makespan - work) == one.makespan - work
            assert all(idle == zb.makespan - work for idle in zb.idle)


def test_zb_h1_keeps_1f1b_peak_memory() -> None:
    # "Same peak memory" in Qi et al. is the largest stage's: ZB-H1's later stages hold more
    # microbatches than 1F1B's (their W runs late, and a microbatch is held until its W), but no
    # stage holds more than p, which is 1F1B's stage 0. So the max is compared, not each stage.
    for p in RANKS:
        for m in range(1, 33):
            zb = _uniform("zb-h1", p, m, 1)
            one = _uniform("1f1b", p, m, 1)
            assert max(zb.peak_inflight) <= max(one.peak_inflight), (p, m)
            if m < p:  # no closed form; the split backward must at least not hurt
                assert zb.makespan <= one.makespan, (p, m)


# --- Simulator sanity ------------------------------------------------------------------------


def _hetero(p: int, rank_speed: tuple[float, ...] = ()) -> Costs:
    return Costs(
        forward=tuple(range(1, p + 1)),  # stage s: F = s + 1
        input_grad=tuple(2 * (s + 1) for s in range(p)),
        weight_grad=tuple(1 for _ in range(p)),
        rank_speed=rank_speed,
    )


def test_heterogeneous_stages_by_hand() -> None:
    # GPipe, p = 2, m = 2, F = (1, 2), B = I + W = (3, 5). Worked out on paper:
    # rank 0: F0 0-1, F1 1-2;  rank 1: F0 1-3, F1 3-5, B0 5-10, B1 10-15;  rank 0: B0 10-13, B1 15-18.
    result = simulate(build("gpipe", stages=2, microbatches=2), _hetero(2))
    assert result.makespan == 18
    assert result.busy == (1 + 1 + 3 + 3, 2 + 2 + 5 + 5)
    spans = {(t.rank, str(t.action)): (t.start, t.end) for t in result.timeline}
    assert spans[(0, "0B1")] == (15, 18)
    assert spans[(1, "1B0")] == (5, 10)


def test_rank_speed_scales_durations() -> None:
    # A rank at speed 1/2 runs each of its actions in twice the time; at speed 1/2 everywhere the
    # whole timeline stretches by 2 (every start and end is a max of sums of durations).
    half = Fraction(1, 2)
    for name in ("gpipe", "1f1b", "zb-h1"):
        schedule = build(name, stages=3, microbatches=5)
        base = simulate(schedule, _hetero(3))
        slow = simulate(schedule, _hetero(3, rank_speed=(1, half, 1)))
        base_d = {t.action: t.duration for t in base.timeline if t.action.kind.is_compute}
        for t in slow.timeline:
            if t.action.kind.is_compute:
                assert t.duration == base_d[t.action] * (2 if t.rank == 1 else 1), (name, t)
        assert slow.makespan > base.makespan
        all_slow = simulate(schedule, _hetero(3, rank_speed=(half, half, half)))
        assert all_slow.makespan == 2 * base.makespan, name


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_busy_is_the_sum_of_compute_costs(name: str) -> None:
    p, m = 4, 8
    schedule = build(name, stages=p, microbatches=m, chunks=2)
    n = schedule.num_stages
    costs = Costs(
        forward=tuple(Fraction(s + 1, 3) for s in range(n)),
        input_grad=tuple(Fraction(2 * s + 1, 5) for s in range(n)),
        weight_grad=tuple(Fraction(1, s + 2) for s in range(n)),
        rank_speed=(1, Fraction(1, 2), 2, 1),
    )
    result = simulate(schedule, costs)
    for r in range(p):
        expected = sum(
            (costs.duration(a, r) for a in schedule.ranks[r] if a.kind.is_compute), Fraction(0)
        )
        assert result.busy[r] == expected
        assert result.idle[r] == result.makespan - expected
    assert result.makespan >= lower_bound(schedule, costs)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_latency_adds_at_least_the_critical_path_communication(name: str) -> None:
    # The first microbatch crosses p - 1 boundaries to reach the last stage, which then has all
    # of its work to do, and the last backward crosses p - 1 boundaries back: every message on
    # that path is on the critical path, so latency L adds at least 2 (p - 1) L.
    latency = Fraction(3, 7)
    for p in range(1, 7):
        for m in (1, p, 2 * p + 1):
            schedule = build(name, stages=p, microbatches=m)
            free = simulate(schedule, Costs.uniform(p, Fraction(1), Fraction(2)))
            slow = simulate(schedule, Costs.uniform(p, Fraction(1), Fraction(2), latency=latency))
            assert slow.makespan >= free.makespan + 2 * (p - 1) * latency, (p, m)
            assert slow.busy == free.busy  # communication is not compute


def test_message_bytes_over_bandwidth_count_like_latency() -> None:
    # A message of b bytes at bandwidth w takes b / w; the simulator must not tell it apart from
    # the same latency.
    schedule = build("1f1b", stages=4, microbatches=6)
    by_bytes = simulate(schedule, Costs.uniform(4, 1, 1, message_bytes=3, bandwidth=4))
    by_latency = simulate(schedule, Costs.uniform(4, 1, 1, latency=Fraction(3, 4)))
    assert by_bytes.makespan == by_latency.makespan
    assert by_bytes.makespan >= 2 * (4 + 6 - 1) + 2 * 3 * Fraction(3, 4)


def test_receive_spans_show_only_the_message_in_flight() -> None:
    # With latency, a receive is drawn from the moment its message was posted until it arrives;
    # the wait before that is idle (a gap), and sends are instantaneous (isend).
    result = simulate(build("gpipe", stages=2, microbatches=1), Costs.uniform(2, 1, 1, latency=2))
    spans = {str(t.action): (t.start, t.end) for t in result.timeline}
    assert spans["0SF0"] == (1, 1)
    assert spans["1RF0"] == (1, 3)
    assert spans["1F0"] == (3, 4)
    assert result.makespan == 1 + 2 + 1 + 1 + 2 + 1
    assert {t.action.kind for t in result.timeline} >= {Kind.SEND_F, Kind.RECV_B}
    free = simulate(build("1f1b", stages=4, microbatches=8), Costs.uniform(4, 1, 1))
    assert all(t.start == t.end for t in free.timeline if t.action.kind.is_comm), "no cost, no strip"
