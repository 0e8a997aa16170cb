"""Who holds which layers: contiguous spans from the partition solver, plus a copy of each span.

Pure Python (no torch). Stage ``s`` is held by one peer and copied on another, the holder of
stage ``s + 1`` (a ring), so every peer holds about twice its own span and any single failure
leaves every stage with a live holder or copy. Spans come from :func:`layerwise.partition.solve`
with each peer's measured speed and half its memory budget (the other half is for the copy it
keeps of its neighbour's span). Peers beyond the stages (``max_stages``, or more peers than
layers) become *replicas* of the slowest stage, one at a time: the stage's microbatches are dealt
among its replicas (:mod:`.replicas`), and a stage with two or more needs no copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..partition.solver import solve
from .spec import SwarmSpec

SPEED_STEP = 0.25  # measured speeds are rounded to this, so timing noise does not move spans


@dataclass(frozen=True, kw_only=True)
class PeerInfo:
    id: str
    speed: float  # relative throughput, the fastest peer is 1.0
    memory_bytes: float


@dataclass(frozen=True, kw_only=True)
class StageSpan:
    stage: int
    first: int
    count: int
    holder: str
    copy: str | None  # the peer keeping an up-to-date copy of weights and optimizer state
    # further replicas: slot r > 0 of the stage is replicas[r - 1]; a peer may serve two slots
    # for the rest of a step after a replica died (the slot's microbatches stay a group of their own)
    replicas: tuple[str, ...] = ()

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)

    @property
    def slots(self) -> tuple[str, ...]:
        """The peers that run this stage's microbatches, slot 0 (the holder) first."""
        return (self.holder, *self.replicas)

    @property
    def safe(self) -> bool:
        """Does one peer's death leave this stage's state alive (a copy, or a second replica)?"""
        return self.copy is not None or len(set(self.slots)) > 1


@dataclass(frozen=True, kw_only=True)
class Assignment:
    epoch: int
    stages: tuple[StageSpan, ...]

    def peers(self) -> set[str]:
        return {p for s in self.stages for p in s.slots} | {s.copy for s in self.stages if s.copy}

    def counts(self) -> list[int]:
        return [s.count for s in self.stages]


def layer_costs(spec: SwarmSpec) -> tuple[list[float], list[float]]:
    """Per layer: relative time (forward + backward FLOPs per token) and static bytes.

    A block costs ``24 w^2 + 4 T w`` multiply-adds per token (qkv, proj, and the 4x MLP, plus the
    attention scores; Kaplan et al., 2020, Table 1), the head ``2 w V``, the embedding a lookup.
    Static bytes: fp32 weight, gradient and AdamW's two moments, 16 bytes per parameter.
    """
    w, t, v = spec.width, spec.seq, 256
    block = 24 * w * w + 4 * t * w
    times = [0.02 * block] + [float(block)] * spec.blocks + [2.0 * w * v]
    params = [float(v * w + t * w)] + [12.0 * w * w + 13 * w] * spec.blocks + [float(w * v + 2 * w)]
    return times, [16.0 * p for p in params]


def relative_speeds(block_seconds: dict[str, float]) -> dict[str, float]:
    """Measured block times to speeds (fastest = 1), rounded to :data:`SPEED_STEP`."""
    fastest = min(block_seconds.values())
    return {p: max(SPEED_STEP, round(fastest / s / SPEED_STEP) * SPEED_STEP) for p, s in block_seconds.items()}


def assign(spec: SwarmSpec, peers: Sequence[PeerInfo], *, epoch: int, max_stages: int | None = None,
           order: Sequence[str] = ()) -> Assignment:  # fmt: skip
    """Spans for ``peers``; ``order`` lists peers to keep in their current pipeline position."""
    if not peers:
        raise ValueError("no live peers to assign layers to")
    times, memory = layer_costs(spec)
    n = min(len(peers), spec.layers, max_stages or len(peers))
    by_id = {p.id: p for p in peers}
    kept = list(dict.fromkeys(p for p in order if p in by_id))  # a peer may hold two stages now
    ranked = kept + sorted(set(by_id) - set(kept))
    # the fastest peers hold stages, in their current order where they had one
    chosen = set(sorted(ranked, key=lambda p: -by_id[p].speed)[:n])
    holders = [p for p in ranked if p in chosen]
    spares = [p for p in ranked if p not in chosen]
    counts = solve(times, stages=n, memory=memory, speeds=[by_id[p].speed for p in holders],
                   budgets=[by_id[p].memory_bytes / 2 for p in holders], names=holders)  # fmt: skip
    starts = [sum(counts[:s]) for s in range(n)]
    extra = _replicas(spec, [by_id[p] for p in spares], counts, starts, [by_id[p].speed for p in holders])
    stages = []
    for s, (holder, count) in enumerate(zip(holders, counts)):
        copy = None if extra[s] or n == 1 else holders[(s + 1) % n]  # replicas back each other up
        stages.append(StageSpan(stage=s, first=starts[s], count=count, holder=holder, copy=copy,
                                replicas=tuple(extra[s])))  # fmt: skip
    return Assignment(epoch=epoch, stages=tuple(stages))


def _replicas(spec: SwarmSpec, spares: Sequence[PeerInfo], counts: Sequence[int], starts: Sequence[int],
              speeds: Sequence[float]) -> list[list[str]]:  # fmt: skip
    """Spare peers, fastest first, each to the stage that is slowest at that moment and fits in
    its memory (a replica keeps no copy, so its whole budget counts); at most one replica per
    microbatch."""
    times, memory = layer_costs(spec)
    work = [sum(times[f : f + c]) for f, c in zip(starts, counts)]
    need = [sum(memory[f : f + c]) for f, c in zip(starts, counts)]
    slots: list[list[float]] = [[v] for v in speeds]
    out: list[list[str]] = [[] for _ in counts]
    for peer in sorted(spares, key=lambda p: (-p.speed, p.id)):
        fits = [s for s in range(len(counts)) if need[s] <= peer.memory_bytes and len(slots[s]) < spec.microbatches]
        if not fits:
            continue
        s = max(fits, key=lambda s: _stage_time(work[s], slots[s], spec.microbatches))
        slots[s].append(peer.speed)
        out[s].append(peer.id)
    return out


def _stage_time(work: float, speeds: Sequence[float], microbatches: int) -> float:
    """Per microbatch of the step, for a stage whose microbatches are dealt round robin to slots of
    these speeds: the slowest slot's share bounds it."""
    share = math.ceil(microbatches / len(speeds)) / microbatches
    return work * share / min(speeds)


def step_time(a: Assignment, spec: SwarmSpec, speeds: dict[str, float]) -> float:
    """Relative time of the busiest peer per microbatch: what bounds a pipelined step."""
    times, _ = layer_costs(spec)
    load: dict[str, float] = {}
    for s in a.stages:
        share = math.ceil(spec.microbatches / len(s.slots)) / spec.microbatches  # round robin
        for p in s.slots:
            load[p] = load.get(p, 0.0) + sum(times[i] for i in s.layers) * share / speeds.get(p, 1.0)
    return max(load.values())


def worth_moving(current: Assignment, proposed: Assignment, spec: SwarmSpec, speeds: dict[str, float],
                 threshold: float = 0.15) -> bool:  # fmt: skip
    """Hysteresis: move layers only for a predicted gain of at least ``threshold``, or to give a
    stage without a copy one (safety first)."""
    if any(not s.safe for s in current.stages) and all(s.safe for s in proposed.stages):
        return True
    return step_time(proposed, spec, speeds) <= (1.0 - threshold) * step_time(current, spec, speeds)
