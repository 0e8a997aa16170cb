"""The benchmarks' smoke modes run end to end and write the JSON their READMEs describe (the
numbers of a smoke run mean nothing; only that the scripts still work is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _run(script: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)],
                          cwd=out.parent, capture_output=True, text=True, timeout=280, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_pipeline_vs_torch_quick(tmp_path: Path) -> None:
    r = _run("pipeline_vs_torch.py", tmp_path / "pvt.json")
    for schedule in ("gpipe", "1f1b", "zbv"):
        assert r["throughput_ratio"][schedule] > 0
        assert 0 <= r["bubble"][schedule]["measured"] < 1 and 0 <= r["bubble"][schedule]["predicted"] < 1
    # both systems trained the same model on the same data
    for schedule in ("1f1b", "zbv"):
        assert r["first_losses"]["layerwise"][schedule] == pytest.approx(r["first_losses"]["torch"][schedule], rel=1e-5)


def test_balance_quick(tmp_path: Path) -> None:
    r = _run("balance.py", tmp_path / "balance.json")
    for key in ("balanced_vs_uniform", "aware_vs_blind", "prediction_error", "balanced_vs_uniform_head_two_blocks"):
        assert r[key] > 0
    assert set(r["met"]) == {"balanced_vs_uniform", "aware_vs_blind", "prediction_error"}
    for key in ("balanced_vs_uniform", "prediction_error"):  # the spread over runs (one in --quick)
        assert r["spread"][key]["min"] <= r[key] <= r["spread"][key]["max"]
        assert len(r["spread"][key]["values"]) == len(r["runs"]) == r["config"]["runs"]
    for run in r["runs"]:  # each headline ratio is the median of that run's paired ratios
        for key, pairs in run["details"]["paired_ratios"].items():
            assert min(pairs) <= run[key] <= max(pairs), key


def test_schedules_quick(tmp_path: Path) -> None:
    r = _run("schedules.py", tmp_path / "schedules.json")
    for schedule in ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv"):
        row = r["m4"][schedule]
        for key in ("tokens_per_s", "speedup_vs_1f1b", "measured_bubble", "predicted_bubble", "predicted_speedup_vs_1f1b"):
            assert row[key] >= 0, (schedule, key)
        assert sum(row["split"]) == 2 + 2  # the quick model's embedding, 2 blocks and head


def test_backward_split_quick(tmp_path: Path) -> None:
    r = _run("backward_split.py", tmp_path / "bs.json")
    assert set(r["kinds"]) == {"linear", "layer_norm", "embedding", "attention", "gpt_block", "head"}
    for kind, row in r["kinds"].items():
        assert row["identical_gradients"], kind
        assert row["split_ms"] > 0 and row["fused_ms"] > 0
        lo, hi = row["split_over_fused_paired_quartiles"]
        assert lo <= row["split_over_fused_paired"] <= hi, kind
