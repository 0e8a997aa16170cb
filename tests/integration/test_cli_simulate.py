"""``layerwise simulate`` end to end, in a subprocess as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from layerwise.schedule.generators import build
from layerwise.schedule.simulate import Costs, simulate

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, module: str = "layerwise.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _json(*args: str) -> dict[str, Any]:
    done = _cli("simulate", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # exactly one JSON object, nothing else on stdout


@pytest.mark.parametrize(
    ("schedule", "extra", "chunks", "costs"),
    [
        ("gpipe", [], 1, (1, 1, None)),
        ("1f1b", ["--costs", "1,2", "--comm", "0.25"], 1, (1, 2, None)),
        ("interleaved", ["--chunks", "3", "--costs", "0.5,1"], 3, (Fraction(1, 2), 1, None)),
        ("zb-h1", ["--costs", "1,1,1"], 1, (1, 1, 1)),
    ],
)
def test_json_matches_the_simulator(
    schedule: str, extra: list[str], chunks: int, costs: tuple[Any, ...]
) -> None:
    p, m = 4, 12
    out = _json("--schedule", schedule, "--stages", str(p), "--microbatches", str(m), *extra)
    built = build(schedule, stages=p, microbatches=m, chunks=chunks)
    latency = Fraction(1, 4) if "--comm" in extra else 0
    f, b, w = (None if c is None else Fraction(c) / chunks for c in costs)
    # --costs are per rank; each of a rank's chunks costs 1/chunks of them
    expected = simulate(built, Costs.uniform(built.num_stages, f, b, w, latency=latency))
    assert out["schedule"] == schedule
    assert (out["stages"], out["microbatches"], out["chunks"]) == (p, m, chunks)
    assert out["makespan"] == float(expected.makespan)
    assert out["bubble_fraction"] == expected.bubble_fraction
    assert out["peak_inflight"] == list(expected.peak_inflight)
    assert out["ideal"] == float(max(expected.busy))


def test_default_costs_give_the_papers_bubble() -> None:
    out = _json("--schedule", "1f1b", "--stages", "4", "--microbatches", "8")
    assert out["makespan"] == 22.0  # (m + p - 1)(T_F + T_B)
    assert out["bubble_fraction"] == pytest.approx(3 / 11)
    assert out["peak_inflight"] == [4, 3, 2, 1]


def test_table_and_files(tmp_path: Path) -> None:
    png, trace = tmp_path / "zb.png", tmp_path / "zb.json"
    done = _cli(
        "simulate", "--schedule", "zb-h1", "--stages", "4", "--microbatches", "8",
        "--png", str(png), "--trace", str(trace), module="layerwise",  # python -m layerwise
    )
    assert done.returncode == 0, done.stderr
    for word in ("makespan", "bubble", "peak in-flight", "ideal", str(png), str(trace)):
        assert word in done.stdout

    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    height, width, _ = mpimg.imread(png).shape
    assert width > 400 and height > 150

    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert {"0F0", "3I7", "3W7"} <= names
    assert {e["args"]["name"] for e in events if e.get("name") == "thread_name"} == {
        f"rank {r}" for r in range(4)
    }


def test_simulate_does_not_import_torch() -> None:
    code = (
        "import sys; from layerwise.cli import main; "
        "rc = main(['simulate', '--schedule', '1f1b', '--stages', '2', '--microbatches', '2', '--json']); "
        "print(rc, 'torch' in sys.modules, 'matplotlib' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stderr.split() == ["0", "False", "False"], done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--schedule", "pipedream", "--stages", "4", "--microbatches", "8"], "invalid choice: 'pipedream'"),
        (["--schedule", "1f1b", "--stages", "0", "--microbatches", "8"], "--stages"),
        (["--schedule", "interleaved", "--stages", "4", "--microbatches", "8", "--chunks", "0"], "--chunks"),
        (["--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--costs", "1;2"], "--costs"),
        (["--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--costs", "1,-2"], "--costs"),
        (["--schedule", "gpipe", "--stages", "4", "--microbatches", "8", "--chunks", "2"], "--chunks"),
        (["--stages", "4", "--microbatches", "8"], "--schedule"),
    ],
)
def test_bad_input_is_one_error_line(args: list[str], says: str) -> None:
    done = _cli("simulate", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert says in lines[0]
