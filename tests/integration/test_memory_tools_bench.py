"""bench/memory_tools.py's smoke mode runs end to end and writes its JSON (its numbers mean nothing;
the kept-activation ratios are exact counts, so their order is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_memory_tools_quick(tmp_path: Path) -> None:
    out = tmp_path / "memory_tools.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_tools.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = {v: r["kept_vs_none"] for v, r in json.loads(out.read_text())["variants"].items()}
    assert kept["none"] == 1.0 and kept["offload"] == 1.0  # on the CPU offload moves nothing
    assert kept["full"] < kept["full-every-2"] < 1.0
    assert kept["full"] < kept["selective"] < 1.0
