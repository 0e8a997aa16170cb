"""Timelines of timed actions: a Chrome trace for Perfetto and a Gantt chart PNG.

Both take the same input, a flat list of :class:`TimedAction` (measured by the runtime or
produced by the simulator), so a simulated and a measured step can be compared side by side.
Pure: no torch; matplotlib is imported only inside :func:`render_png`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from statistics import quantiles
from typing import Any

from .actions import Kind, TimedAction

# Okabe & Ito (2008) colour-blind-safe palette. Communication reuses the sky blue / purple pair
# so activations and gradients stay distinguishable without competing with compute colours.
_COLOUR: dict[Kind, str] = {
    Kind.F: "#0072B2",  # blue
    Kind.B: "#D55E00",  # vermillion
    Kind.I: "#E69F00",  # orange
    Kind.W: "#009E73",  # bluish green
    Kind.SEND_F: "#56B4E9",
    Kind.RECV_F: "#56B4E9",
    Kind.SEND_B: "#CC79A7",
    Kind.RECV_B: "#CC79A7",
}
_LEGEND: dict[Kind, str] = {
    Kind.F: "F forward",
    Kind.B: "B backward",
    Kind.I: "I input grad",
    Kind.W: "W weight grad",
    Kind.SEND_F: "SF send activation",
    Kind.RECV_F: "RF recv activation",
    Kind.SEND_B: "SB send grad",
    Kind.RECV_B: "RB recv grad",
}
_RECV = frozenset({Kind.RECV_F, Kind.RECV_B})  # hatched, so send and receive differ without colour
_IDLE = "#ECECEC"
_FONT_PT = 8.0
_CHAR_IN = 0.6 * _FONT_PT / 72  # rough width of one digit at _FONT_PT, in inches
_SLOT_IN = 0.24  # inches given to a typical compute action, enough for a two-digit label
_DPI = 100


def _check(events: Sequence[TimedAction]) -> None:
    if not events:
        raise ValueError(
            "no timed actions to draw: pass the TimedAction list of at least one rank "
            "(from the simulator or a measured run)"
        )
    for e in events:
        if e.rank < 0 or not (math.isfinite(e.start) and math.isfinite(e.end)) or e.end < e.start:
            raise ValueError(
                f"bad timed action {e.action} on rank {e.rank}: need rank >= 0 and finite "
                f"start <= end, got start={e.start!r} end={e.end!r}"
            )


def to_chrome_trace(
    events: Sequence[TimedAction], *, title: str = "", bubble_fraction: float | None = None
) -> dict[str, Any]:
    """A Chrome Trace Event Format object (loads in Perfetto): one thread row per rank."""
    _check(events)
    ranks = sorted({e.rank for e in events})
    meta: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 0, "tid": 0,
         "args": {"name": title or "layerwise pipeline"}},
    ]
    for r in ranks:
        meta.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
        meta.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": r, "args": {"sort_index": r}})
    spans = [
        {
            "ph": "X",
            "name": str(e.action),
            "cat": e.action.kind.value,
            "pid": 0,
            "tid": e.rank,
            "ts": e.start * 1e6,  # the format counts microseconds
            "dur": (e.end - e.start) * 1e6,
            "args": {"stage": e.action.stage, "microbatch": e.action.microbatch, "kind": e.action.kind.value},
        }
        for e in sorted(events, key=lambda e: (e.rank, e.start, e.end))
    ]
    other = {"title": title, "bubble_fraction": bubble_fraction, "generator": "layerwise"}
    return {"traceEvents": meta + spans, "displayTimeUnit": "ms", "otherData": other}


def write_chrome_trace(events: Sequence[TimedAction], path: str | os.PathLike[str], **kw: Any) -> None:
    """Write :func:`to_chrome_trace` as JSON; open it at https://ui.perfetto.dev."""
    trace = to_chrome_trace(events, **kw)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace, f)


def _time_unit(span: float) -> tuple[str, float]:
    """The largest unit in which the span is at least 1, so tick labels are short numbers."""
    if span >= 1.0:
        return "s", 1.0
    if span >= 1e-3:
        return "ms", 1e3
    return "µs", 1e6


def _shade(hex_colour: str, chunk: int, num_chunks: int) -> tuple[float, float, float]:
    """Darker for a rank's first chunk, lighter for later ones; the base colour with one chunk."""
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    if num_chunks <= 1:
        return (rgb[0], rgb[1], rgb[2])
    t = -0.35 + 0.85 * chunk / (num_chunks - 1)  # -0.35 = 35% towards black, +0.5 = half to white
    mixed = [c * (1 + t) if t < 0 else c + (1 - c) * t for c in rgb]
    return (mixed[0], mixed[1], mixed[2])


def _text_colour(rgb: tuple[float, float, float]) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "black" if luminance > 0.5 else "white"


def _compact(numbers: list[int]) -> str:
    """``0-3`` for a contiguous run, else a comma list, to keep legend entries short."""
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _rank_label(rank: int, stages: list[int]) -> str:
    if not stages:
        return f"rank {rank} (idle)"
    word = "stage" if len(stages) == 1 else "stages"
    return f"rank {rank} ({word} {', '.join(map(str, stages))})"


def render_png(
    events: Sequence[TimedAction],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    bubble_fraction: float | None = None,
    num_ranks: int | None = None,
) -> None:
    """Draw a Gantt chart of the timeline, one row per rank (rank 0 on top), to a PNG file."""
    _check(events)
    top_rank = max(e.rank for e in events)
    if num_ranks is None:
        num_ranks = top_rank + 1
    elif num_ranks <= top_rank:
        raise ValueError(
            f"num_ranks={num_ranks} but an action runs on rank {top_rank}; pass num_ranks >= {top_rank + 1}"
        )

    # Figure + Agg canvas, not pyplot: no display needed, and no switching of a notebook's
    # global backend or closing of the caller's open figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    stages = {r: sorted({e.action.stage for e in events if e.rank == r}) for r in range(num_ranks)}
    num_chunks = max(len(s) for s in stages.values())
    has_comm = any(e.action.kind.is_comm and e.end > e.start for e in events)
    t0 = min(e.start for e in events)
    span = max(max(e.end for e in events) - t0, 1e-12)
    unit, scale = _time_unit(span)

    # Size so that a typical compute action gets _SLOT_IN inches: 4 ranks x 32 microbatches
    # still shows a label in every box. Capped so the file stays a sane size.
    compute = [e.end - e.start for e in events if e.action.kind.is_compute and e.end > e.start]
    # The lower quartile is the short kind (usually F): size for it, not for the longer B.
    typical = quantiles(compute, n=4)[0] if len(compute) > 1 else compute[0] if compute else span / 20
    ax_w = min(max(span / typical * _SLOT_IN, 7.0), 40.0)
    left, right, top, row_h = 1.9, 0.3, 0.55, 0.55
    handles = _legend(Patch, {e.action.kind for e in events if e.end > e.start}, num_chunks, stages)
    fig_w = left + ax_w + right
    ncol = max(1, min(len(handles), int(fig_w / 1.9)))
    bottom = 0.6 + 0.25 * math.ceil(len(handles) / ncol)
    fig_h = top + row_h * num_ranks + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, ax_w / fig_w, row_h * num_ranks / fig_h))
    _draw(ax, events, stages, has_comm, t0, scale, ax_w / (span * scale))
    ax.set_xlim(0, span * scale)
    ax.set_ylim(num_ranks - 0.5, -0.5)  # inverted: rank 0 on top
    ax.set_yticks(range(num_ranks), [_rank_label(r, stages[r]) for r in range(num_ranks)])
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(f"time ({unit})")
    ax.grid(axis="x", color="white", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    parts = [title] if title else []
    if bubble_fraction is not None:
        parts.append(f"bubble {100 * bubble_fraction:.1f}%")
    if heading := " — ".join(parts):
        fig.suptitle(heading, y=1 - 0.12 / fig_h, va="top", fontsize=11)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=_FONT_PT,
               handlelength=2.2, handleheight=1.2,
               bbox_to_anchor=(0.5, 0.08 / fig_h))
    fig.savefig(path, dpi=_DPI, facecolor="white")


def _draw(
    ax: Any,
    events: Sequence[TimedAction],
    stages: dict[int, list[int]],
    has_comm: bool,
    t0: float,
    scale: float,
    inches_per_unit: float,
) -> None:
    """Grey idle band per rank, compute boxes on it, communication as thin strips underneath."""
    num_chunks = max(len(s) for s in stages.values())
    # Row geometry in rank units (row r spans r-0.5..r+0.5): compute fills most of it; when there
    # is communication it gets its own low strip, so overlapping sends never hide compute.
    c_top, c_bot = (-0.4, 0.22) if has_comm else (-0.4, 0.4)
    m_top, m_bot = 0.26, 0.4
    for r in stages:
        ax.axhspan(r - 0.45, r + 0.45, color=_IDLE, zorder=0, linewidth=0)
    for e in events:
        if e.end <= e.start:
            continue  # zero-length (typically a non-blocking send) has nothing to show
        kind, x, w = e.action.kind, (e.start - t0) * scale, (e.end - e.start) * scale
        chunk = stages[e.rank].index(e.action.stage)
        rgb = _shade(_COLOUR[kind], chunk, num_chunks)
        if kind.is_comm:
            ax.broken_barh([(x, w)], (e.rank + m_top, m_bot - m_top), facecolors=[rgb], zorder=2,
                           hatch="////" if kind in _RECV else None, edgecolor="white", linewidth=0.3)
            continue
        ax.broken_barh([(x, w)], (e.rank + c_top, c_bot - c_top), facecolors=[rgb],
                       edgecolor="white", linewidth=0.6, zorder=3)
        label = str(e.action.microbatch)
        if w * inches_per_unit >= _CHAR_IN * len(label) + 0.04:  # too narrow: no label, no overlap
            ax.text(x + w / 2, e.rank + (c_top + c_bot) / 2, label, ha="center", va="center",
                    fontsize=_FONT_PT, color=_text_colour(rgb), zorder=4, clip_on=True)


def _legend(patch: Any, kinds: set[Kind], num_chunks: int, stages: dict[int, list[int]]) -> list[Any]:
    handles = [
        patch(facecolor=_COLOUR[k], hatch="////" if k in _RECV else None, edgecolor="white", label=_LEGEND[k])
        for k in Kind
        if k in kinds
    ]
    handles.append(patch(facecolor=_IDLE, edgecolor="#BBBBBB", label="idle (bubble)"))
    if num_chunks > 1:
        # Interleaved placement: the same kind in a darker shade is the rank's first model chunk.
        for c in range(num_chunks):
            shade = "darker" if c == 0 else "lighter" if c == num_chunks - 1 else "mid"
            held = sorted(s[c] for s in stages.values() if len(s) > c)
            handles.append(patch(facecolor=_shade("#808080", c, num_chunks), edgecolor="white",
                                 label=f"{shade}: chunk {c} (stages {_compact(held)})"))
    return handles
