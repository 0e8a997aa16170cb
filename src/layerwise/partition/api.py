"""``layerwise.partition(model, stages, ...)``: from a model to a partition the runtime accepts.

Glue around the pure pieces of this package: measure (``profile_layers``), solve
(:func:`~layerwise.partition.solver.solve`), then compare a few candidates with the schedule
simulator, because a pipeline's step time is not only its slowest stage: the fill and drain add
every stage's time once, a slow device stretches its own share, and communication adds latency
per boundary. torch is imported only inside the functions that need a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..schedule.generators import ScheduleConfigError, build
from ..schedule.simulate import Costs, SimResult, peak_inflight, simulate
from ._checks import InfeasiblePartitionError, PartitionError, check_partition, format_bytes
from .costs import Device, LayerCost
from .model_costs import merge, profile_with_loss, static_costs, unique_params
from .report import Plan
from .solver import balance_by_params, solve, stage_memory, stage_times, uniform

__all__ = ["BALANCE_MODES", "Plan", "partition", "profile_with_loss"]

BALANCE_MODES = ("time", "memory", "params", "uniform")


@dataclass(frozen=True)
class _Layout:
    """The schedule's shape and what each of its stages offers, from the devices (one per rank)."""

    num_stages: int
    stage_to_rank: tuple[int, ...]
    inflight: list[float]  # per stage, microbatches of activations held at the peak
    speeds: list[float]  # per stage, its rank's device speed
    budgets: list[float | None]  # per stage, bytes (a rank's budget shared by its stages)
    names: list[str]


def partition(
    model: Any,
    stages: int,
    *,
    balance: str | Sequence[int] = "time",
    devices: Sequence[Device] | None = None,
    sample: Any = None,
    schedule: str = "1f1b",
    microbatches: int = 4,
    costs: Sequence[LayerCost] | None = None,
    comm_latency: float | None = None,
    chunks: int = 2,
) -> Plan:
    """Split ``model`` into contiguous stages for ``stages`` pipeline ranks.

    Args:
        model: anything ``Pipeline`` accepts (``nn.Sequential``, a list of modules, a
            ``LayeredModel``, a model with ``pipeline_layers()``), or ``None`` with ``costs``.
        stages: pipeline ranks, as ``Pipeline(stages=...)``; with ``schedule="interleaved"`` the
            plan has ``stages * chunks`` model stages.
        balance: ``"time"`` (slowest stage on its device, then the simulated step time),
            ``"memory"`` (largest stage memory, or largest share of its budget when every device
            has one), ``"params"`` (largest parameter count) or ``"uniform"`` (layer count). A
            list of layer counts (torchgpipe's ``balance=[...]``) evaluates that partition.
        devices: one per rank, in pipeline order, with relative speed and memory budget.
            Default: identical devices without a budget.
        sample: one microbatch of input for ``profile_layers`` (times and activation memory).
        costs: per-layer costs instead of profiling; one extra trailing entry is the loss's cost,
            counted on the last stage (see :func:`profile_with_loss`).
        comm_latency: seconds per message between ranks, for the simulation.

    Raises:
        PartitionError: bad arguments, e.g. more stages than layers, or ``balance="time"``
            without ``sample`` or ``costs``.
        InfeasiblePartitionError: nothing fits the memory budgets; says which stage lacks how much.
    """
    given = None if isinstance(balance, str) else list(balance)
    if given is None and balance not in BALANCE_MODES:
        raise PartitionError(
            f"unknown balance {balance!r}: choose one of {', '.join(BALANCE_MODES)}, or give layer "
            f"counts per stage"
        )
    latency = _check_latency(comm_latency)
    layout, devs = _layout(stages, devices, schedule, microbatches, chunks)
    costs, params, timed = _layer_costs(model, sample, costs, layout, need_time=balance == "time")
    if given is not None:
        counts = check_partition(given, len(costs))
        if len(counts) != layout.num_stages:
            raise PartitionError(f"balance={counts} has {len(counts)} stages, expected {layout.num_stages}")
        mode = "given"
    elif balance == "time":
        counts = _time_balanced(costs, layout, schedule, microbatches, latency)
    elif balance == "memory":
        counts = _memory_balanced(costs, layout)
    elif balance == "params":
        counts = balance_by_params(params, layout.num_stages)
    else:
        counts = uniform(len(costs), layout.num_stages)
    if given is None:
        mode = str(balance)
    memory = _stage_mem(costs, counts, layout)
    if mode in ("params", "uniform", "given"):
        _check_budgets(counts, memory, layout, mode)
    sim = _simulate(costs, counts, layout, schedule, microbatches, latency) if timed else None
    return _plan(counts, costs, params, memory, layout, devs, sim, mode, schedule, microbatches, latency, timed)


# -- inputs ------------------------------------------------------------------------------------


def _check_latency(value: float | None) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PartitionError(f"comm_latency must be seconds >= 0, got {value!r}")
    return float(value)


def _layout(
    stages: int, devices: Sequence[Device] | None, schedule: str, microbatches: int, chunks: int
) -> tuple[_Layout, list[Device]]:
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise PartitionError(f"stages must be an int >= 1 (pipeline ranks), got {stages!r}")
    devs = [Device(name=f"rank{r}") for r in range(stages)] if devices is None else list(devices)
    if len(devs) != stages:
        raise PartitionError(
            f"{len(devs)} devices for {stages} stages: give one Device per pipeline rank, in order"
        )
    for r, d in enumerate(devs):
        if not isinstance(d, Device):
            raise PartitionError(f"devices[{r}] must be a layerwise.partition.Device, got {d!r}")
    try:
        sch = build(schedule, stages=stages, microbatches=microbatches, chunks=chunks)
    except ScheduleConfigError as err:
        raise PartitionError(str(err)) from None
    per_rank = [len(sch.stages_of(r)) for r in range(stages)]
    budgets: list[float | None] = []
    for r in sch.stage_to_rank:
        cap = devs[r].memory_bytes
        # Interleaved: a rank's stages share its memory; give each an equal share, since the
        # solver budgets stages independently.
        budgets.append(None if cap is None else cap / per_rank[r])
    layout = _Layout(
        num_stages=sch.num_stages,
        stage_to_rank=sch.stage_to_rank,
        inflight=[float(k) for k in peak_inflight(sch)],
        speeds=[devs[r].speed for r in sch.stage_to_rank],
        budgets=budgets,
        names=[devs[r].name for r in sch.stage_to_rank],
    )
    return layout, devs


def _check_depth(num_layers: int, layout: _Layout) -> None:
    if layout.num_stages > num_layers:
        ranks = max(layout.stage_to_rank) + 1
        what = f"{ranks} ranks x {layout.num_stages // ranks} chunks = " if layout.num_stages > ranks else ""
        raise PartitionError(
            f"cannot split {num_layers} layers into {what}{layout.num_stages} stages: every stage "
            f"needs at least one layer. Use at most {num_layers} stages, or split the model into "
            f"finer layers."
        )


def _layer_costs(
    model: Any, sample: Any, costs: Sequence[LayerCost] | None, layout: _Layout, *, need_time: bool
) -> tuple[list[LayerCost], list[int], bool]:
    """Per-layer costs (the loss folded into the last layer), parameter counts, and whether the
    times are real (measured or given) rather than zero placeholders."""
    layers = None
    if model is not None:
        from ..runtime.errors import ConfigError
        from ..runtime.split import as_layers

        try:
            layers = as_layers(model)
        except ConfigError as err:
            raise PartitionError(str(err)) from None
        _check_depth(len(layers), layout)
    elif costs is None:
        raise PartitionError("pass a model, or costs=[LayerCost, ...] with model=None")
    if costs is not None:
        out = list(costs)
        for k, c in enumerate(out):
            if not isinstance(c, LayerCost):
                raise PartitionError(f"costs[{k}] must be a LayerCost, got {type(c).__name__}")
        if layers is not None and len(out) not in (len(layers), len(layers) + 1):
            raise PartitionError(
                f"costs has {len(out)} entries but the model has {len(layers)} layers: give one "
                f"per layer, plus optionally one trailing entry for the loss"
            )
        if layers is not None and len(out) == len(layers) + 1:
            out = [*out[:-2], merge(out[-2], out[-1])]  # the loss runs on the last stage
        timed = True
    elif sample is not None:
        from .profile import profile_layers

        assert layers is not None
        out, timed = profile_layers(layers, sample), True
    elif need_time:
        raise PartitionError(
            "balance='time' needs per-layer times: pass sample=<one microbatch of input> to "
            "profile the model, or costs=[LayerCost, ...]; balance='params' needs only the model"
        )
    else:
        assert layers is not None
        out, timed = static_costs(layers), False
    if not out:
        raise PartitionError("no layers to split: costs is empty")
    _check_depth(len(out), layout)
    # Without a model, count parameters from their bytes, assuming 4-byte (float32) values.
    if layers is not None:
        params = [sum(p.numel() for p in ps) for ps in unique_params(layers)]
    else:
        params = [round(c.param_bytes / 4) for c in out]
    return out, params, timed


# -- the three balancers -------------------------------------------------------------------------


def _solve(costs: Sequence[LayerCost], layout: _Layout, budgets: Sequence[float | None]) -> list[int]:
    return solve(
        [c.time_s for c in costs],
        stages=layout.num_stages,
        memory=[c.static_bytes for c in costs],
        activations=[c.activation_bytes for c in costs],
        inflight=layout.inflight,
        speeds=layout.speeds,
        budgets=budgets,
        names=layout.names,
    )


def _time_balanced(
    costs: list[LayerCost], layout: _Layout, schedule: str, microbatches: int, latency: float
) -> list[int]:
    """The solver's optimum, then the schedule-aware step.

    The solver minimises the slowest stage, which is the step time only in the limit of many
    microbatches; the simulated makespan also pays each stage's time once in the fill and drain
    (so with unequal speeds a different bottleneck-optimal split can be faster) and the latency of
    every boundary. So compare the optimum, its neighbours (one boundary moved by one layer) and
    the memory-optimal partition by simulated makespan, keeping the solver's order on ties.
    """
    best = _solve(costs, layout, layout.budgets)
    candidates = [best]
    for b in range(len(best) - 1):
        for d in (-1, 1):
            moved = list(best)
            moved[b] += d
            moved[b + 1] -= d
            if min(moved) >= 1 and _fits(costs, moved, layout):
                candidates.append(moved)
    candidates.append(_memory_balanced(costs, layout))
    chosen, fastest = best, math.inf
    seen: set[tuple[int, ...]] = set()
    for counts in candidates:
        if tuple(counts) in seen:
            continue
        seen.add(tuple(counts))
        span = float(_simulate(costs, counts, layout, schedule, microbatches, latency).makespan)
        if span < fastest:  # strict: the earlier candidate wins a tie
            chosen, fastest = counts, span
    return chosen


def _memory_balanced(costs: list[LayerCost], layout: _Layout) -> list[int]:
    """Minimise the largest stage memory (or, when every device has a budget, the largest share
    of its budget), within the budgets; among those, the fastest by the solver's time objective.

    Exact: the optimum is one of the stage memories the solver can form, so binary-search the
    sorted candidate values for the smallest cap under which the solver finds a partition.
    """
    finite = all(b is not None for b in layout.budgets)
    scale = [float(b) if finite and b else 1.0 for b in layout.budgets]  # type: ignore[arg-type]
    values = sorted({m / scale[s] for s, m in _span_memories(costs, layout)})

    def caps(limit: float) -> list[float | None]:
        # One part in 1e12 of slack so that (m / scale) * scale, which can round below m, still
        # admits the span m came from.
        out: list[float | None] = []
        for s, b in enumerate(layout.budgets):
            cap = limit * scale[s] * (1 + 1e-12)
            out.append(cap if b is None else min(b, cap))
        return out

    found = None
    lo, hi = 0, len(values) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            found = _solve(costs, layout, caps(values[mid]))
            hi = mid - 1
        except InfeasiblePartitionError:
            lo = mid + 1
    return found if found is not None else _solve(costs, layout, layout.budgets)  # raises, explained


def _span_memories(costs: list[LayerCost], layout: _Layout) -> list[tuple[int, float]]:
    """``(stage, memory)`` of every span ``[i, j)`` stage ``s`` could hold, summed as the solver does."""
    n, num = len(costs), layout.num_stages
    out = []
    for s in range(num):
        for i in range(s, n - (num - s) + 1):
            static = saved = 0.0
            for j in range(i, n - (num - s - 1)):
                static += costs[j].static_bytes
                saved += costs[j].activation_bytes
                out.append((s, static + layout.inflight[s] * saved))
    return out


# -- evaluation -----------------------------------------------------------------------------------


def _stage_mem(costs: list[LayerCost], counts: list[int], layout: _Layout) -> list[float]:
    return stage_memory(
        [c.static_bytes for c in costs], counts,
        activations=[c.activation_bytes for c in costs], inflight=layout.inflight,
    )  # fmt: skip


def _fits(costs: list[LayerCost], counts: list[int], layout: _Layout) -> bool:
    mem = _stage_mem(costs, counts, layout)
    return all(b is None or m <= b for m, b in zip(mem, layout.budgets))


def _check_budgets(counts: list[int], memory: list[float], layout: _Layout, balance: str) -> None:
    first = 0
    for s, count in enumerate(counts):
        budget = layout.budgets[s]
        if budget is not None and memory[s] > budget:
            raise InfeasiblePartitionError(
                f"balance={balance!r} gives {counts}, and stage {s} (device {layout.names[s]!r}, "
                f"layers {first}-{first + count - 1}) needs {format_bytes(memory[s])} but its "
                f"budget is {format_bytes(budget)}, {format_bytes(memory[s] - budget)} missing. "
                f"Use balance='memory' (or 'time'), which respect the budgets.",
                closest=list(counts),
                missing_bytes={s: memory[s] - budget},
            )
        first += count


def _simulate(
    costs: list[LayerCost], counts: list[int], layout: _Layout, schedule: str, microbatches: int, latency: float
) -> SimResult:
    """One step of ``schedule`` with each stage's summed layer costs, on its rank's speed.

    The backward is split evenly into input and weight gradient for schedules that separate them
    (zero-bubble); LayerCost does not measure the two parts apart.
    """
    fwd = stage_times([c.forward_s for c in costs], counts)
    bwd = stage_times([c.backward_s for c in costs], counts)
    ranks = max(layout.stage_to_rank) + 1
    speed = [1.0] * ranks
    for s, r in enumerate(layout.stage_to_rank):
        speed[r] = layout.speeds[s]
    sim_costs = Costs(
        forward=tuple(fwd),
        input_grad=tuple(b / 2 for b in bwd),
        weight_grad=tuple(b / 2 for b in bwd),
        latency=latency,
        rank_speed=tuple(speed),
    )
    chunks = layout.num_stages // ranks
    return simulate(build(schedule, stages=ranks, microbatches=microbatches, chunks=chunks), sim_costs)


def _plan(
    counts: list[int], costs: list[LayerCost], params: list[int], memory: list[float], layout: _Layout,
    devs: list[Device], sim: SimResult | None, balance: str, schedule: str, microbatches: int,
    latency: float, timed: bool,
) -> Plan:  # fmt: skip
    return Plan(
        counts,
        stage_times=stage_times([c.time_s for c in costs], counts, layout.speeds) if timed else None,
        stage_memory=memory,
        stage_params=[int(p) for p in stage_times(params, counts)],  # sums per stage
        stage_devices=[devs[r] for r in layout.stage_to_rank],
        predicted_step_time=None if sim is None else float(sim.makespan),
        predicted_bubble=None if sim is None else float(sim.bubble_fraction),
        balance=balance,
        devices=devs,
        schedule=schedule,
        microbatches=microbatches,
        comm_latency=latency,
    )

