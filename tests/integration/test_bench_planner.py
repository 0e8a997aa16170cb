"""bench/planner.py's Megatron-LM part runs end to end (pure arithmetic; the measured part takes
minutes and is left to the benchmark itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..bench_module import load_bench

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


def _bench(name: str = "planner") -> object:
    return load_bench(name)


def test_fits_recover_the_latency_and_bandwidth_they_were_made_with() -> None:
    # The bench feeds the planner alpha-beta numbers fitted to its measurements; on times made
    # exactly from the ring model, every fit gives back the alpha and bandwidth used.
    b = _bench("planner_calls")
    alpha, bw = 3e-4, 2e9
    raw = {kind: {str(n): steps * alpha + vol * n / bw for n in (4096, 1 << 16, 1 << 20, 1 << 22)}
           for kind, (steps, vol) in b.RING2.items()}  # type: ignore[attr-defined]
    fit = b.fit_links(raw)  # type: ignore[attr-defined]
    assert fit["latency"] == pytest.approx(alpha, rel=1e-6) and fit["bandwidth"] == pytest.approx(bw, rel=1e-6)
    widths, counts, base = [256, 512, 1024], [4, 12], 0.01
    for mode, (steps, vol) in b.DP_CALLS.items():  # type: ignore[attr-defined]
        unit = {w: steps * alpha + vol * w * w * 4 / bw for w in widths}
        timed = {f"{w}x{n}": base + n * unit[w] for w in widths for n in counts}
        got = b.fit_dp_calls({mode: timed}, widths, counts, {mode: (steps, vol)})  # type: ignore[attr-defined]
        assert got["latency"] == pytest.approx(alpha, rel=1e-6) and got["bandwidth"] == pytest.approx(bw, rel=1e-6)
    tp = b.fit_tp_calls({"all_reduce": {str(n): 2 * alpha + n / bw for n in (4096, 1 << 20, 1 << 22)},  # type: ignore[attr-defined]
                         "blocks": {"2": base + 2 * 8 * alpha, "6": base + 6 * 8 * alpha}})
    assert tp["latency"] == pytest.approx(alpha, rel=1e-6) and tp["bandwidth"] == pytest.approx(bw, rel=1e-6)


def test_sections_merge_by_name_in_the_configurations_order() -> None:
    b = _bench()
    names = [c["name"] for c in b.CONFIGS]  # type: ignore[attr-defined]
    old = {"sections": [{"configs": names[:2]}], "configs": [{"name": names[1], "v": 1}, {"name": names[0], "v": 1}]}
    new = {"sections": [{"configs": names[1:3]}], "configs": [{"name": names[2], "v": 2}, {"name": names[1], "v": 2}]}
    merged = b.merge(old, new)  # type: ignore[attr-defined]
    assert [(r["name"], r["v"]) for r in merged["configs"]] == [(names[0], 1), (names[1], 2), (names[2], 2)]
    assert len(merged["sections"]) == 2
