"""Balance contiguous pipeline stages: numbers in, layer counts out (pure Python, no torch).

The problem is the classic linear partition ("chains-on-chains") problem of Bokhari (1988), the
one torchgpipe's ``balance`` solves, extended with per-device speeds and memory budgets so that
stage ``s`` may sit on a slower or smaller device. With speeds and budgets the greedy
"binary search on the bottleneck" check is no longer exact (a stage's capacity depends on which
device it lands on and what fits in memory), so this module solves it by dynamic programming.
"""

from __future__ import annotations

import math
from fractions import Fraction
from collections.abc import Iterator, Sequence

from ._checks import (
    InfeasiblePartitionError,
    PartitionError,
    Problem,
    build_problem,
    check_partition,
    check_stages,
    check_values,
    format_bytes,
)

__all__ = [
    "InfeasiblePartitionError",
    "PartitionError",
    "balance_by_params",
    "solve",
    "stage_memory",
    "stage_times",
    "uniform",
]

_INF = math.inf


def solve(
    times: Sequence[float],
    *,
    stages: int,
    memory: Sequence[float] | None = None,
    activations: Sequence[float] | None = None,
    inflight: Sequence[float] | None = None,
    speeds: Sequence[float] | None = None,
    budgets: Sequence[float | None] | None = None,
    names: Sequence[str] | None = None,
) -> list[int]:
    """Split ``len(times)`` layers into ``stages`` contiguous stages; return layers per stage.

    Stage ``s`` holds layers ``[a, b)`` and runs on device ``s``. Its time is
    ``sum(times[a:b]) / speeds[s]`` and its memory is
    ``sum(memory[a:b]) + inflight[s] * sum(activations[a:b])`` (sums taken left to right).

    Args:
        times: per layer, forward + backward seconds of one microbatch at speed 1.
        stages: number of stages, ``1 <= stages <= len(times)``.
        memory: per layer, static bytes (parameters, gradients, optimizer state). Default 0.
        activations: per layer, bytes saved for backward per microbatch. Default 0.
        inflight: per stage, microbatches whose activations the stage holds at once; for 1F1B
            with ``m`` microbatches and ``p`` stages that is ``min(m, p - s)``. Default 1.
        speeds: per stage, relative speed of its device (0.5 = half as fast). Default 1.
        budgets: per stage, memory budget in bytes, ``None`` = unlimited. Default unlimited.
        names: per stage, device names used only in error messages.

    Returns:
        The optimal partition: it minimises the bottleneck ``max_s stage_time[s]`` over all
        contiguous partitions whose stages fit their budgets. Ties are broken deterministically:
        first the smallest sum of squared stage times (``t0**2 + ... + t_last**2``, each stage
        time a float, the squares and their sum exact; it prefers evenly loaded stages), then the lexicographically smallest list of counts
        (extra layers go to later stages, which under 1F1B hold the fewest microbatches).

    Raises:
        PartitionError: bad arguments (stages out of range, negative or non-finite costs,
            lists of the wrong length).
        InfeasiblePartitionError: no partition fits the budgets; the message names the stage
            that overflows in the closest partition and by how much.

    Complexity: O(S * L**2) time and O(S * L) memory for L layers and S stages: two dynamic
    programs over (stage, first layer of the stage), each trying every end of the stage.
    """
    problem = build_problem(times, stages, memory, activations, inflight, speeds, budgets, names)
    bottleneck = _min_bottleneck(problem)
    if bottleneck == _INF:
        raise _infeasible(problem)
    return _most_even(problem, bottleneck)


def _spans(p: Problem, s: int, i: int, *, fit: bool = True) -> Iterator[tuple[int, float, float]]:
    """Yield ``(end, time, memory)`` for stage ``s`` holding layers ``[i, end)``, end ascending.

    Ends leave at least one layer for each later stage. With ``fit`` it stops at the first span
    that exceeds the stage's budget: costs are non-negative, so longer spans only grow.
    """
    static = 0.0
    saved = 0.0
    total = 0.0
    last = p.num_layers - (p.num_stages - s - 1)
    for j in range(i + 1, last + 1):
        total += p.times[j - 1]
        static += p.memory[j - 1]
        saved += p.activations[j - 1]
        mem = static + p.inflight[s] * saved
        if fit and mem > p.budgets[s]:
            return
        yield j, total / p.speeds[s], mem


def _table(p: Problem, last: float) -> list[list[float]]:
    """``table[s][i]``: best value for layers ``[i, L)`` on stages ``[s, S)``; only the end is set."""
    table = [[_INF] * (p.num_layers + 1) for _ in range(p.num_stages + 1)]
    table[p.num_stages][p.num_layers] = last
    return table


def _starts(p: Problem, s: int) -> range:
    # Stage s starts after at least s layers and leaves at least one layer per remaining stage.
    return range(s, p.num_layers - (p.num_stages - s) + 1)


def _min_bottleneck(p: Problem) -> float:
    """The smallest achievable ``max_s stage_time[s]``, or inf when nothing fits in memory."""
    best = _table(p, 0.0)
    for s in reversed(range(p.num_stages)):
        nxt = best[s + 1]
        for i in _starts(p, s):
            value = _INF
            for j, t, _ in _spans(p, s, i):
                if t >= value:
                    break  # longer spans are no faster, so none can beat `value`
                value = min(value, max(t, nxt[j]))
            best[s][i] = value
    return best[0][0]


def _most_even(p: Problem, bottleneck: float) -> list[int]:
    """Among partitions with every stage time <= ``bottleneck``, the tie-break winner."""
    # Exact arithmetic: in floats, t0**2 + X and t0**2 + Y can round equal although X < Y, and a
    # per-suffix minimum then disagrees with the whole-partition order (times near 1e-38 next to a
    # stage of 4 did). A float's square is an exact Fraction, so the documented order holds exactly.
    squares: list[list[Fraction | float]] = _table(p, 0.0)  # type: ignore[assignment]
    squares[p.num_stages][p.num_layers] = Fraction(0)  # Fraction + float is a float: start exact
    choice = [[-1] * (p.num_layers + 1) for _ in range(p.num_stages)]
    for s in reversed(range(p.num_stages)):
        nxt = squares[s + 1]
        for i in _starts(p, s):
            value = _INF
            for j, t, _ in _spans(p, s, i):
                if t > bottleneck:
                    break
                candidate = Fraction(t) ** 2 + nxt[j]
                if candidate < value:  # strict: the smallest end (fewest layers) wins ties
                    value, choice[s][i] = candidate, j
            squares[s][i] = value
    return _walk(choice, p.num_stages)


def _walk(choice: list[list[int]], stages: int) -> list[int]:
    counts: list[int] = []
    i = 0
    for s in range(stages):
        j = choice[s][i]
        assert j > i, "internal error: the tie-break pass lost the optimal partition"
        counts.append(j - i)
        i = j
    return counts


def _infeasible(p: Problem) -> InfeasiblePartitionError:
    """Explain why nothing fits, using the partition that minimises the largest overflow."""
    worst = _table(p, -_INF)
    choice = [[-1] * (p.num_layers + 1) for _ in range(p.num_stages)]
    for s in reversed(range(p.num_stages)):
        for i in _starts(p, s):
            for j, _, mem in _spans(p, s, i, fit=False):
                candidate = max(mem - p.budgets[s], worst[s + 1][j])
                if candidate < worst[s][i]:
                    worst[s][i], choice[s][i] = candidate, j
    closest = _walk(choice, p.num_stages)
    needed = stage_memory(
        p.memory, closest, activations=p.activations, inflight=p.inflight
    )
    missing = {s: needed[s] - p.budgets[s] for s in range(p.num_stages) if needed[s] > p.budgets[s]}
    lines = [
        f"no partition of {p.num_layers} layers into {p.num_stages} stages fits the memory "
        f"budgets. The closest, {closest}, still overflows:"
    ]
    first = 0
    for s, count in enumerate(closest):
        if s in missing:
            device = f" (device {p.names[s]!r})" if p.names[s] else ""
            lines.append(
                f"  stage {s}{device}, layers {first}-{first + count - 1}: needs "
                f"{format_bytes(needed[s])} but its budget is {format_bytes(p.budgets[s])}, "
                f"{format_bytes(missing[s])} missing"
            )
        first += count
    lines.append(_hint(p))
    return InfeasiblePartitionError("\n".join(lines), closest=closest, missing_bytes=missing)


def _hint(p: Problem) -> str:
    for k in range(p.num_layers):
        alone = [p.memory[k] + p.inflight[s] * p.activations[k] - p.budgets[s] for s in range(p.num_stages)]
        if min(alone) > 0:
            return (
                f"Layer {k} alone needs {format_bytes(min(alone))} more than the budget of any "
                f"device, so more stages cannot help: raise the budgets, shard or checkpoint "
                f"that layer, or hold fewer microbatches in flight."
            )
    more = f"more stages (stages={p.num_stages + 1}), " if p.num_stages < p.num_layers else ""
    return (
        f"Try {more}larger memory budgets, activation checkpointing, or fewer microbatches "
        f"in flight."
    )


def stage_times(
    times: Sequence[float], partition: Sequence[int], speeds: Sequence[float] | None = None
) -> list[float]:
    """Per stage, ``sum(times of its layers) / speeds[s]``, summed left to right as in :func:`solve`."""
    layers = check_values("times", times, len(times), "layer")
    counts = check_partition(partition, len(layers))
    spd = [1.0] * len(counts) if speeds is None else check_values("speeds", speeds, len(counts), "stage")
    out: list[float] = []
    first = 0
    for s, count in enumerate(counts):
        if spd[s] <= 0:
            raise PartitionError(f"speeds[{s}] must be > 0, got {spd[s]!r}")
        out.append(_add(layers[first : first + count]) / spd[s])
        first += count
    return out


def stage_memory(
    memory: Sequence[float],
    partition: Sequence[int],
    *,
    activations: Sequence[float] | None = None,
    inflight: Sequence[float] | None = None,
) -> list[float]:
    """Per stage, ``sum(memory) + inflight[s] * sum(activations)`` over its layers, as in :func:`solve`."""
    static = check_values("memory", memory, len(memory), "layer")
    counts = check_partition(partition, len(static))
    saved = [0.0] * len(static) if activations is None else check_values(
        "activations", activations, len(static), "layer"
    )
    infl = [1.0] * len(counts) if inflight is None else check_values(
        "inflight", inflight, len(counts), "stage"
    )
    out: list[float] = []
    first = 0
    for s, count in enumerate(counts):
        span = slice(first, first + count)
        out.append(_add(static[span]) + infl[s] * _add(saved[span]))
        first += count
    return out


def _add(values: Sequence[float]) -> float:
    # A plain left-to-right sum, bit-for-bit the running sums of `_spans` (Python 3.12's
    # built-in sum() compensates rounding, which would make reported and solved values differ).
    total = 0.0
    for v in values:
        total += v
    return total


def uniform(num_layers: int, stages: int) -> list[int]:
    """As even as possible by layer count; the first ``num_layers % stages`` stages get one more."""
    check_stages(num_layers, stages)
    base, extra = divmod(num_layers, stages)
    return [base + 1] * extra + [base] * (stages - extra)


def balance_by_params(param_counts: Sequence[float], stages: int) -> list[int]:
    """Minimise the largest per-stage parameter count (DeepSpeed's ``partition_method="parameters"``).

    Exact, with :func:`solve`'s tie-break; O(S * L**2).
    """
    return solve(param_counts, stages=stages)
