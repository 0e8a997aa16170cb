"""Per-rank action lists for GPipe, 1F1B, interleaved 1F1B and ZB-H1 (ZB-H2 and ZB-V, built by a
list scheduler or, ZB-V from 2p - 1 microbatches, in the paper's handcrafted order, are in
``zero_bubble.py``).

Each generator returns a compute-only :class:`Schedule` (F, B or F, I, W); :func:`lower` in
``comm.py`` adds the send/receive actions a runtime executes.
"""

from __future__ import annotations

from .actions import Action, Kind
from .core import Schedule


class ScheduleConfigError(ValueError):
    """A schedule cannot be built for the requested stages / microbatches / chunks."""


def _check(stages: int, microbatches: int) -> None:
    if stages < 1:
        raise ScheduleConfigError(f"stages must be >= 1, got {stages}")
    if microbatches < 1:
        raise ScheduleConfigError(f"microbatches must be >= 1, got {microbatches}")


def gpipe(stages: int, microbatches: int) -> Schedule:
    """Fill-drain (Huang et al., 2019): all forwards, then all backwards.

    Every stage holds the activations of all ``m`` microbatches at its peak.
    """
    _check(stages, microbatches)
    m = microbatches
    ranks = [
        [Action(s, Kind.F, i) for i in range(m)] + [Action(s, Kind.B, i) for i in range(m)]
        for s in range(stages)
    ]
    return _single_chunk("gpipe", m, ranks)


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B / PipeDream-Flush (Narayanan et al., 2021, Sec. 2.2.1).

    Stage ``s`` runs ``p - s - 1`` warm-up forwards, then alternates one forward and one backward,
    then drains. It holds at most ``min(m, p - s)`` microbatches of activations.
    """
    _check(stages, microbatches)
    p, m = stages, microbatches
    ranks = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [Action(s, Kind.F, i) for i in range(warm)]
        f, b = warm, 0
        while f < m:
            acts += [Action(s, Kind.F, f), Action(s, Kind.B, b)]
            f, b = f + 1, b + 1
        acts += [Action(s, Kind.B, i) for i in range(b, m)]
        ranks.append(acts)
    return _single_chunk("1f1b", m, ranks)


def interleaved_1f1b(ranks: int, microbatches: int, chunks: int) -> Schedule:
    """Interleaved 1F1B (Narayanan et al., 2021, Sec. 2.2.2) with ``v = chunks`` stages per rank.

    Stage ``s`` lives on rank ``s % p`` (looping placement). Microbatches advance in groups of
    ``p``: for each group, every chunk's forward in chunk order, and backwards in reverse chunk
    order. Rank ``r`` warms up with ``2 (p - r - 1) + (v - 1) p`` forwards, as in Megatron-LM;
    with ``m`` a multiple of ``p`` this is the paper's schedule and its bubble is
    ``(p - 1) / (v m)`` of the ideal time. The paper requires that multiple; here any ``m`` works:
    the last group is shorter, and if Megatron's warm-up would then deadlock, every rank's warm-up
    is lengthened by the fewest forwards that make the schedule valid (at most all of them, which
    is GPipe's order and always valid), trading a little activation memory for generality.
    """
    _check(ranks, microbatches)
    p, m, v = ranks, microbatches, chunks
    if v < 1:
        raise ScheduleConfigError(f"chunks must be >= 1, got {v}")
    groups = [range(g, min(m, g + p)) for g in range(0, m, p)]
    fwd = [(c, i) for grp in groups for c in range(v) for i in grp]
    bwd = [(c, i) for grp in groups for c in reversed(range(v)) for i in grp]
    total = m * v
    for extra in range(total + 1):
        out = []
        for r in range(p):
            warm = min(2 * (p - r - 1) + (v - 1) * p + extra, total)
            acts = [Action(c * p + r, Kind.F, i) for c, i in fwd[:warm]]
            for k in range(total - warm):
                c, i = fwd[warm + k]
                acts.append(Action(c * p + r, Kind.F, i))
                c, i = bwd[k]
                acts.append(Action(c * p + r, Kind.B, i))
            acts += [Action(c * p + r, Kind.B, i) for c, i in bwd[total - warm :]]
            out.append(tuple(acts))
        schedule = Schedule(
            name="interleaved",
            num_microbatches=m,
            stage_to_rank=tuple(s % p for s in range(p * v)),
            ranks=tuple(out),
            meta={"chunks": v, "extra_warmup": extra},
        )
        if m % p == 0 or _deadlock_free(schedule):
            return schedule
    raise AssertionError("unreachable: a warm-up of every forward is always valid")


def _deadlock_free(schedule: Schedule) -> bool:
    from .validate import ScheduleError, validate  # validate imports nothing from here

    try:
        validate(schedule)
    except ScheduleError:
        return False
    return True


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023, Sec. 3.1).

    Backward is split into I (input gradient, on the critical path) and W (weight gradient, free
    to move). Each stage keeps 1F1B's order with I in place of B, and stage ``s`` runs W of
    microbatch ``k - s`` right after I of microbatch ``k`` (the rest at the end): the W's that
    later stages postpone fill the tail bubble while the I's race down the pipeline. Under the
    paper's assumption ``T_F = T_I = T_W`` and ``m >= p`` the bubble is ``(p - 1)(T_F + T_I - T_W)``,
    a third of 1F1B's ``(p - 1)(T_F + T_I + T_W)``. Every stage holds at most ``p``
    microbatches, the peak of 1F1B's first stage, so the largest per-stage activation memory is
    1F1B's (the paper's "same peak memory").
    """
    base = one_f_one_b(stages, microbatches)
    ranks: list[list[Action]] = []
    for s, acts in enumerate(base.ranks):
        out: list[Action] = []
        next_w = 0
        for a in acts:
            if a.kind is not Kind.B:
                out.append(a)
                continue
            out.append(Action(s, Kind.I, a.microbatch))
            if a.microbatch - s >= next_w:
                out.append(Action(s, Kind.W, next_w))
                next_w += 1
        out += [Action(s, Kind.W, j) for j in range(next_w, microbatches)]
        ranks.append(out)
    return Schedule(
        name="zb-h1",
        num_microbatches=microbatches,
        stage_to_rank=base.stage_to_rank,
        ranks=tuple(tuple(a) for a in ranks),
        split_backward=True,
    )


def _single_chunk(name: str, m: int, ranks: list[list[Action]]) -> Schedule:
    return Schedule(
        name=name,
        num_microbatches=m,
        stage_to_rank=tuple(range(len(ranks))),
        ranks=tuple(tuple(a) for a in ranks),
    )


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv")


def chunks_per_rank(name: str, chunks: int | None = None) -> int:
    """Model stages each rank holds: ``chunks`` (default 2) for interleaved, 2 for ZB-V, else 1."""
    key = _key(name)
    if key == "interleaved":
        return 2 if chunks is None else chunks
    return 2 if key == "zbv" else 1


def compute_actions(name: str, stages: int, microbatches: int, chunks: int = 1) -> int:
    """How many compute actions the schedule has (to refuse sizes that take minutes to simulate)."""
    per = 3 if _key(name) in ("zb-h1", "zb-h2", "zbv") else 2
    return stages * chunks_per_rank(name, chunks) * microbatches * per


def _key(name: str) -> str:
    key = name.lower().replace("_", "-")
    return {"pipedream-flush": "1f1b", "interleaved-1f1b": "interleaved", "zbh1": "zb-h1",
            "zero-bubble": "zb-h1", "zbh2": "zb-h2", "zb-v": "zbv"}.get(key, key)  # fmt: skip


def build(name: str, *, stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Build a schedule by name. ``stages`` is the number of ranks (pipeline depth).

    For ``interleaved`` there are ``stages * chunks`` model stages, ``chunks`` per rank; for
    ``zbv`` always two per rank, in a V (``chunks`` is ignored).
    """
    from .zero_bubble import zb_h2, zbv  # imported here: zero_bubble imports this module

    key = _key(name)
    if key == "gpipe":
        return gpipe(stages, microbatches)
    if key == "1f1b":
        return one_f_one_b(stages, microbatches)
    if key == "interleaved":
        return interleaved_1f1b(stages, microbatches, chunks)
    if key == "zb-h1":
        return zb_h1(stages, microbatches)
    if key == "zb-h2":
        return zb_h2(stages, microbatches)
    if key == "zbv":
        return zbv(stages, microbatches)
    raise ScheduleConfigError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
