"""The stage balancer against brute force, plus its edge cases and error messages."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise.partition import (
    Device,
    InfeasiblePartitionError,
    LayerCost,
    PartitionError,
    balance,
    balance_by_params,
    inflight_1f1b,
    solve,
    stage_memory,
    stage_times,
    uniform,
)

MIB = 1024**2


# --- brute force, written from solve()'s docstring, independent of the solver ---------------


def _add(values: list[float]) -> float:
    total = 0.0  # left to right, as documented
    for v in values:
        total += v
    return total


def _compositions(n: int, k: int) -> list[list[int]]:
    out = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


def brute_force(times, stages, memory, activations, inflight, speeds, budgets) -> list[int] | None:
    best_key = None
    best = None
    for counts in _compositions(len(times), stages):
        ts, fits, first = [], True, 0
        for s, c in enumerate(counts):
            span = slice(first, first + c)
            first += c
            ts.append(_add(times[span]) / speeds[s])
            mem = _add(memory[span]) + inflight[s] * _add(activations[span])
            if budgets[s] is not None and mem > budgets[s]:
                fits = False
        if not fits:
            continue
        squares = sum(Fraction(t) ** 2 for t in ts)  # exact, as documented
        key = (max(ts), squares, counts)
        if best_key is None or key < best_key:
            best_key, best = key, counts
    return best


# Few distinct values so that ties (and zeros) are common.
_cost = st.one_of(st.just(0.0), st.integers(1, 4).map(float), st.floats(0.0, 10.0))


@st.composite
def instances(draw):
    n = draw(st.integers(1, 9))
    stages = draw(st.integers(1, n))
    times = draw(st.lists(_cost, min_size=n, max_size=n))
    memory = draw(st.lists(_cost, min_size=n, max_size=n))
    activations = draw(st.lists(_cost, min_size=n, max_size=n))
    inflight = draw(st.lists(st.integers(0, 4).map(float), min_size=stages, max_size=stages))
    speeds = draw(
        st.lists(
            st.one_of(st.sampled_from([0.25, 0.5, 1.0, 2.0]), st.floats(0.25, 2.0)),
            min_size=stages,
            max_size=stages,
        )
    )
    # Budgets around what a fair share needs, so that both outcomes are common.
    budget = st.one_of(st.none(), st.floats(0.0, 60.0))
    budgets = draw(st.lists(budget, min_size=stages, max_size=stages))
    return times, stages, memory, activations, inflight, speeds, budgets


@settings(max_examples=400, deadline=None)
@given(instances())
def test_solve_matches_brute_force(case) -> None:
    times, stages, memory, activations, inflight, speeds, budgets = case
    expected = brute_force(times, stages, memory, activations, inflight, speeds, budgets)
    kwargs = dict(
        stages=stages,
        memory=memory,
        activations=activations,
        inflight=inflight,
        speeds=speeds,
        budgets=budgets,
    )
    if expected is None:
        with pytest.raises(InfeasiblePartitionError) as info:
            solve(times, **kwargs)
        assert info.value.missing_bytes, "an infeasible instance must name an overflowing stage"
        return
    got = solve(times, **kwargs)
    assert got == expected
    used = stage_memory(memory, got, activations=activations, inflight=inflight)
    for s, b in enumerate(budgets):
        assert b is None or used[s] <= b
    bottleneck = max(stage_times(times, got, speeds))
    assert bottleneck == max(stage_times(times, expected, speeds))


def test_tie_break_is_exact_where_floats_absorb() -> None:
    # 2 + 2**-52 rounds to 2, so both splits have bottleneck 2; squares 4 + 2**-104 (float: 4)
    # against exactly 4. Float sums made the answer depend on the order of additions.
    assert solve([2.0, 2.0**-52, 0.0], stages=2) == [2, 1]
    # 4 + 2e-38 rounds to 4: [1, 1, 3, 1] has squares 16 + 3e-76, [1, 1, 1, 3] 16 + 11e-76.
    assert solve([1e-38, 1e-38, 4.0, 1e-38, 1e-38, 1e-38], stages=4) == [1, 1, 3, 1]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=9), st.data())
def test_balance_by_params_minimises_largest_stage(params, data) -> None:
    stages = data.draw(st.integers(1, len(params)))
    got = balance_by_params(params, stages)
    best = min(max(stage_times(params, c)) for c in _compositions(len(params), stages))
    assert max(stage_times(params, got)) == best


# --- edge cases ------------------------------------------------------------------------------


def test_one_stage_takes_everything() -> None:
    assert solve([3.0, 1.0, 2.0], stages=1) == [3]


def test_as_many_stages_as_layers() -> None:
    assert solve([3.0, 1.0, 2.0], stages=3, speeds=[1.0, 0.5, 2.0]) == [1, 1, 1]


def test_all_zero_costs_tie_break_is_deterministic() -> None:
    # Every partition is optimal; the lexicographically smallest counts win.
    assert solve([0.0] * 5, stages=2) == [1, 4]
    assert solve([0.0] * 5, stages=2) == solve([0.0] * 5, stages=2)


def test_even_split_prefers_balanced_stages() -> None:
    assert solve([1.0] * 8, stages=4) == [2, 2, 2, 2]
    assert solve([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], stages=3) == [3, 2, 1]


def test_slow_device_gets_fewer_layers() -> None:
    assert solve([1.0] * 6, stages=2, speeds=[1.0, 0.5]) == [4, 2]


def test_memory_budget_moves_layers() -> None:
    # Time alone would split 2/2; stage 0 only has room for one layer.
    got = solve([1.0] * 4, stages=2, memory=[10.0] * 4, budgets=[15.0, None])
    assert got == [1, 3]


def test_activations_scale_with_inflight() -> None:
    # 1F1B with 4 microbatches: stage 0 holds 2 in flight, stage 1 holds 1.
    assert inflight_1f1b(2, 4) == [2, 1]
    assert inflight_1f1b(4, 2) == [2, 2, 2, 1]
    got = solve([1.0] * 4, stages=2, activations=[5.0] * 4, inflight=[2.0, 1.0], budgets=[10.0, 15.0])
    assert got == [1, 3]
    assert stage_memory([0.0] * 4, got, activations=[5.0] * 4, inflight=[2.0, 1.0]) == [10.0, 15.0]


def test_more_stages_than_layers_message() -> None:
    with pytest.raises(PartitionError) as info:
        solve([1.0, 2.0, 3.0], stages=5)
    text = str(info.value)
    assert "3 layers" in text and "5 stages" in text and "stages <= 3" in text


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"stages": 0}, "stages must be >= 1"),
        ({"stages": 2, "speeds": [1.0]}, "speeds has 1 entries"),
        ({"stages": 2, "memory": [1.0]}, "memory has 1 entries"),
        ({"stages": 2, "speeds": [1.0, 0.0]}, "speeds[1] must be > 0"),
        ({"stages": 2, "budgets": [1.0, -1.0]}, "budgets[1]"),
        ({"stages": 2, "inflight": [1.0, math.nan]}, "inflight[1]"),
    ],
)
def test_bad_arguments(kwargs, fragment) -> None:
    with pytest.raises(PartitionError) as info:
        solve([1.0, 2.0, 3.0], **kwargs)
    assert fragment in str(info.value)


def test_negative_cost_is_rejected() -> None:
    with pytest.raises(PartitionError, match=r"times\[1\] must be a finite number >= 0"):
        solve([1.0, -2.0], stages=1)


def test_infeasible_message_names_stage_device_and_missing_amount() -> None:
    with pytest.raises(InfeasiblePartitionError) as info:
        solve(
            [1.0] * 4,
            stages=2,
            memory=[10 * MIB] * 4,
            budgets=[25 * MIB, 12 * MIB],
            names=["big", "small"],
        )
    err = info.value
    assert err.closest == [3, 1]
    assert err.missing_bytes == {0: 5 * MIB}
    text = str(err)
    assert "stage 0 (device 'big')" in text
    assert "5.00 MiB missing" in text
    assert "stages=3" in text


def test_infeasible_single_layer_says_more_stages_cannot_help() -> None:
    with pytest.raises(InfeasiblePartitionError, match="Layer 1 alone"):
        solve([1.0] * 3, stages=2, memory=[1.0, 100.0, 1.0], budgets=[50.0, 60.0])


def test_uniform() -> None:
    assert uniform(7, 3) == [3, 2, 2]
    assert uniform(6, 3) == [2, 2, 2]
    assert uniform(1, 1) == [1]
    with pytest.raises(PartitionError, match="stages <= 2"):
        uniform(2, 3)


def test_stage_helpers_validate_partition() -> None:
    assert stage_times([1.0, 2.0, 3.0], [2, 1], [1.0, 0.5]) == [3.0, 6.0]
    with pytest.raises(PartitionError, match="covers 2 layers"):
        stage_times([1.0, 2.0, 3.0], [1, 1])
    with pytest.raises(PartitionError, match=r"partition\[1\]"):
        stage_memory([1.0, 2.0], [2, 0])


def test_balance_uses_devices() -> None:
    cost = LayerCost(
        forward_s=1.0, backward_s=2.0, param_bytes=4.0, grad_bytes=4.0, optimizer_bytes=8.0,
        activation_bytes=1.0,
    )
    devices = [Device(name="fast", speed=2.0), Device(name="slow", memory_bytes=100.0)]
    assert balance([cost] * 6, devices) == [4, 2]
    assert balance([cost] * 6, 3) == [2, 2, 2]
    with pytest.raises(InfeasiblePartitionError, match="device 'slow'"):
        balance([cost] * 6, [Device(name="fast", memory_bytes=34.0), Device(name="slow", memory_bytes=30.0)])


def test_costs_and_devices_validate() -> None:
    cost = LayerCost(
        forward_s=1.0, backward_s=2.0, param_bytes=1.0, grad_bytes=2.0, optimizer_bytes=3.0,
        activation_bytes=0.0,
    )
    assert cost.time_s == 3.0 and cost.static_bytes == 6.0
    with pytest.raises(ValueError, match="LayerCost.forward_s"):
        LayerCost(forward_s=-1.0, backward_s=0, param_bytes=0, grad_bytes=0, optimizer_bytes=0,
                  activation_bytes=0)
    with pytest.raises(ValueError, match="speed must be"):
        Device(name="x", speed=0.0)
    with pytest.raises(ValueError, match="memory_bytes"):
        Device(name="x", memory_bytes=-5)


def test_solver_does_not_import_torch() -> None:
    code = (
        "import layerwise.partition.solver, layerwise.partition, sys; "
        "from layerwise.partition import solve; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
