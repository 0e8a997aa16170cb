"""Chrome trace structure and PNG rendering of timed actions, on hand-built pipelines."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from layerwise.schedule import timeline
from layerwise.schedule.actions import Action, Kind, TimedAction
from layerwise.schedule.timeline import render_png, to_chrome_trace, write_chrome_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gpipe(num_ranks: int, num_microbatches: int, seed: int = 0, chunks: int = 1) -> list[TimedAction]:
    """All forwards then all backwards, with stage s on rank s % num_ranks (looping placement).

    Durations are drawn from a seeded RNG so boxes differ in width; each action waits for its
    producer on the previous (or, for backward, next) stage and for its own rank to be free.
    A non-zero receive precedes every cross-rank dependency and a zero-length send follows it.
    """
    rng = random.Random(seed)
    num_stages = num_ranks * chunks
    free = [0.0] * num_ranks
    done: dict[tuple[int, Kind, int], float] = {}
    out: list[TimedAction] = []

    def run(stage: int, kind: Kind, mb: int, dep: tuple[int, Kind, int] | None, base: float) -> None:
        rank = stage % num_ranks
        ready = done[dep] if dep else 0.0
        if dep and dep[0] % num_ranks != rank:
            recv = Kind.RECV_F if kind == Kind.F else Kind.RECV_B
            start = max(free[rank], ready)
            free[rank] = start + rng.uniform(0.5e-3, 1e-3)
            out.append(TimedAction(rank, Action(stage, recv, mb), start, free[rank]))
        start = max(free[rank], ready)
        end = start + base * rng.uniform(0.8, 1.2)
        out.append(TimedAction(rank, Action(stage, kind, mb), start, end))
        free[rank] = end
        done[(stage, kind, mb)] = end
        send = Kind.SEND_F if kind == Kind.F else Kind.SEND_B
        out.append(TimedAction(rank, Action(stage, send, mb), end, end))  # non-blocking: zero length

    for s in range(num_stages):
        for m in range(num_microbatches):
            run(s, Kind.F, m, (s - 1, Kind.F, m) if s else None, 10e-3)
    for s in reversed(range(num_stages)):
        for m in range(num_microbatches):
            dep = (s + 1, Kind.B, m) if s < num_stages - 1 else (s, Kind.F, m)
            run(s, Kind.B, m, dep, 20e-3)
    return out


@pytest.fixture
def events() -> list[TimedAction]:
    return _gpipe(num_ranks=3, num_microbatches=4)


def _spans(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def test_chrome_trace_has_one_complete_event_per_action(events: list[TimedAction]) -> None:
    trace = to_chrome_trace(events)
    spans = _spans(trace)
    assert len(spans) == len(events)
    assert sorted(e["name"] for e in spans) == sorted(str(t.action) for t in events)
    by_name_rank = {(e["name"], e["tid"]): e for e in spans}
    for t in events:
        span = by_name_rank[(str(t.action), t.rank)]
        assert span["pid"] == 0
        assert span["ts"] == pytest.approx(t.start * 1e6)
        assert span["dur"] == pytest.approx((t.end - t.start) * 1e6)
        assert span["dur"] >= 0
        assert span["cat"] == t.action.kind.value
        assert span["args"] == {
            "stage": t.action.stage,
            "microbatch": t.action.microbatch,
            "kind": t.action.kind.value,
        }


def test_chrome_trace_names_one_thread_per_rank(events: list[TimedAction]) -> None:
    trace = to_chrome_trace(events)
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    names = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    order = {e["tid"]: e["args"]["sort_index"] for e in meta if e["name"] == "thread_sort_index"}
    assert len([e for e in meta if e["name"] == "thread_name"]) == 3
    assert names == {0: "rank 0", 1: "rank 1", 2: "rank 2"}
    assert order == {0: 0, 1: 1, 2: 2}
    assert all(e["pid"] == 0 for e in trace["traceEvents"])
    assert trace["displayTimeUnit"] == "ms"


def test_chrome_trace_other_data_and_json_round_trip(events: list[TimedAction]) -> None:
    trace = to_chrome_trace(events, title="gpipe 3x4", bubble_fraction=0.231)
    assert trace["otherData"]["title"] == "gpipe 3x4"
    assert trace["otherData"]["bubble_fraction"] == 0.231
    assert json.loads(json.dumps(trace)) == trace


def test_write_chrome_trace(tmp_path: Path, events: list[TimedAction]) -> None:
    path = tmp_path / "trace.json"
    write_chrome_trace(events, path, title="t")
    assert json.loads(path.read_text()) == to_chrome_trace(events, title="t")


def _read_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    return image.shape[1], image.shape[0]  # (width, height) in pixels


def test_render_png_writes_a_plausible_image(tmp_path: Path, events: list[TimedAction]) -> None:
    path = tmp_path / "timeline.png"
    render_png(events, str(path), title="GPipe", bubble_fraction=0.231)
    width, height = _read_png(path)
    assert 600 <= width <= 5000
    assert 200 <= height <= 1000
    assert width > height  # a Gantt chart: time runs across


def test_render_png_interleaved_and_idle_rank(tmp_path: Path) -> None:
    events = _gpipe(num_ranks=2, num_microbatches=4, chunks=2)
    assert {t.action.stage for t in events if t.rank == 0} == {0, 2}
    path = tmp_path / "interleaved.png"
    render_png(events, str(path), num_ranks=3)  # rank 2 holds nothing: drawn as an idle row
    width, height = _read_png(path)
    assert width > height > 200


def test_png_width_grows_with_actions_and_is_capped(tmp_path: Path) -> None:
    widths = []
    for mb in (2, 16, 64):
        path = tmp_path / f"w{mb}.png"
        render_png(_gpipe(num_ranks=2, num_microbatches=mb), str(path))
        widths.append(_read_png(path)[0])
    assert widths[0] < widths[1] <= widths[2] <= 5000


def test_empty_events_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no timed actions"):
        to_chrome_trace([])
    with pytest.raises(ValueError, match="no timed actions"):
        render_png([], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_bad_events_are_rejected(tmp_path: Path) -> None:
    backwards = [TimedAction(1, Action(1, Kind.F, 0), 2.0, 1.0)]
    with pytest.raises(ValueError, match=r"1F0 on rank 1"):
        to_chrome_trace(backwards)
    ok = [TimedAction(2, Action(2, Kind.F, 0), 0.0, 1.0)]
    with pytest.raises(ValueError, match="num_ranks >= 3"):
        render_png(ok, str(tmp_path / "x.png"), num_ranks=2)


@pytest.mark.parametrize(("span", "unit"), [(3.0, "s"), (0.25, "ms"), (4e-5, "µs")])
def test_time_unit_keeps_tick_labels_short(span: float, unit: str) -> None:
    assert timeline._time_unit(span)[0] == unit


def test_module_imports_no_torch_and_matplotlib_only_lazily() -> None:
    tree = ast.parse(Path(timeline.__file__).read_text())

    def roots(nodes: list[ast.AST]) -> set[str]:
        out = set()
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                out.add(n.module.split(".")[0])
        return out

    assert "torch" not in roots(list(ast.walk(tree)))
    assert "matplotlib" not in roots(tree.body)  # only inside render_png
