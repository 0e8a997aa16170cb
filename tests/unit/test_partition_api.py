"""``layerwise.partition(...)``: modes, devices, budgets, the schedule-aware choice (no processes)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import layerwise.partition
from layerwise.partition import (
    Device,
    InfeasiblePartitionError,
    LayerCost,
    PartitionError,
    Plan,
    balance,
    profile_with_loss,
)
from layerwise.partition import api
from layerwise.runtime.split import resolve_partition

MIB = 1024.0**2


def cost(t: float, *, static: float = 0.0, saved: float = 0.0) -> LayerCost:
    """A layer whose forward + backward takes ``t`` seconds (1:2, as a matrix product's)."""
    return LayerCost(forward_s=t / 3, backward_s=2 * t / 3, param_bytes=static, grad_bytes=0.0,
                     optimizer_bytes=0.0, activation_bytes=saved)  # fmt: skip


def simulated(costs: list[LayerCost], counts: list[int], devices: list[Device], m: int) -> float:
    layout, _ = api._layout(len(devices), devices, "1f1b", m, 2)
    return float(api._simulate(costs, counts, layout, "1f1b", m, 0.0).makespan)


@pytest.fixture
def heavy_model() -> nn.Sequential:
    """Seven layers; layer 3 has 64x the parameters of the others."""
    torch.manual_seed(0)
    widths = [8, 8, 8, 64, 8, 8, 8]
    return nn.Sequential(*[nn.Linear(8, 8) if w == 8 else nn.Sequential(nn.Linear(8, w), nn.Linear(w, 8))
                           for w in widths])  # fmt: skip


def test_package_is_callable_and_still_a_package() -> None:
    assert callable(layerwise.partition)
    assert hasattr(layerwise.partition, "__path__")  # still a package: submodules import
    from layerwise.partition import solve
    from layerwise.partition.solver import uniform

    assert solve([1, 1, 1, 1], stages=2) == uniform(4, 2) == [2, 2]
    plan = layerwise.partition(None, 2, costs=[cost(1)] * 4)
    assert isinstance(plan, Plan) and plan == [2, 2]


def test_solver_import_stays_torch_free() -> None:
    code = "import sys, layerwise.partition.solver, layerwise.partition; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_plan_is_accepted_by_the_runtime(heavy_model: nn.Sequential) -> None:
    plan = layerwise.partition(heavy_model, 3, balance="params")
    assert resolve_partition(plan, len(heavy_model), 3) == list(plan)
    assert [len(r) for r in plan.stage_layers] == list(plan)
    assert plan.stage_layers[0].start == 0 and plan.stage_layers[-1].stop == len(heavy_model)
    copy = pickle.loads(pickle.dumps(plan))  # crosses process boundaries with launch()
    assert copy == plan and copy.stage_params == plan.stage_params
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["partition"] == list(plan) and len(data["stages"]) == 3


def test_params_mode_puts_the_heavy_layer_alone(heavy_model: nn.Sequential) -> None:
    plan = layerwise.partition(heavy_model, 3, balance="params")
    assert plan == [3, 1, 3]
    assert plan.stage_params[1] == sum(p.numel() for p in heavy_model[3].parameters())
    assert plan.predicted_step_time is None and plan.stage_times is None  # nothing was timed


def test_time_mode_puts_the_heavy_layer_alone() -> None:
    plan = layerwise.partition(None, 3, costs=[cost(t) for t in (1, 1, 1, 10, 1, 1, 1)], microbatches=8)
    assert plan == [3, 1, 3]
    assert plan.stage_times == pytest.approx([3, 10, 3])
    assert plan.predicted_step_time is not None and plan.predicted_step_time >= 8 * 10


def test_memory_mode_puts_the_heavy_layer_alone() -> None:
    costs = [cost(1, static=s * MIB) for s in (1, 1, 1, 20, 1, 1, 1)]
    plan = layerwise.partition(None, 3, balance="memory", costs=costs)
    assert plan == [3, 1, 3]
    assert plan.stage_memory == pytest.approx([3 * MIB, 20 * MIB, 3 * MIB])


def test_memory_mode_counts_activations_per_microbatch_in_flight() -> None:
    # Under 1F1B stage 0 of 2 holds 2 microbatches, stage 1 one: equal layers are not equal memory.
    costs = [cost(1, saved=MIB)] * 6
    plan = layerwise.partition(None, 2, balance="memory", costs=costs, microbatches=4)
    assert plan == [2, 4]
    assert plan.stage_memory == pytest.approx([4 * MIB, 4 * MIB])


def test_uniform_mode_ignores_costs() -> None:
    plan = layerwise.partition(None, 3, balance="uniform", costs=[cost(t) for t in (1, 1, 1, 10, 1, 1, 1)])
    assert plan == [3, 2, 2]


def test_a_given_partition_is_evaluated() -> None:
    costs = [cost(1)] * 6
    devices = [Device(name="fast"), Device(name="slow", speed=0.5)]
    plan = layerwise.partition(None, 2, balance=[3, 3], costs=costs, devices=devices)
    assert plan == [3, 3] and plan.balance == "given"
    assert plan.stage_times == pytest.approx([3, 6])
    with pytest.raises(PartitionError, match="covers 5 layers"):
        layerwise.partition(None, 2, balance=[3, 2], costs=costs)


def test_a_half_speed_device_gets_fewer_layers() -> None:
    costs = [cost(1)] * 12
    same = layerwise.partition(None, 2, costs=costs, microbatches=8)
    slow = layerwise.partition(
        None, 2, costs=costs, microbatches=8,
        devices=[Device(name="fast", speed=1.0), Device(name="slow", speed=0.5)],
    )  # fmt: skip
    assert same == [6, 6]
    assert slow == [8, 4]
    assert slow.stage_times == pytest.approx([8, 8])  # the slow stage's time is on its device
    assert slow.stage_devices[1].name == "slow"


def test_memory_budgets_are_respected() -> None:
    costs = [cost(1, static=MIB)] * 8
    devices = [Device(name="small", memory_bytes=2.5 * MIB), Device(name="big")]
    plan = layerwise.partition(None, 2, costs=costs, devices=devices, microbatches=4)
    assert plan == [2, 6]
    assert plan.stage_memory[0] <= 2.5 * MIB
    with pytest.raises(InfeasiblePartitionError, match="budget"):
        layerwise.partition(None, 2, balance="uniform", costs=costs, devices=devices)


def test_infeasible_memory_says_which_stage_lacks_how_much() -> None:
    costs = [cost(1, static=MIB)] * 4
    devices = [Device(name="a", memory_bytes=MIB), Device(name="b", memory_bytes=MIB)]
    for mode in ("time", "memory"):
        with pytest.raises(InfeasiblePartitionError) as err:
            layerwise.partition(None, 2, balance=mode, costs=costs, devices=devices)
        assert "missing" in str(err.value) and "'a'" in str(err.value)
        assert sum(err.value.missing_bytes.values()) == pytest.approx(2 * MIB)


def test_more_stages_than_layers_is_an_error(heavy_model: nn.Sequential) -> None:
    with pytest.raises(PartitionError, match="cannot split 7 layers into 8 stages"):
        layerwise.partition(heavy_model, 8, balance="uniform")
    with pytest.raises(PartitionError, match="4 ranks x 2 chunks"):
        layerwise.partition(heavy_model, 4, balance="uniform", schedule="interleaved")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"balance": "speed"}, "unknown balance"),
        ({}, "needs per-layer times"),  # balance="time" without sample or costs
        ({"devices": [Device(name="one")]}, "1 devices for 2 stages"),
        ({"schedule": "nope", "balance": "uniform"}, "unknown schedule"),
        ({"comm_latency": -1.0, "balance": "uniform"}, "comm_latency"),
        ({"costs": [cost(1)] * 3}, "costs has 3 entries but the model has 7 layers"),
    ],
)
def test_bad_arguments_are_explained(heavy_model: nn.Sequential, kwargs: dict, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        layerwise.partition(heavy_model, 2, **kwargs)


def test_schedule_aware_choice_beats_the_plain_solver() -> None:
    # Two microbatches on a fast and a half-speed device: the solver's [4, 2] evens the stages
    # (8 and 4 / 0.5 = 8) but the fill and drain make [5, 1] the shorter step.
    costs = [cost(t) for t in (3, 2, 2, 1, 3, 1)]
    devices = [Device(name="fast"), Device(name="slow", speed=0.5)]
    solver = balance(costs, devices, microbatches=2)
    plan = layerwise.partition(None, 2, costs=costs, devices=devices, microbatches=2)
    assert solver == [4, 2] and plan == [5, 1]
    assert plan.predicted_step_time == pytest.approx(simulated(costs, plan, devices, 2))
    assert plan.predicted_step_time < simulated(costs, solver, devices, 2)


def test_schedule_aware_choice_is_never_worse() -> None:
    import random

    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(3, 8)
        s = rng.randint(2, min(4, n))
        costs = [cost(rng.choice([1, 2, 3, 5])) for _ in range(n)]
        devices = [Device(name=f"d{k}", speed=rng.choice([1.0, 0.5])) for k in range(s)]
        m = rng.choice([1, 2, 4, 8])
        plan = layerwise.partition(None, s, costs=costs, devices=devices, microbatches=m)
        assert plan.predicted_step_time <= simulated(costs, balance(costs, devices, microbatches=m), devices, m)


def test_comm_latency_lengthens_the_prediction() -> None:
    costs = [cost(1)] * 4
    quiet = layerwise.partition(None, 2, costs=costs)
    slow = layerwise.partition(None, 2, costs=costs, comm_latency=0.5)
    assert slow.predicted_step_time > quiet.predicted_step_time and slow.comm_latency == 0.5


def test_a_trailing_cost_is_the_loss_on_the_last_stage(heavy_model: nn.Sequential) -> None:
    costs = [cost(1)] * 7
    without = layerwise.partition(heavy_model, 2, costs=costs)
    plan = layerwise.partition(heavy_model, 2, costs=[*costs, cost(3)])
    assert without == [4, 3] and plan == [5, 2]
    assert plan.stage_times == pytest.approx([5, 5])


def test_interleaved_plans_one_stage_per_chunk() -> None:
    plan = layerwise.partition(None, 2, costs=[cost(1)] * 8, schedule="interleaved", chunks=2,
                               devices=[Device(name="a"), Device(name="b", memory_bytes=MIB)])  # fmt: skip
    assert len(plan) == 4 and sum(plan) == 8
    assert [d.name for d in plan.stage_devices] == ["a", "b", "a", "b"]


def test_profiling_a_real_model_with_its_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    costs = profile_with_loss(model, x, nn.functional.mse_loss, y, repeats=1, warmup=0)
    assert len(costs) == 4 and costs[-1].param_bytes == 0
    plan = layerwise.partition(model, 2, sample=x)
    assert sum(plan) == 3 and plan.predicted_step_time is not None and plan.predicted_step_time > 0
    assert sum(plan.stage_params) == (8 * 16 + 16) + (16 * 4 + 4)
    assert all(p.grad is None for p in model.parameters())
