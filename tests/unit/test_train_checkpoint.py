"""Checkpoints: a round trip restores weights, AdamW state and RNG; a process killed (SIGKILL)
in the middle of a save leaves the previous checkpoint complete and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from layerwise.train import checkpoint as ckpt

SRC = str(Path(__file__).resolve().parents[2] / "src")


class _Stage:
    def __init__(self, first_layer: int, layers: list[torch.nn.Module]) -> None:
        self.first_layer, self.layers = first_layer, layers


def _setup(seed: int) -> tuple[torch.nn.ModuleDict, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = ckpt.stage_module({1: _Stage(2, [torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)])})
    return module, torch.optim.AdamW(module.parameters(), lr=0.1)


def _train(module: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        module["3"](module["2"](torch.randn(5, 4))).pow(2).sum().backward()
        opt.step()


def test_layers_are_named_by_global_index() -> None:
    module, _ = _setup(0)
    assert sorted(module.state_dict()) == ["2.bias", "2.weight", "3.bias", "3.weight"]


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    module, opt = _setup(0)
    _train(module, opt, 3)
    ckpt.save(str(tmp_path), 3, ckpt.capture(module, opt, 0), {"note": "x"}, coordinator=True)
    _train(module, opt, 2)  # the reference continues
    after = [p.detach().clone() for p in module.parameters()]

    module2, opt2 = _setup(1)  # other weights and a fresh optimizer
    step, path = ckpt.latest(str(tmp_path)) or (0, "")
    assert step == 3 and ckpt.read_meta(path) == {"note": "x", "step": 3}
    ckpt.restore(module2, opt2, 0, path)
    _train(module2, opt2, 2)  # the RNG draws the same inputs, AdamW has the same moments
    assert all(torch.equal(a, b) for a, b in zip(after, module2.parameters()))


def test_keep_prunes_only_after_the_new_checkpoint_is_complete(tmp_path: Path) -> None:
    module, opt = _setup(0)
    for step in (1, 2, 3):
        ckpt.save(str(tmp_path), step, ckpt.capture(module, opt, 0), {}, coordinator=True, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["step-00000002", "step-00000003"]


_CRASH = textwrap.dedent("""
    import os, signal, sys, torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    sys.path.insert(0, {tests!r})
    from test_train_checkpoint import _setup, _train
    from layerwise.train import checkpoint as ckpt

    root, where = sys.argv[1], sys.argv[2]
    module, opt = _setup(0)
    _train(module, opt, 1)
    ckpt.save(root, 1, ckpt.capture(module, opt, 0), {{}}, coordinator=True)
    torch.save({{k: v.clone() for k, v in module.state_dict().items()}}, os.path.join(root, "expected.pt"))
    _train(module, opt, 1)

    class KilledWhileWriting(FileSystemWriter):
        def write_data(self, plan, planner):
            result = super().write_data(plan, planner)
            result.wait()  # the tensors are on disk, the metadata not yet
            os.kill(os.getpid(), signal.SIGKILL)

    def write(state, path):
        if where == "writing":
            dcp.save(state, storage_writer=KilledWhileWriting(path))
        else:  # everything written, killed before the commit
            dcp.save(state, checkpoint_id=path)
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save(root, 2, ckpt.capture(module, opt, 0), {{}}, coordinator=True, write=write)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["writing", "before-commit"])
def test_kill_9_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path, where: str) -> None:
    script = _CRASH.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), where], env=env,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / ".tmp-step-00000002").is_dir(), "the save was under way"
    assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [1]
    module, opt = _setup(5)
    ckpt.restore(module, opt, 0, str(tmp_path / "step-00000001"))
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert all(torch.equal(expected[k], v) for k, v in module.state_dict().items())
    # the next save clears what the crash left
    ckpt.save(str(tmp_path), 2, ckpt.capture(module, opt, 0), {}, coordinator=True)
    assert not (tmp_path / ".tmp-step-00000002").exists()
    assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [2]
