"""bench/planner.py's Megatron-LM part runs end to end (pure arithmetic; the measured part takes
minutes and is left to the benchmark itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_megatron_part(tmp_path: Path) -> None:
    out = tmp_path / "planner.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "planner.py"), "--megatron-only", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meg = json.loads(out.read_text())["megatron"]
    assert len(meg["rows"]) == 10 and all(r["feasible"] for r in meg["rows"])
    first = meg["rows"][0]
    assert first["predicted_tflops"] == pytest.approx(first["published_tflops"], rel=0.01)  # calibrated on it
    assert 0 < meg["efficiency"] < 1
