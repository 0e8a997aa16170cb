"""The demo, the hello world and torchrun, end to end, as a newcomer runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _run(args: list[str], tmp_path: Path, timeout: int = 500) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_trains_and_matches_the_single_process_reference(tmp_path: Path) -> None:
    png = tmp_path / "timeline.png"
    proc = _run([sys.executable, "-m", "layerwise", "demo", "--steps", "6", "--json", "--png", str(png)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("final_loss", "reference_loss", "measured_bubble", "predicted_bubble"):
        assert key in summary
    assert summary["first_step_difference"] <= 1e-5
    assert abs(summary["final_loss"] - summary["reference_loss"]) <= 1e-3 * summary["reference_loss"]
    assert summary["final_loss"] < summary["first_loss"], "six steps of training lower the loss"
    assert 0 < summary["measured_bubble"] < 1 and 0 < summary["predicted_bubble"] < 1
    assert len(summary["partition"]) == 4 and sum(summary["partition"]) == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "one-process loss" in proc.stderr and "the same" in proc.stderr


def test_demo_rejects_bad_input_with_one_line(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "layerwise", "demo", "--stages", "0"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_hello_world_runs_as_a_script(tmp_path: Path) -> None:
    proc = _run([sys.executable, str(ROOT / "examples" / "hello.py")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final loss per rank" in proc.stdout
    line = proc.stdout.strip().splitlines()[-1]
    losses = json.loads(line.split(":", 1)[1].strip())
    assert len(losses) == 4 and len(set(losses)) == 1


def test_hello_world_runs_under_torchrun(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = _run([str(torchrun), "--nproc-per-node", "4", str(ROOT / "examples" / "hello.py")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final loss per rank") == 4


def test_mesh_hello_world_on_two_torchrun_nodes(tmp_path: Path) -> None:
    """dp2 x pp2 over two torchrun "nodes" on 127.0.0.1 meeting through c10d rendezvous."""
    import re
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "layerwise-test", str(ROOT / "examples" / "hello_mesh.py")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    nodes = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    try:
        outs = [n.communicate(timeout=400) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    printed = "".join(out for out, _ in outs)
    found = re.search(r"largest difference ([0-9.e+-]+)", printed)
    assert found, printed[-2000:]
    assert float(found.group(1)) <= 1e-4  # 20 SGD steps at lr 0.5 from one seed, fp32 rounding only
