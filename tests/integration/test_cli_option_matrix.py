"""The option matrices of ``layerwise plan`` and ``layerwise train``: every combination of the
parallel degrees, schedule and memory options either runs or is refused with one ``error:`` line
(exit 2) before any process starts. (``demo``, ``simulate`` and ``partition`` are in
test_cli_matrix.py; ``swarm`` in test_swarm.py.)

``plan`` runs for real (pure Python, milliseconds). ``train``'s launch is replaced by a stand-in
that builds, from the settings the command would launch with, what every rank's Pipeline builds
first (the schedule on stages x dp x tp processes, the partition of the model's layers); one real
combined run trains at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from layerwise import cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PLAN_BASE = ["plan", "--layers", "8", "--hidden", "512", "--heads", "8", "--vocab", "1000", "--seq", "256",
             "--devices", "8", "--devices-per-node", "4", "--device-memory", "16", "--device-tflops", "100",
             "--global-batch", "32", "--json"]  # fmt: skip


def _one_error_line(rc: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]


def test_plan_pins_every_combination(capsys: pytest.CaptureFixture[str]) -> None:
    from layerwise.schedule.generators import SCHEDULES  # every schedule the runtime runs

    combos = itertools.product((1, 2, 3), (1, 2), (1, 2, 4), SCHEDULES, (0, 3), ("none", "full"),
                               ("--offload", "--no-offload"))  # fmt: skip
    fits = cannot = 0
    for dp, tp, pp, schedule, zero, recompute, offload in combos:
        argv = [*PLAN_BASE, "--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--schedule", schedule,
                "--zero-stage", str(zero), "--recompute", recompute, offload, "--microbatch-size", "2"]  # fmt: skip
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"{argv}: {err[-2000:]}"
        best = json.loads(out)["best"]
        assert (best["dp"], best["tp"], best["pp"]) == (dp, tp, pp), "a pin is never swapped for another"
        # the 8 devices, the batch over replicas x microbatch size, a pipeline for the pipeline schedules,
        # and ZeRO-3's per-backward reduction, which the runtime refuses with a split backward
        if dp * tp * pp != 8 or 32 % (dp * 2) or (pp == 1 and schedule not in ("1f1b", "gpipe")) \
                or (zero == 3 and dp > 1 and schedule in ("zb-h1", "zb-h2", "zbv")):
            assert best["feasible"] is False and best["why"].startswith("Cannot run"), argv
            cannot += 1
            continue
        pinned = (best["schedule"], best["zero_stage"], best["recompute"], best["offload"], best["microbatch_size"])
        assert pinned == (schedule, zero, recompute, offload == "--offload", 2), argv
        chunks = {"interleaved": best["chunks"] if best["chunks"] >= 2 else -1, "zbv": 2}.get(schedule, 1)
        assert best["chunks"] == chunks, argv  # zbv: its V of 2 chunks
        assert isinstance(best["feasible"], bool) and best["why"]
        fits += 1
    assert fits and cannot


def test_plan_bad_pins_are_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--dp", "0"], ["--tp", "-2"], ["--schedule", "zb-h3"], ["--zero-stage", "4"], ["--recompute", "half"],
                ["--microbatch-size", "x"], ["--schedule", "zbv", "--chunks", "3"], ["--schedule", "zb-h2", "--chunks", "2"]):  # fmt: skip
        _one_error_line(cli.main([*PLAN_BASE, *bad]), capsys.readouterr().err)


@pytest.fixture()
def fake_launch(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each rank of `layerwise train` would build first, without training."""
    import layerwise
    from layerwise.runtime.split import resolve_partition
    from layerwise.schedule.generators import build
    from layerwise.train.config import TrainConfig

    launched: list[dict[str, Any]] = []

    def launch(fn: Any, nprocs: int, cfg: dict[str, Any], **_: Any) -> list[dict[str, Any]]:
        conf = TrainConfig(**cfg)
        assert nprocs == conf.stages * conf.dp * conf.tp
        sch = build(conf.schedule, stages=conf.stages, microbatches=conf.microbatches, chunks=conf.chunks)
        counts = resolve_partition("uniform", 6, sch.num_stages)  # the built-in GPT: 4 blocks + 2
        launched.append({**cfg, "counts": counts})
        return [{"first_loss": 1.0, "final_loss": 0.5, "steps": conf.steps, "resumed_from": None, "tokens_per_s": 1.0,
                 "eval_loss": None, "eval_sequences": 0, "final": "x", "checkpoint": "x"}]  # fmt: skip

    monkeypatch.setattr(layerwise, "launch", launch)
    return launched


def test_train_parallel_options_every_combination(fake_launch: list[dict[str, Any]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    data = tmp_path / "text.txt"
    data.write_text("layerwise " * 2000)
    combos = itertools.product((1, 2, 4), ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv"), (1, 2), (1, 2),
                               ("fsdp", "ddp"), ("fp32", "bf16"), ("none", "selective"))  # fmt: skip
    ran = 0
    for i, (stages, schedule, dp, tp, data_parallel, precision, ac) in enumerate(combos):
        fake_launch.clear()
        argv = ["train", "--data", str(data), "--out", str(tmp_path / f"run{i}"), "--stages", str(stages),
                "--schedule", schedule, "--dp", str(dp), "--tp", str(tp), "--data-parallel", data_parallel,
                "--precision", precision, "--activation-checkpointing", ac, "--steps", "2", "--batch-size", "8",
                "--microbatches", "2", "--seq-len", "16"]  # fmt: skip
        rc = cli.main(argv)
        err = capsys.readouterr().err
        chunks = 2 if schedule in ("interleaved", "zbv") else 1
        if stages * chunks > 6:  # more pipeline stages than the model's layers
            _one_error_line(rc, err)
            assert not fake_launch
            continue
        assert rc == 0, f"{' '.join(argv)}: {err[-2000:]}"
        (run,) = fake_launch
        assert (run["dp"], run["tp"], run["schedule"], run["precision"], run["activation_checkpointing"]) == (
            dp, tp, schedule, precision, ac)  # fmt: skip
        assert len(run["counts"]) == stages * chunks
        ran += 1
    assert ran


def test_train_a_combined_run_for_real(tmp_path: Path) -> None:
    """pp2 x dp2 (FSDP), zero-bubble V schedule, selective checkpointing and bf16 at once."""
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    argv = [sys.executable, "-m", "layerwise", "train", "--data", str(data), "--out", str(tmp_path / "run"),
            "--stages", "2", "--dp", "2", "--schedule", "zbv", "--activation-checkpointing", "selective",
            "--precision", "bf16", "--steps", "4", "--batch-size", "8", "--microbatches", "2", "--seq-len", "32",
            "--json"]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s["steps"] == 4 and s["final_loss"] < s["first_loss"]
