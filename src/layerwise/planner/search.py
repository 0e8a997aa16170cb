"""Search over strategies: everything the pins leave open, ranked by predicted step time.

Two passes keep a 4,096-device search under a few seconds: every strategy that satisfies the
placement rules gets its memory and a closed-form step time (:func:`.estimate.closed_makespan`),
and the fastest that fit are replayed exactly by the pipeline simulator, which decides the order.
Offload only ever adds time, so it is tried only for shapes that do not fit without it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .cluster import Cluster
from .estimate import Estimate, estimate
from .memory import PRECISIONS, RECOMPUTE, Precision
from .model import ModelSpec
from ..schedule.generators import compute_actions
from .strategy import SCHEDULES, SPLIT_BACKWARD, Strategy, StrategyError

_MAX_MICRO = 64
_CHUNKS = (2, 4, 8)
# ZB-H2 and ZB-V come from generators (layerwise.schedule.zero_bubble), not a formula: a
# replay first builds the schedule, ~0.1 s of CPU at this many compute actions and growing with
# them. Larger ones are searched only when pinned, so that a 4,096-device search stays in seconds.
_MAX_LISTED_ACTIONS = 10_000


@dataclass(frozen=True, kw_only=True)
class Pins:
    """Dimensions the user fixed; ``None`` = search it."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    schedule: str | None = None
    chunks: int | None = None
    micro: int | None = None
    zero_stage: int | None = None
    recompute: str | None = None
    offload: bool | None = None

    def any(self) -> bool:
        return any(getattr(self, k) is not None for k in self.__dataclass_fields__)


@dataclass(frozen=True)
class Rejected:
    """A pinned strategy that breaks a rule before any memory is counted."""

    strategy: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class PlanResult:
    candidates: list[Estimate]  # best first; feasible ones unless nothing fits
    considered: int  # strategies whose memory was counted
    simulated: int  # of them, replayed by the simulator
    rejected: list[Rejected]  # when nothing could be built for the pins

    @property
    def best(self) -> Estimate | None:
        return self.candidates[0] if self.candidates else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_strategies(model: ModelSpec, cluster: Cluster, global_batch: int, pins: Pins) -> list[Strategy]:
    n, g = cluster.devices, cluster.devices_per_node
    out = []
    tps = [pins.tp] if pins.tp else [t for t in _divisors(g) if model.heads % t == 0]
    for tp in tps:
        pps = [pins.pp] if pins.pp else [p for p in range(1, min(n // tp, model.layers + 2) + 1) if n % (tp * p) == 0]
        for pp in pps:
            if n % (tp * pp):
                continue
            dp = n // (tp * pp)
            if pins.dp and pins.dp != dp:
                continue
            per_replica = global_batch // dp if global_batch % dp == 0 else 0
            if pins.micro:
                micros = [pins.micro]
            else:
                micros = [b for b in _divisors(per_replica) if b <= _MAX_MICRO and b & (b - 1) == 0] if per_replica else []
            for micro in micros:
                m = per_replica // micro if per_replica else 0
                for sched, chunks in _schedules(pp, m, model.layers + 2, pins):
                    for zero in [pins.zero_stage] if pins.zero_stage is not None else (0, 1, 2, 3):
                        if zero > 0 and dp == 1 and pins.zero_stage is None:
                            continue  # nothing to shard over
                        if zero == 3 and dp > 1 and sched in SPLIT_BACKWARD and None in (pins.zero_stage, pins.schedule):
                            continue  # the runtime cannot run them together (estimate says why when both are pinned)
                        for rc in [pins.recompute] if pins.recompute else RECOMPUTE:
                            out.append(Strategy(dp=dp, tp=tp, pp=pp, schedule=sched, chunks=chunks, micro=micro,
                                                zero_stage=zero, recompute=rc, offload=bool(pins.offload)))
    return out


def _schedules(pp: int, m: int, units: int, pins: Pins) -> list[tuple[str, int]]:
    if pins.schedule:
        if pins.schedule == "interleaved":
            if m % pp and pins.micro is None:
                return []  # other microbatch sizes give Megatron's case, m a multiple of p (see below)
            return [("interleaved", c) for c in ([pins.chunks] if pins.chunks else _CHUNKS) if pp * c <= units]
        return [(pins.schedule, 2 if pins.schedule == "zbv" else 1)]
    if pp == 1:
        return [("1f1b", 1)]
    # GPipe is left out unless pinned: 1F1B has its bubble and holds fewer microbatches
    # (Narayanan et al., 2021, Sec. 2.2.1), so it never loses to it.
    out = [(name, 1) for name in SCHEDULES if name not in ("interleaved", "gpipe") and (name != "zbv" or 2 * pp <= units)
           and (name not in ("zb-h2", "zbv") or compute_actions(name, pp, m) <= _MAX_LISTED_ACTIONS)]
    # Megatron's interleaved schedule needs m a multiple of p (the generator handles any m, at
    # the cost of a validation per try; the search keeps to the paper's case).
    if m and m % pp == 0:
        out += [("interleaved", c) for c in ([pins.chunks] if pins.chunks else _CHUNKS) if pp * c <= units]
    return out


def plan(model: ModelSpec, cluster: Cluster, global_batch: int, *, pins: Pins = Pins(),
         precision: Precision = PRECISIONS["mixed"], top: int = 5, exact: int = 10) -> PlanResult:
    """The ``top`` fastest strategies that fit, best first (or, when none fits, the ones that come
    closest, marked infeasible with the reason)."""
    strategies = enumerate_strategies(model, cluster, global_batch, pins)
    if not strategies:
        pinned = {k: v for k, v in vars(pins).items() if v is not None}
        reason = (f"no dp x tp x pp makes {cluster.devices} devices with tp dividing the node's "
                  f"{cluster.devices_per_node} devices and the global batch {global_batch} a multiple of "
                  f"dp x microbatch size" + (f", given the pins {pinned}" if pinned else ""))
        return PlanResult([], 0, 0, [Rejected(_pins_dict(pins), reason)])
    fits: list[Estimate] = []
    misses: list[Estimate] = []
    rejected: list[Rejected] = []
    considered = 0
    fitted: set[Strategy] = set()
    for s in strategies:
        # Recomputation only adds time: once a lighter setting fits, the heavier ones cannot win.
        if s.recompute != "none" and any(replace(s, recompute=r) in fitted for r in RECOMPUTE[:RECOMPUTE.index(s.recompute)]):
            continue
        try:
            e = estimate(model, cluster, s, global_batch, precision=precision, timing="none")
        except StrategyError as err:
            rejected.append(Rejected(_pinned_dict(s), str(err)))
            continue
        considered += 1
        if e.feasible:
            fitted.add(s)
        if not e.feasible and pins.offload is None:
            e2 = estimate(model, cluster, replace(s, offload=True), global_batch, precision=precision, timing="none")
            considered += 1
            if e2.feasible:
                e = e2
        (fits if e.feasible else misses).append(e)
    # Pass 1: closed-form time for everything that fits; pass 2: simulate the fastest.
    ranked = sorted(
        (estimate(model, cluster, e.strategy, global_batch, precision=precision, timing="closed") for e in fits),
        key=lambda e: e.step_time,
    )
    chosen = ranked[: max(exact, top)]
    # The closed forms misjudge schedules differently (interleaving's fill and drain on uneven
    # stages most), so the fastest two of each schedule are replayed too.
    counts: dict[tuple[str, int], int] = {}
    for e in chosen:
        counts[_kind(e)] = counts.get(_kind(e), 0) + 1
    for e in ranked[len(chosen):]:
        if counts.get(_kind(e), 0) < 2:
            chosen.append(e)
            counts[_kind(e)] = counts.get(_kind(e), 0) + 1
    # ZeRO-0/1/2 of a chosen shape share its pipeline (the replay is cached) and differ in when
    # the data-parallel collectives run, which the closed forms cannot tell apart: replay them too.
    fitting = {e.strategy: e for e in ranked}
    seen = {e.strategy for e in chosen}
    for e in list(chosen):
        for zero in (0, 1, 2) if e.strategy.zero_stage < 3 else ():
            sibling = replace(e.strategy, zero_stage=zero)
            if sibling in fitting and sibling not in seen:
                seen.add(sibling)
                chosen.append(fitting[sibling])
    simulated = [estimate(model, cluster, e.strategy, global_batch, precision=precision) for e in chosen]
    simulated.sort(key=lambda e: (e.step_time, e.strategy.label()))
    if simulated:
        return PlanResult(simulated[:top], considered, len(simulated), [])
    # Nothing fits: report the closest misses, with their reasons, never a silent substitute.
    misses.sort(key=lambda e: e.memory.get("total", 0.0) - e.budget)
    closest = [estimate(model, cluster, e.strategy, global_batch, precision=precision) for e in misses[:top]]
    return PlanResult(closest, considered, len(closest), rejected[:top] if not closest else [])


def _kind(e: Estimate) -> tuple[str, int]:
    return (e.strategy.schedule, e.strategy.chunks)


def _pins_dict(p: Pins) -> dict[str, Any]:
    return {"dp": p.dp, "tp": p.tp, "pp": p.pp, "schedule": p.schedule, "chunks": p.chunks,
            "microbatch_size": p.micro, "zero_stage": p.zero_stage, "recompute": p.recompute,
            "offload": p.offload}


def _pinned_dict(s: Strategy) -> dict[str, Any]:
    return {"dp": s.dp, "tp": s.tp, "pp": s.pp, "schedule": s.schedule, "chunks": s.chunks,
            "microbatch_size": s.micro, "zero_stage": s.zero_stage, "recompute": s.recompute,
            "offload": s.offload}
