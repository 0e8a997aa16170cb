"""``layerwise partition`` end to end, in a subprocess as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_GPT = ["--model", "gpt", "--blocks", "2", "--width", "32", "--context", "16", "--vocab", "512",
             "--batch", "8"]  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "layerwise.cli", "partition", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_table_and_png(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    done = _cli(*SMALL_GPT, "--stages", "2", "--png", str(png))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for word in ("stage", "layers", "params", "time/mb (ms)", "memory (MiB)", "predicted step time",
                 "predicted bubble", "Embedding", "Head"):  # fmt: skip
        assert word in out, f"{word!r} missing from:\n{out}"
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_json_with_devices() -> None:
    done = _cli(*SMALL_GPT, "--devices", "fast:1.0:1GiB,slow:0.5", "--microbatches", "2", "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)  # one JSON object, nothing else
    for key in ("partition", "balance", "schedule", "microbatches", "devices", "stages",
                "predicted_step_time_s", "predicted_bubble", "model", "layer_names"):  # fmt: skip
        assert key in data
    assert sum(data["partition"]) == 4 and len(data["layer_names"]) == 4  # embedding, 2 blocks, head
    assert [d["name"] for d in data["devices"]] == ["fast", "slow"]
    assert data["devices"][0]["memory_bytes"] == 2**30 and data["devices"][1]["memory_bytes"] is None
    for stage in data["stages"]:
        assert {"first_layer", "last_layer", "params", "time_s", "memory_bytes"} <= set(stage)
    assert data["predicted_step_time_s"] > 0 and 0 <= data["predicted_bubble"] < 1


def test_mlp_params_balance() -> None:
    done = _cli("--model", "mlp", "--depth", "6", "--stages", "3", "--balance", "params", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["partition"] == [2, 2, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "mlp", "--depth", "3", "--stages", "4"], "cannot split 3 layers into 4 stages"),
        (["--model", "mlp", "--depth", "4", "--devices", "cpu:1.0:1KiB,cpu:1.0:1KiB"], "missing"),
        (["--devices", "cpu:fast"], "speed 'fast' is not a number"),
        (["--model", "mlp", "--vocab", "10", "--stages", "2"], "--vocab applies to --model gpt"),
        (["--model", "mlp"], "give --stages"),
    ],
)
def test_errors_exit_2_with_one_error_line(args: list[str], message: str) -> None:
    done = _cli(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
