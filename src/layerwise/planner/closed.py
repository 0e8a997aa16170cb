"""Closed forms of the schedule papers: in-flight microbatches and makespans.

The planner's search prices thousands of strategies with these before it replays the fastest
with :mod:`.pipesim`; ``tests/unit/test_planner_pipesim.py`` checks each against the schedules
and the replay where it holds.
"""

from __future__ import annotations

from .pipesim import PipeTiming


def inflight_closed(name: str, pp: int, m: int) -> tuple[int, ...] | None:
    """Per stage, the most microbatches held at once, for the single-chunk schedules (equal to
    :func:`layerwise.schedule.simulate.peak_inflight`, tested): GPipe all ``m``; 1F1B
    ``min(m, p - s)`` (Narayanan et al., 2021); ZB-H1 ``min(m, p)`` on every stage, since a
    stage frees a microbatch only at its W, which trails its I by ``s`` microbatches; ZB-H2
    ``min(m, 2p - 1)`` (Qi et al., 2023, Sec. 3.1: about twice 1F1B's first stage)."""
    if name == "gpipe":
        return (m,) * pp
    if name == "1f1b":
        return tuple(min(m, pp - s) for s in range(pp))
    if name == "zb-h1":
        return (min(m, pp),) * pp
    if name == "zb-h2":
        return (min(m, 2 * pp - 1),) * pp
    return None


def chunk_bound(name: str, pp: int, m: int, chunks: int, rank: int) -> int:
    """Microbatch-chunks rank ``rank`` holds at most. Interleaved 1F1B with ``m`` a multiple of
    ``pp``: its warm-up forwards, ``2 (p - r - 1) + (v - 1) p``, plus the one forward of each
    steady-state pair that runs before its backward. ZB-V: ``2p`` chunks (of half a stage), the
    activations of 1F1B's first stage, on every rank (Qi et al., 2024, Sec. 6)."""
    if name == "zbv":
        return min(2 * pp, 2 * m)
    return min(2 * (pp - rank - 1) + (chunks - 1) * pp + 1, m * chunks)


def closed_makespan(p: int, m: int, where: tuple[int, ...], split: bool, f: list[float], i: list[float],
                    w: list[float], hops: list[float]) -> PipeTiming:
    """The makespan in closed form: the busiest rank's work plus the fill and drain.

    With ``p`` ranks, ``v`` chunks, ``m`` microbatches and uniform per-stage times ``F, I, W``:
    GPipe and 1F1B take ``(m + p - 1)(F + I + W)`` (Narayanan et al., 2021, Sec. 2.2.1),
    interleaved 1F1B ``(m v + p - 1)(F + I + W)`` with per-chunk times and ``m`` a multiple of
    ``p`` (Sec. 2.2.2), ZB-H1 ``m (F + I + W) + (p - 1)(F + I - W)`` for ``m >= p`` (Qi et al.,
    2023, Sec. 3.1). These equal the simulation for uniform stages without messages (tested).
    ZB-H2 and ZB-V, as the runtime builds them (a list scheduler; ZB-V in the paper's handcrafted
    order from 2p - 1 microbatches), are priced with ZB-H1's form (per chunk for ZB-V), which is
    close for uniform stages (tested).
    Messages add one transfer each way per boundary (the fill and drain; the steady state can
    stall more), stages that differ are taken from the busiest rank for the steady state and the
    mean stage for the fill and drain: an estimate the search uses only to choose which
    strategies to simulate.
    """
    n = len(f)
    work = [0.0] * p
    for st, r in enumerate(where):  # stage st runs on rank where[st]
        work[r] += f[st] + i[st] + w[st]
    mean_f, mean_i, mean_w = sum(f) / n, sum(i) / n, sum(w) / n
    if split and m >= p:
        fill = (p - 1) * max(mean_f + mean_i - mean_w, 0.0)
    else:
        fill = (p - 1) * (mean_f + mean_i + mean_w)
    span = m * max(work) + fill + 2 * sum(hops[: p - 1])
    busy = tuple(m * x for x in work)
    tail = max(i) + max(w)
    return PipeTiming(span, busy, tuple(span for _ in range(p)), tuple(span - tail for _ in range(p)))
