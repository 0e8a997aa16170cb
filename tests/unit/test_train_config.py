"""layerwise train's settings: defaults, the TOML file, flags over the file, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerwise.cli import main
from layerwise.train.config import TrainConfig, TrainConfigError, build_config


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "train.toml"
    path.write_text(text)
    return str(path)


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'data = "corpus.txt"\nsteps = 50\nbatch-size = 16\nlr = 0.001\nmax_grad_norm = 0.5\n')
    cfg = build_config(path, steps=7, lr=None, out=None)  # None: the flag was not given
    assert (cfg.data, cfg.steps, cfg.batch_size, cfg.lr, cfg.max_grad_norm) == ("corpus.txt", 7, 16, 0.001, 0.5)
    assert cfg.seq_len == TrainConfig(data="x").seq_len  # untouched: the default


def test_the_plan_command_s_keys_are_accepted(tmp_path: Path) -> None:
    text = ('stages = 4\nschedule = "interleaved"\nmicrobatches = 8\nchunks = 2\ndp = 2\ntp = 2\n'
            'batch_size = 32\nactivation_checkpointing = "selective"\nprecision = "bf16"\n')
    cfg = build_config(_toml(tmp_path, text), data="d.txt")
    assert (cfg.stages, cfg.schedule, cfg.microbatches, cfg.chunks, cfg.batch_size) == (4, "interleaved", 8, 2, 32)
    assert (cfg.dp, cfg.tp, cfg.processes, cfg.precision, cfg.activation_checkpointing) == (2, 2, 16, "bf16", "selective")
    assert build_config(_toml(tmp_path, "activation_checkpointing = true\n"), data="d").activation_checkpointing == "full"


@pytest.mark.parametrize("text, words", [
    ("dp = 16\n", ["--batch-size 8", "--dp 16"]),
    ('precision = "fp16"\n', ["--precision", "bf16"]),
    ("stepz = 3\n", ["unknown setting", "stepz"]),
    ('steps = "ten"\n', ["steps", "int"]),
    ("lr = true\n", ["lr", "float"]),
    ("steps = 0\n", ["--steps", ">= 1"]),
    ('schedule = "zigzag"\n', ["--schedule", "1f1b"]),
    ("steps = [\n", ["not valid TOML"]),
])  # fmt: skip
def test_bad_settings_are_named(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(TrainConfigError) as err:
        build_config(_toml(tmp_path, 'data = "d.txt"\n' + text))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_data_is_required() -> None:
    with pytest.raises(TrainConfigError, match="--data"):
        build_config(None)


def test_clipping_off_with_zero() -> None:
    assert TrainConfig(data="d", max_grad_norm=0.0).clip is None
    assert TrainConfig(data="d", max_grad_norm=2.0).clip == 2.0


@pytest.mark.parametrize("argv, words", [
    (["train"], ["--data"]),
    (["train", "--data", "/nonexistent/corpus.txt"], ["no such file"]),
    (["train", "--data", ".", "--model", "/nonexistent/model"], ["--model"]),
    (["train", "--data", ".", "--steps", "0"], ["--steps"]),
    (["train", "--config", "/nonexistent.toml", "--data", "."], ["cannot read the config file"]),
])  # fmt: skip
def test_cli_bad_input_is_one_error_line(argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and all(w in err for w in words), err


def test_a_file_written_by_layerwise_plan_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.toml"
    argv = ["plan", "--model", "gpt", "--devices", "4", "--device-memory", "4", "--device-tflops", "1",
            "--global-batch", "16", "--seq", "64", "--write-config", str(path)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    cfg = build_config(str(path), data="corpus.txt")
    assert cfg.processes == 4 and cfg.batch_size == 16 and cfg.seq_len == 64
