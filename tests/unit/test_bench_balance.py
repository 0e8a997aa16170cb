"""The pure parts of bench/balance.py's paired prediction: which rank's profile costs which layer,
and how per-block predictions are compared with the blocks."""

from __future__ import annotations

from types import ModuleType

import pytest

from ..bench_module import load_bench



B = load_bench("balance_profile")

# two ranks' whole-model profiles of 4 layers plus the loss: [forward_s, backward_s] per entry
RANK0 = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]
RANK1 = [[11.0, 12.0], [13.0, 14.0], [15.0, 16.0], [17.0, 18.0], [19.0, 20.0]]


@pytest.mark.parametrize("counts", [[1, 3], [2, 2], [3, 1]])
def test_each_stage_takes_its_own_ranks_costs_and_the_loss_goes_last(counts: list[int]) -> None:
    got = B.rank_costs([RANK0, RANK1], counts)
    first = counts[0]
    assert got == RANK0[:first] + RANK1[first:]  # stage 1 (rank 1) also holds the loss entry
    assert len(got) == len(RANK0)


def test_without_a_loss_entry_the_stages_split_the_layers_only() -> None:
    assert B.rank_costs([RANK0[:4], RANK1[:4]], [3, 1]) == RANK0[:3] + RANK1[3:4]


def test_three_stages_take_three_ranks() -> None:
    rank2 = [[21.0, 22.0]] * 5
    assert B.rank_costs([RANK0, RANK1, rank2], [1, 2, 1]) == [RANK0[0], RANK1[1], RANK1[2], rank2[3], rank2[4]]


def test_a_profile_that_does_not_fit_the_plan_is_refused() -> None:
    with pytest.raises(ValueError, match="2 rank profiles for a plan of 3 stages"):
        B.rank_costs([RANK0, RANK1], [1, 1, 2])
    with pytest.raises(ValueError, match="rank 1's profile has 3 entries"):
        B.rank_costs([RANK0, RANK1[:3]], [2, 2])


def test_paired_error_is_the_median_per_block_ratio_against_one() -> None:
    # block 2 ran in a slow spell its profile also saw: predicted and measured both doubled
    predicted = [1.0, 2.0, 1.1, 0.9, 1.0]
    measured = [1.0, 2.0, 1.0, 1.0, 1.25]
    r = B.paired_error(predicted, measured)
    assert r["ratios"] == pytest.approx([1.0, 1.0, 1.1, 0.9, 0.8])
    assert r["median_ratio"] == pytest.approx(1.0)
    assert r["error"] == pytest.approx(0.0)
    assert r["abs_error_median"] == pytest.approx(0.1)


def test_paired_error_sees_a_steady_bias() -> None:
    r = B.paired_error([0.9, 1.8, 0.45], [1.0, 2.0, 0.5])  # 10% under every block
    assert r["error"] == pytest.approx(0.1)
    assert r["median_ratio"] == pytest.approx(0.9)


def test_paired_error_needs_one_prediction_per_block() -> None:
    with pytest.raises(ValueError, match="as many predictions as blocks"):
        B.paired_error([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many predictions as blocks"):
        B.paired_error([], [])
    with pytest.raises(ValueError, match="> 0"):
        B.paired_error([1.0], [0.0])


def test_spread_reports_every_run_and_the_range() -> None:
    s = B.spread([1.3, 1.1, 1.2])
    assert s == {"values": [1.3, 1.1, 1.2], "median": 1.2, "min": 1.1, "max": 1.3, "range": pytest.approx(0.2)}
    with pytest.raises(ValueError):
        B.spread([])


def test_stage_optimizer_picks_each_stages_range() -> None:
    ranges = {f"{a},{b}": 10 * a + b for a in range(4) for b in range(a + 1, 5)}
    assert B.stage_optimizer(ranges, [1, 3]) == [1, 14]
    assert B.stage_optimizer(ranges, [2, 1, 1]) == [2, 23, 34]


def _predict() -> ModuleType:
    return load_bench("balance_predict")


def test_the_decomposition_adds_up_to_measured_less_predicted() -> None:
    from types import SimpleNamespace

    plan = SimpleNamespace(predicted_step_time=0.300, stage_times=[0.030, 0.020])
    # one block: the runtime's costs simulate to 0.320 s, the span was 0.330 s, the call 0.338 s
    # (the all-reduce was timed at 0.005 s), the optimizer took 0.006 s (0.004 s predicted), and
    # the block's step 0.350 s
    timeline = [{"simulated_from_timeline_s": 0.320, "span_s": 0.330, "call_s": 0.338, "latency_s": 4e-4,
                 "forward_s": [0.011, 0.008], "backward_s": [0.022, 0.014]}]  # fmt: skip
    d = _predict().decompose([plan], [0.350], timeline, [0.005], [0.006], 0.004)
    assert d["costs_ms"] == pytest.approx(20.0)
    assert d["simulator_ms"] == pytest.approx(10.0)
    assert d["after_schedule_ms"] == pytest.approx(3.0)
    assert d["optimizer_ms"] == pytest.approx(2.0)
    assert d["rest_ms"] == pytest.approx(6.0)
    parts = sum(d[k] for k in ("costs_ms", "simulator_ms", "after_schedule_ms", "optimizer_ms", "rest_ms"))
    assert parts == pytest.approx(d["measured_less_predicted_ms"]) == pytest.approx(350.0 - 309.0)
    assert d["compute_vs_profile"] == pytest.approx([1.1, 1.1])
    assert d["latency_ms"] == pytest.approx(0.4)


def _step(samples0: list[list[list[float]]], samples1: list[list[list[float]]], span: float) -> list[dict]:
    events = [[0, 0, "F", 0, 0.0, 0.1], [1, 1, "B", 7, 0.2, span]]  # only the span is read from them
    return [{"samples": samples0, "events": events}, {"samples": samples1, "events": []}]


def test_skew_predictions_agree_when_every_run_took_the_same_time() -> None:
    S = load_bench("balance_skew")
    run = [[0.01, 0.02], [0.03, 0.06], [0.005, 0.005]]  # [embedding, head] + the loss, [f, b] each
    got = S.predictions([1, 1], _step([run] * 4, [run] * 4, span=1.0), seed=0)
    # 1F1B, 2 stages, 8 microbatches with constant costs: the three predictions are one simulation
    assert got["median"] == pytest.approx(got["mean"]) == pytest.approx(got["monte_carlo"])
    # stage 0 = the embedding (F 0.01, B 0.02), stage 1 = head and loss (F 0.035, B 0.065) is the
    # bottleneck: its 8 x 0.1 s, after stage 0's first forward, before stage 0's last backward
    assert got["span_s"] == 1.0 and got["median"] == pytest.approx(0.01 + 8 * 0.1 + 0.02)


def test_skew_mean_counts_a_slow_run_that_the_median_drops() -> None:
    S = load_bench("balance_skew")
    fast, slow = [[0.01, 0.02], [0.03, 0.06], [0.0, 0.0]], [[0.05, 0.10], [0.03, 0.06], [0.0, 0.0]]
    got = S.predictions([1, 1], _step([fast, fast, fast, slow], [fast] * 4, span=1.0), seed=1)
    assert got["mean"] > got["median"]  # stage 0's slow run is in its mean only
    assert got["monte_carlo"] > got["median"]  # drawn a quarter of the time
