"""Validation of schedules: structure, dependencies and deadlock freedom.

The dry run models what the runtime does: sends are posted without blocking (``isend``),
receives block until the matching send has been posted, and compute waits for its inputs.
A broken schedule raises :class:`ScheduleError` whose message holds a step-by-rank grid with the
offending steps marked, like PyTorch's pipelining does for its own schedules.
"""

from __future__ import annotations

from collections import Counter

from .actions import Action, Kind
from .comm import lower, matching, peer_stage
from .core import Schedule
from .deps import describe, requirements, satisfied_by


class ScheduleError(ValueError):
    """A schedule is invalid. ``marks`` holds the offending (rank, step) cells."""

    def __init__(self, message: str, schedule: Schedule, marks: list[tuple[int, int]]) -> None:
        self.schedule = schedule
        self.marks = marks
        super().__init__(f"{message}\n{render_grid(schedule, marks)}")


def render_grid(schedule: Schedule, marks: list[tuple[int, int]] = (), context: int = 6) -> str:  # type: ignore[assignment]
    """A step-by-rank grid; marked cells are written ``>>1F3<<``.

    Only the steps within ``context`` of a mark are shown when there are marks.
    """
    ranks = schedule.ranks
    depth = max((len(r) for r in ranks), default=0)
    marked = set(marks)
    rows = range(depth)
    if marked:
        lo = max(0, min(s for _, s in marked) - context)
        hi = min(depth, max(s for _, s in marked) + context + 1)
        rows = range(lo, hi)
    cells = [
        [
            (f">>{ranks[r][step]}<<" if (r, step) in marked else str(ranks[r][step]))
            if step < len(ranks[r])
            else ""
            for r in range(len(ranks))
        ]
        for step in rows
    ]
    width = max([len(c) for row in cells for c in row] + [len(f"rank {len(ranks) - 1}")])
    head = "step  " + " ".join(f"{'rank ' + str(r):<{width}}" for r in range(len(ranks)))
    lines = [head] + [
        f"{step:<5} " + " ".join(f"{c:<{width}}" for c in row) for step, row in zip(rows, cells)
    ]
    if marked and rows.start > 0:
        lines.insert(1, "...")
    if marked and rows.stop < depth:
        lines.append("...")
    return "\n".join(lines)


def validate(schedule: Schedule) -> Schedule:
    """Check ``schedule`` and return its lowered form (with communication actions).

    A compute-only schedule is lowered first. Raises :class:`ScheduleError` on the first problem.
    """
    lowered = lower(schedule)
    _check_placement(lowered)
    _check_compute_once(lowered)
    _check_comm(lowered)
    _check_channel_order(lowered)
    _dry_run(lowered)
    return lowered


def _position(schedule: Schedule) -> dict[Action, tuple[int, int]]:
    return {a: (r, step) for r, acts in enumerate(schedule.ranks) for step, a in enumerate(acts)}


def _check_placement(sch: Schedule) -> None:
    m, nstages = sch.num_microbatches, sch.num_stages
    for r, acts in enumerate(sch.ranks):
        for step, a in enumerate(acts):
            if a.stage >= nstages or a.microbatch >= m:
                raise ScheduleError(
                    f"{a} on rank {r} is out of range: the schedule has {nstages} stages and "
                    f"{m} microbatches",
                    sch,
                    [(r, step)],
                )
            if sch.stage_to_rank[a.stage] != r:
                raise ScheduleError(
                    f"{a} is on rank {r} but stage {a.stage} is placed on rank "
                    f"{sch.stage_to_rank[a.stage]}",
                    sch,
                    [(r, step)],
                )


def _check_compute_once(sch: Schedule) -> None:
    counts = Counter(a for acts in sch.ranks for a in acts)
    pos = _position(sch)
    for a, n in counts.items():
        if n > 1:
            dups = [(r, st) for r, acts in enumerate(sch.ranks) for st, x in enumerate(acts) if x == a]
            raise ScheduleError(f"{describe(a)} appears {n} times; it must appear once", sch, dups)
    kinds = (Kind.F, Kind.I, Kind.W) if sch.split_backward else (Kind.F, Kind.B)
    wrong = (Kind.B,) if sch.split_backward else (Kind.I, Kind.W)
    for a in counts:
        if a.kind in wrong:
            style = "I and W (split backward)" if sch.split_backward else "B (full backward)"
            raise ScheduleError(f"{a} does not belong in a schedule that uses {style}", sch, [pos[a]])
    for s in range(sch.num_stages):
        for i in range(sch.num_microbatches):
            for k in kinds:
                if Action(s, k, i) not in counts:
                    # Mark what this microbatch did run on the stage, so the grid shows where the
                    # action belongs; with no marks the grid would print every step, unmarked.
                    near = [pos[x] for x in (Action(s, j, i) for j in kinds) if x in pos]
                    r = sch.stage_to_rank[s]
                    hint = f" (marked: what rank {r} runs for stage {s}, microbatch {i})" if near else ""
                    raise ScheduleError(
                        f"{describe(Action(s, k, i))} is missing from rank {r}{hint}",
                        sch,
                        near,
                    )


def _check_comm(sch: Schedule) -> None:
    pos = _position(sch)
    for a, (r, step) in pos.items():
        if not a.kind.is_comm:
            continue
        peer = peer_stage(a)
        if not 0 <= peer < sch.num_stages:
            raise ScheduleError(f"{a} on rank {r} talks to stage {peer}, which does not exist", sch, [(r, step)])
        if sch.stage_to_rank[peer] == r:
            raise ScheduleError(
                f"{a} on rank {r} communicates with stage {peer} on the same rank; "
                "stages on one rank hand tensors over directly",
                sch,
                [(r, step)],
            )
        other = matching(a)
        if other not in pos:
            raise ScheduleError(
                f"{describe(a)} on rank {r} has no matching {other} on rank {sch.stage_to_rank[peer]}",
                sch,
                [(r, step)],
            )


def _check_channel_order(sch: Schedule) -> None:
    """Messages between two stages arrive in the order they were sent (per direction).

    The runtime keeps per-channel state (the receive buffer size) and NCCL matches messages by
    order, not by tag, so a receiver must take a channel's messages in the order they were sent.
    """
    sends: dict[tuple[int, Kind], list[tuple[int, int, Action]]] = {}
    recvs: dict[tuple[int, Kind], list[tuple[int, int, Action]]] = {}
    for r, acts in enumerate(sch.ranks):
        for step, a in enumerate(acts):
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                sends.setdefault((a.stage, a.kind), []).append((r, step, a))
            elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                m = matching(a)
                recvs.setdefault((m.stage, m.kind), []).append((r, step, a))
    for key, sent in sends.items():
        got = recvs.get(key, [])
        order_sent = [a.microbatch for _, _, a in sent]
        order_got = [a.microbatch for _, _, a in got]
        if order_sent != order_got:
            k = next(i for i, (x, y) in enumerate(zip(order_sent, order_got)) if x != y)
            what = "activations" if key[1] is Kind.SEND_F else "gradients"
            raise ScheduleError(
                f"stage {key[0]} sends its {what} for microbatches in the order {order_sent} but "
                f"they are received in the order {order_got}: a channel between two stages must be "
                "received in the order it is sent (first difference marked)",
                sch,
                [sent[k][:2], got[k][:2]],
            )


def _dry_run(sch: Schedule) -> None:
    done: set[Action] = set()
    pc = [0] * sch.num_ranks
    pos = _position(sch)
    while True:
        progress = False
        for r, acts in enumerate(sch.ranks):
            while pc[r] < len(acts):
                a = acts[pc[r]]
                if not all(any(x in done for x in satisfied_by(q)) for q in requirements(a, sch.stage_to_rank)):
                    break
                done.add(a)
                pc[r] += 1
                progress = True
        if all(pc[r] == len(acts) for r, acts in enumerate(sch.ranks)):
            return
        if not progress:
            break
    reasons, marks = [], []
    for r, acts in enumerate(sch.ranks):
        if pc[r] == len(acts):
            continue
        a = acts[pc[r]]
        marks.append((r, pc[r]))
        for q in requirements(a, sch.stage_to_rank):
            if any(x in done for x in satisfied_by(q)):
                continue
            where = next((pos[x] for x in satisfied_by(q) if x in pos), None)
            if where is None:
                reasons.append(f"rank {r} step {pc[r]}: {a} waits for {describe(q)}, which no rank runs")
            elif where[0] == r and where[1] > pc[r]:
                reasons.append(
                    f"rank {r} step {pc[r]}: {a} needs {describe(q)} first, but rank {r} runs it later, "
                    f"at step {where[1]}"
                )
            else:
                reasons.append(
                    f"rank {r} step {pc[r]}: {a} waits for {describe(q)} (rank {where[0]} step {where[1]})"
                )
    raise ScheduleError("schedule deadlocks: no rank can make progress\n" + "\n".join(reasons), sch, marks)
