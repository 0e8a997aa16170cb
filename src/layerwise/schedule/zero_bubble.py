"""ZB-H2 and ZB-V: zero-bubble schedules, built by a unit-time list scheduler (ZB-V with
``m >= 2p - 1``: the paper's handcrafted order, see :func:`zbv`).

Qi et al., "Zero Bubble Pipeline Parallelism" (2023) split the backward into I (input gradient,
on the critical path) and W (weight gradient, free to move) and fill the pipeline's bubbles with
W. Their handcrafted ZB-H2 adds forwards in the warm-up (up to ``2p - 1`` microbatches in flight)
and moves W's into the tail. Qi et al., "Pipeline Parallelism with Controllable Memory" (2024,
Sec. 6) place two model chunks per rank in a V: stage ``s`` on rank ``s`` for the first half and on
rank ``2p - 1 - s`` for the second, so rank 0 holds both the first and the last stage, rank
``p - 1`` hands the two middle stages to itself, and each chunk's warm-up costs half a stage.
Its peak activation memory is 1F1B's: ``2p`` chunk-sized microbatches, i.e. ``p`` of a full stage.

Both are produced here the way the 2023 paper's automatic scheduler works: simulate the pipeline
in unit time (``T_F = T_I = T_W``, the papers' assumption) and let every free rank pick, among the
actions whose inputs have arrived, an I first (it unblocks the stages before it), else a forward if
the rank's in-flight activations stay under the memory cap, else the oldest pending W. Each stage
runs its F, I and W in microbatch order, so every channel is received in the order it is sent. The
order each rank ran its actions in is the schedule; it is valid for any real costs (the runtime
waits for inputs), and optimal-ish when the costs are near equal.

In one training step the startup cost cannot be hidden: the last rank of ZB-H2 starts ``p - 1``
forwards late, so its makespan is at least ``3m + p - 1`` unit actions, the same as ZB-H1's
(the paper's zero bubble assumes the next iteration starts on each rank as soon as it finishes,
which an optimizer step after a global gradient clip does not allow); it gains over ZB-H1 when
``T_I > T_W``. ZB-V's chunks are half a stage, so its startup is ``(p - 1) / 2`` of a stage's
forward: about half of ZB-H1's bubble at the same memory.
"""

from __future__ import annotations

from .actions import Action, Kind
from .core import Schedule
from .generators import ScheduleConfigError


class _Unit:
    """The state of the unit-time simulation of one schedule."""

    def __init__(self, stage_to_rank: tuple[int, ...], m: int) -> None:
        self.where = stage_to_rank
        self.m = m
        self.last = len(stage_to_rank) - 1
        self.end: dict[Action, int] = {}
        n = len(stage_to_rank)
        self.next = {k: [0] * n for k in (Kind.F, Kind.I, Kind.W)}

    def ready(self, kind: Kind, s: int, t: int) -> Action | None:
        """The next ``kind`` action of stage ``s`` if its inputs are done by time ``t``."""
        i = self.next[kind][s]
        if i >= self.m:
            return None
        if kind is Kind.F:
            needs = [Action(s - 1, Kind.F, i)] if s > 0 else []
        elif kind is Kind.I:
            needs = [Action(s, Kind.F, i)] + ([Action(s + 1, Kind.I, i)] if s < self.last else [])
        else:
            needs = [Action(s, Kind.I, i)]
        if all(self.end.get(a, t + 1) <= t for a in needs):
            return Action(s, kind, i)
        return None

    def run(self, a: Action, t: int) -> None:
        self.end[a] = t + 1
        self.next[a.kind][a.stage] += 1


def _list_schedule(name: str, stage_to_rank: tuple[int, ...], m: int, cap: int) -> Schedule:
    """Unit-time list scheduling (see the module docstring) with at most ``cap`` microbatches'
    activations (F done, W not yet) per rank.

    A forward of a rank's later chunk is always allowed while under the cap, an earlier chunk's
    only while one slot stays free: the later chunk leads to the loss, and a rank filled with
    first-chunk activations would wait forever for gradients that need its second chunk.
    """
    ranks = max(stage_to_rank) + 1
    own = [sorted((s for s, r in enumerate(stage_to_rank) if r == q), reverse=True) for q in range(ranks)]
    sim = _Unit(stage_to_rank, m)
    held = [0] * ranks
    out: list[list[Action]] = [[] for _ in range(ranks)]
    total, t = 3 * len(stage_to_rank) * m, 0
    while sum(map(len, out)) < total:
        if t > 4 * total + 4:  # every unit step runs something unless a rank waits: bounded
            raise AssertionError(f"{name}: list scheduler made no progress (cap {cap})")
        picks = []
        for r in range(ranks):
            a = _pick(sim, own[r], held[r], cap, t)
            if a is not None:
                picks.append((r, a))
        for r, a in picks:  # ends at t + 1, so the order within one time step does not matter
            sim.run(a, t)
            out[r].append(a)
            held[r] += {Kind.F: 1, Kind.I: 0, Kind.W: -1}[a.kind]
        t += 1
    return Schedule(
        name=name,
        num_microbatches=m,
        stage_to_rank=stage_to_rank,
        ranks=tuple(tuple(a) for a in out),
        split_backward=True,
        meta={"memory_cap": cap, "unit_makespan": t},
    )


def _pick(sim: _Unit, stages: list[int], held: int, cap: int, t: int) -> Action | None:
    # I first: the oldest microbatch, and for equal ones the later stage (earlier in the backward).
    grads = [a for s in stages if (a := sim.ready(Kind.I, s, t)) is not None]
    if grads:
        return min(grads, key=lambda a: (a.microbatch, -a.stage))
    for k, s in enumerate(stages):  # later chunk first
        reserve = 0 if k == 0 else 1
        if held + reserve < cap and (a := sim.ready(Kind.F, s, t)) is not None:
            return a
    weights = [a for s in stages if (a := sim.ready(Kind.W, s, t)) is not None]
    if weights:
        return min(weights, key=lambda a: (a.microbatch, -a.stage))
    return None


def v_placement(ranks: int) -> tuple[int, ...]:
    """``stage_to_rank`` of the V shape: 0, 1, ..., p-1, p-1, ..., 1, 0."""
    return tuple(range(ranks)) + tuple(reversed(range(ranks)))


def zb_h2(stages: int, microbatches: int) -> Schedule:
    """ZB-H2 (Qi et al., 2023, Sec. 3.1): split backward, up to ``2p - 1`` microbatches in flight
    per stage (the paper's memory), W's filling the warm-up and tail bubbles."""
    _check(stages, microbatches)
    return _list_schedule("zb-h2", tuple(range(stages)), microbatches, 2 * stages - 1)


def zbv(ranks: int, microbatches: int) -> Schedule:
    """ZB-V (Qi et al., 2024, Sec. 6): two chunks per rank in a V, ``2p`` chunk activations in
    flight per rank at most (1F1B's peak memory).

    With ``m >= 2p - 1`` microbatches, the paper's handcrafted order (:func:`_zbv_v_order`); with
    fewer, the unit-time list scheduler (I before F before W), whose startup is shorter there.
    With ``T_F = T_I = T_W`` the handcrafted order is as short or up to two unit actions
    shorter (p 1..8, m from 2p - 1 to 2p + 8), and real costs differ more (on a CPU GPT
    block, I is about 1.15 F and W about 0.9 F, and stages of whole layers are unequal): simulated
    with per-stage costs drawn at random around those ratios, the handcrafted order's makespan
    was 3.5-7.5% shorter at the median (up to 20%) and never longer by more than 0.3%, for p in 2..4
    and m in 2p - 1..16. The list scheduler moves I's ahead of forwards and bunches the W's,
    which stalls the V's other chunk when one chunk's I costs more than the unit it planned for;
    the handcrafted order keeps every chunk's F, I, W together in the steady state.
    """
    _check(ranks, microbatches)
    if microbatches >= 2 * ranks - 1:
        return Schedule(
            name="zbv",
            num_microbatches=microbatches,
            stage_to_rank=v_placement(ranks),
            ranks=tuple(tuple(_zbv_v_order(ranks, microbatches, r)) for r in range(ranks)),
            split_backward=True,
            meta={"memory_cap": 2 * ranks, "order": "handcrafted"},
        )
    return _list_schedule("zbv", v_placement(ranks), microbatches, 2 * ranks)


def _zbv_v_order(p: int, m: int, rank: int) -> list[Action]:
    """Rank ``rank``'s actions in the handcrafted ZB-V (Qi et al., 2024, Sec. 6, Fig. 6; the
    order of PyTorch's ``ScheduleZBVZeroBubble``), for ``m >= 2p - 1``. Chunk 0 is stage
    ``rank``, chunk 1 stage ``2p - 1 - rank``. Warm-up: ``2(p - rank) - 1`` forwards of chunk 0,
    then ``rank`` pairs (chunk 1, chunk 0), then ``p - rank`` times chunk 1's F, I, W; steady
    state: chunk 0's F (while any is left), I, W, then chunk 1's F, I, W; cool-down: the I's
    left, then the W's. The rank holds at most ``2p`` chunk activations (F done, W not)."""
    c0, c1 = rank, 2 * p - 1 - rank
    nxt = {(c, k): 0 for c in (c0, c1) for k in (Kind.F, Kind.I, Kind.W)}
    out: list[Action] = []

    def put(c: int, k: Kind) -> None:
        out.append(Action(c, k, nxt[c, k]))
        nxt[c, k] += 1

    for _ in range(2 * (p - rank) - 1):
        put(c0, Kind.F)
    for _ in range(rank):
        put(c1, Kind.F)
        put(c0, Kind.F)
    for _ in range(p - rank):
        for k in (Kind.F, Kind.I, Kind.W):
            put(c1, k)
    while nxt[c1, Kind.F] < nxt[c0, Kind.F] or nxt[c0, Kind.F] < m:
        if nxt[c0, Kind.F] < m:
            put(c0, Kind.F)
        put(c0, Kind.I)
        put(c0, Kind.W)
        for k in (Kind.F, Kind.I, Kind.W):
            put(c1, k)
    for _ in range(rank):
        put(c0, Kind.I)
        put(c1, Kind.I)
    for _ in range(p - rank):
        put(c0, Kind.I)
        put(c0, Kind.W)
    while nxt[c1, Kind.W] < nxt[c1, Kind.I]:
        put(c1, Kind.W)
    while nxt[c0, Kind.W] < nxt[c0, Kind.I]:
        put(c0, Kind.W)
    return out


def _check(stages: int, microbatches: int) -> None:
    if stages < 1:
        raise ScheduleConfigError(f"stages must be >= 1, got {stages}")
    if microbatches < 1:
        raise ScheduleConfigError(f"microbatches must be >= 1, got {microbatches}")
