"""``layerwise simulate``: time, bubble and activation memory of a schedule, without devices.

Costs are parsed as exact fractions (``0.1`` is 1/10), so the reported makespan is the exact sum
of the costs, not a float approximation of it.
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from typing import Any

from layerwise.commands import UsageError, limits, positive_int
from layerwise.schedule.actions import TimedAction
from layerwise.schedule.generators import SCHEDULES, ScheduleConfigError, build, chunks_per_rank
from layerwise.schedule.simulate import Costs, SimResult, simulate

_DEFAULT_CHUNKS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", required=True, choices=SCHEDULES, help="pipeline schedule")
    parser.add_argument("--stages", required=True, type=positive_int, metavar="P",
                        help="pipeline ranks (devices)")
    parser.add_argument("--microbatches", required=True, type=positive_int, metavar="M",
                        help="microbatches per training step")
    parser.add_argument("--chunks", type=positive_int, metavar="V",
                        help=f"model chunks per rank, interleaved only (default {_DEFAULT_CHUNKS}; zbv always 2)")
    parser.add_argument("--costs", type=_costs, default=(Fraction(1), Fraction(1), None),
                        metavar="F,B[,W]",
                        help="seconds per microbatch on one rank's layers: forward, backward "
                        "(default 1,1). With W, B is the input-gradient part and W the "
                        "weight-gradient part; without it, B is split evenly. With V chunks per rank "
                        "(interleaved, zbv) each chunk costs 1/V of this, so schedules compare on the same model")
    parser.add_argument("--comm", type=_seconds, default=Fraction(0), metavar="SECONDS",
                        help="latency of each send between ranks (default 0)")
    parser.add_argument("--png", metavar="FILE", help="write a Gantt chart of the timeline")
    parser.add_argument("--trace", metavar="FILE", help="write a Chrome trace (open in ui.perfetto.dev)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    limits.check_chunks(args.schedule, args.chunks)
    limits.check_size(args.schedule, args.stages, args.microbatches, args.chunks)
    limits.check_output(args.png, "--png")
    limits.check_output(args.trace, "--trace")
    chunks = chunks_per_rank(args.schedule, args.chunks or _DEFAULT_CHUNKS)
    try:
        schedule = build(args.schedule, stages=args.stages, microbatches=args.microbatches, chunks=chunks)
    except ScheduleConfigError as err:
        raise UsageError(str(err)) from None
    forward, backward, weight = args.costs
    # Interleaving splits a rank's layers into `chunks` model stages, each 1/chunks of the work
    # (t_f / v in Narayanan et al. 2021, Sec. 2.2.2).
    costs = Costs.uniform(
        schedule.num_stages,
        forward / chunks,
        backward / chunks,
        None if weight is None else weight / chunks,
        latency=args.comm,
    )
    result = simulate(schedule, costs)
    report = _report(args, chunks, result)
    # --stages counts ranks; with interleaving each rank holds `chunks` of the model stages.
    depth = f"{args.stages} ranks x {chunks} chunks" if chunks > 1 else f"{args.stages} stages"
    title = f"{args.schedule}: {depth}, {args.microbatches} microbatches"
    events = [TimedAction(t.rank, t.action, float(t.start), float(t.end)) for t in result.timeline]
    for path, kind in ((args.png, "png"), (args.trace, "trace")):
        if path:
            _write(kind, path, events, title, result.bubble_fraction, args.stages)
            report[kind] = path
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report, title))
    return 0


def _report(args: argparse.Namespace, chunks: int, result: SimResult) -> dict[str, Any]:
    forward, backward, weight = args.costs
    return {
        "schedule": args.schedule,
        "stages": args.stages,
        "microbatches": args.microbatches,
        "chunks": chunks,
        "costs": {"forward": float(forward), "backward": float(backward),
                  "weight": None if weight is None else float(weight)},
        "comm_latency": float(args.comm),
        "makespan": float(result.makespan),
        "ideal": float(max(result.busy)),  # the busiest rank's compute: the time with no bubble
        "bubble_fraction": result.bubble_fraction,
        "peak_inflight": list(result.peak_inflight),
        "busy": [float(b) for b in result.busy],
        "idle": [float(i) for i in result.idle],
    }


def _table(report: dict[str, Any], title: str) -> str:
    c = report["costs"]
    costs = f"F={c['forward']:g} B={c['backward']:g}" + (
        "" if c["weight"] is None else f" W={c['weight']:g}"
    )
    rows = [
        ("costs per rank", costs + f", comm latency {report['comm_latency']:g} s"),
        ("makespan", f"{report['makespan']:g} s"),
        ("ideal", f"{report['ideal']:g} s  (busiest rank's compute, no bubble)"),
        ("bubble", f"{100 * report['bubble_fraction']:.1f} %  (idle share of all ranks' time)"),
        ("peak in-flight", " ".join(map(str, report["peak_inflight"]))
         + "  (microbatches of activations held, per stage)"),
    ]
    rows += [(f"wrote {kind}", report[kind]) for kind in ("png", "trace") if kind in report]
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {value}" for name, value in rows])


def _write(kind: str, path: str, events: list[TimedAction], title: str, bubble: float, ranks: int) -> None:
    from layerwise.schedule import timeline  # matplotlib is imported only when a PNG is drawn

    try:
        if kind == "png":
            timeline.render_png(events, path, title=title, bubble_fraction=bubble, num_ranks=ranks)
        else:
            timeline.write_chrome_trace(events, path, title=title, bubble_fraction=bubble)
    except OSError as err:
        raise UsageError(f"cannot write --{kind} {path}: {err.strerror or err}") from None


def _seconds(text: str) -> Fraction:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _costs(text: str) -> tuple[Fraction, Fraction, Fraction | None]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"expected F,B or F,B,W (seconds, for example 1,2 or 1,1,1), got {text!r}"
        )
    values = [_seconds(p) for p in parts]
    if sum(values) == 0:
        raise argparse.ArgumentTypeError(f"costs cannot all be zero, got {text!r}")
    return values[0], values[1], values[2] if len(values) == 3 else None
