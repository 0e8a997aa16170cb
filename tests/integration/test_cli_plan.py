"""``layerwise plan`` end to end, in a subprocess as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

LLAMA = str(Path(__file__).parents[1] / "fixtures" / "llama-70b.json")
CLUSTER = ["--devices", "64", "--devices-per-node", "8", "--device-memory", "80", "--device-tflops", "989"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerwise", "plan", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def _json(*args: str) -> dict[str, Any]:
    done = _cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_issue_example_recommends_a_strategy_that_fits(tmp_path: Path) -> None:
    config = tmp_path / "plan.toml"
    done = _cli("--hf-config", LLAMA, *CLUSTER, "--global-batch", "512", "--write-config", str(config))
    assert done.returncode == 0, done.stderr
    assert "recommended:" in done.stdout and "Fits:" in done.stdout
    assert "68.98B params" in done.stdout
    data = tomllib.loads(config.read_text())
    assert data["batch_size"] == 512 and data["stages"] * data["dp"] * data["tp"] == 64


def test_json_has_best_and_candidates() -> None:
    out = _json("--hf-config", LLAMA, *CLUSTER, "--global-batch", "512", "--top", "3")
    assert set(out) == {"best", "candidates"} and len(out["candidates"]) == 3
    assert out["best"] == out["candidates"][0] and out["best"]["feasible"] is True
    assert out["best"]["memory_bytes"]["total"] <= 80 * 2**30


def test_a_pinned_strategy_that_does_not_fit() -> None:
    out = _json("--hf-config", LLAMA, *CLUSTER, "--global-batch", "512", "--dp", "64", "--zero-stage", "0",
                "--recompute", "none", "--no-offload", "--microbatch-size", "1")
    best = out["best"]
    assert best["feasible"] is False and (best["dp"], best["tp"], best["pp"]) == (64, 1, 1)
    assert "needs" in best["why"]


def test_shape_flags_the_builtin_gpt_and_device_groups(tmp_path: Path) -> None:
    out = _json("--layers", "128", "--hidden", "25600", "--heads", "160", "--vocab", "51200", "--seq", "2048",
                "--devices", "4096", "--device-memory", "80", "--device-tflops", "312", "--global-batch", "3072")
    assert out["best"]["feasible"] and out["best"]["dp"] * out["best"]["tp"] * out["best"]["pp"] == 4096
    gpt = _json("--model", "gpt", "--devices", "2", "--device-memory", "1", "--device-tflops", "0.05",
                "--global-batch", "8", "--precision", "fp32")
    assert gpt["best"]["params"] > 0
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"devices_per_node": 4, "groups": [
        {"name": "a100", "count": 4, "memory_gib": 80, "tflops": 312},
        {"name": "v100", "count": 4, "memory_gib": 32, "tflops": 125, "efficiency": 0.4}]}))
    out = _json("--layers", "32", "--hidden", "4096", "--heads", "32", "--vocab", "32000", "--seq", "2048",
                "--device-groups", str(groups), "--global-batch", "64")
    assert out["best"]["feasible"]


def test_a_partition_profile_gives_the_model_and_its_measured_speed(tmp_path: Path) -> None:
    # The shape of `layerwise partition --model gpt --json`'s output (only the fields read).
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "model": "gpt(blocks=4, width=64, context=64, vocab=256, heads=4), microbatch 4 x 64 tokens",
        "stages": [{"stage": 0, "time_s": 0.01}, {"stage": 1, "time_s": 0.01}]}))
    out = _json("--model", str(profile), "--devices", "1", "--device-memory", "1", "--global-batch", "16",
                "--precision", "fp32", "--microbatch-size", "4")
    best = out["best"]
    # 4 blocks of width 64 (12h^2 + 13h each), embeddings (256 + 64) x 64, final LayerNorm: tied head.
    assert best["params"] == 4 * (12 * 64 * 64 + 13 * 64) + (256 + 64) * 64 + 2 * 64
    # One device at the profile's speed: a microbatch of 4 rows took 0.01 + 0.01 s, 4 of them.
    # ... plus the optimizer updating every parameter at the default rate
    assert best["step_time_s"] == pytest.approx(4 * 0.02 + best["params"] / 6e10, rel=1e-9)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "8", "--device-memory", "80", "--device-tflops", "312", "--global-batch", "8"], "describe the model"),
        (["--hf-config", "/nonexistent.json", *CLUSTER, "--global-batch", "8"], "cannot read --hf-config"),
        (["--hf-config", LLAMA, "--global-batch", "8"], "describe the cluster"),
        (["--hf-config", LLAMA, *CLUSTER, "--global-batch", "8", "--efficiency", "2"], "--efficiency"),
        (["--hf-config", LLAMA, *CLUSTER, "--global-batch", "8", "--layers", "4"], "drop --layers"),
        (["--hf-config", LLAMA, *CLUSTER, "--global-batch", "8", "--schedule", "1f1b", "--chunks", "2"], "--chunks"),
        (["--hf-config", LLAMA, *CLUSTER], "--global-batch"),
        (["--layers", "2", "--hidden", "10", "--heads", "3", "--vocab", "5", "--seq", "4", *CLUSTER,
          "--global-batch", "8"], "divisible by heads"),
        (["--model", "/nonexistent.json", *CLUSTER, "--global-batch", "8"], "cannot read --model"),
        (["--layers", "2", "--hidden", "16", "--heads", "2", "--vocab", "5", "--seq", "4",
          "--device-groups", "/nonexistent.json", "--global-batch", "8"], "cannot read --device-groups"),
        (["--hf-config", LLAMA, *CLUSTER, "--global-batch", "8", "--device-memory", "-1"], "must be > 0"),
    ],
)
def test_bad_input_is_one_error_line(args: list[str], message: str) -> None:
    done = _cli(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert done.stdout == ""


def test_bad_files_are_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for flag in ("--hf-config", "--model"):
        done = _cli(flag, str(bad), *CLUSTER, "--global-batch", "8")
        assert done.returncode == 2 and done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"groups": [{"count": 2}]}))
    done = _cli("--layers", "2", "--hidden", "16", "--heads", "2", "--vocab", "5", "--seq", "4",
                "--device-groups", str(groups), "--global-batch", "8")
    assert done.returncode == 2 and "needs count, memory_gib and tflops" in done.stderr
