"""The GPU check: without CUDA it skips cleanly (what CI sees), and its case list is consistent.

The check itself needs GPUs; ``scripts/gpu_check.sh --cpu-dry-run`` runs every part on the CPU
(about 2 minutes on 2 cores), too slow for CI, so only its plan is checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ..bench_module import load_bench

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _module() -> ModuleType:
    return load_bench("gpu_check_nccl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_0() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device visible" in proc.stdout


@pytest.mark.parametrize(("world", "dry"), [(1, False), (2, False), (4, False), (8, False), (2, True)])
def test_every_case_fits_its_process_count(world: int, dry: bool) -> None:
    mod = _module()
    groups = mod._cases(world, dry)
    names = [c["name"] for _, cases in groups for c in cases]
    assert len(names) == len(set(names)) and names
    for nprocs, cases in groups:
        assert nprocs <= (2 if dry else world)
        for c in cases:
            if c.get("kind") == "fsdp_offload":
                continue
            kw = c["pipeline"]
            assert kw.get("dp", 1) * kw["stages"] * kw.get("tp", 1) == nprocs, c["name"]
