"""What ``layerwise train`` does, as one validated object: defaults < TOML file < command-line flags.

The TOML file is flat (``steps = 200``, ``batch_size = 16``), with the same names as the flags
(dashes or underscores). The keys ``layerwise plan --write-config`` writes (stages, schedule,
microbatches, chunks, dp, tp, batch_size, activation_checkpointing, precision) are among them.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..schedule.generators import SCHEDULES
CHOICES = {
    "schedule": SCHEDULES,
    "data_parallel": ("fsdp", "ddp"),
    "precision": ("fp32", "bf16"),
    "activation_checkpointing": ("none", "full", "selective"),
}


class TrainConfigError(ValueError):
    """A setting is missing, has the wrong type, or contradicts another one."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # -- what to train on ------------------------------------------------------------------
    model: str = "gpt"  # "gpt" (built-in), a local HF model directory, or a config JSON file
    data: str = ""  # a text or JSONL file, or a folder of them (required)
    tokenizer: str | None = None  # a local HF tokenizer directory; None: bytes (vocab 257, EOS 256)
    # -- how to split it -------------------------------------------------------------------
    stages: int = 2  # pipeline stages (ranks along the pipeline)
    schedule: str = "1f1b"
    microbatches: int = 4
    chunks: int = 2  # stages per rank with the interleaved schedule
    dp: int = 1  # data-parallel replicas (processes = stages x dp x tp)
    tp: int = 1  # tensor-parallel ranks per stage
    data_parallel: str = "fsdp"  # with dp > 1: "fsdp" (FSDP2, sharded) or "ddp" (replicated)
    precision: str = "fp32"  # or "bf16": bf16 compute, fp32 master weights and reductions
    activation_checkpointing: str = "none"  # "full" or "selective": recompute in the backward
    # -- the optimization ------------------------------------------------------------------
    batch_size: int = 8  # sequences per step
    seq_len: int = 128  # tokens per sequence
    steps: int = 100
    lr: float = 3e-4  # peak learning rate, reached after the warm-up
    warmup: int = 10  # steps of linear warm-up, then a cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices only (not norms, biases)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None or 0: no clipping
    seed: int = 0
    # -- evaluation, checkpoints, output ---------------------------------------------------
    eval_every: int = 0  # evaluate on the held-out split every N steps; 0: only at the end
    eval_fraction: float = 0.05  # share of the packed sequences held out for evaluation
    eval_max_sequences: int = 256  # at most this many held-out sequences
    out: str = "layerwise-train"  # DIR: DIR/checkpoints/, DIR/final/, DIR/metrics.jsonl
    save_every: int = 0  # checkpoint every N steps; 0: only at the end
    keep: int = 1  # complete checkpoints kept; an older one is deleted only once a newer one is complete
    resume: bool = False  # continue from the newest complete checkpoint under out

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if not self.data:
            raise TrainConfigError("no training data: pass --data FILE_OR_FOLDER (text or JSONL), or data = \"...\" in the config file")
        for name in ("stages", "microbatches", "chunks", "batch_size", "seq_len", "steps", "keep", "dp", "tp"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "eval_max_sequences"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise TrainConfigError(f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0 < self.eval_fraction < 1:
            raise TrainConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.batch_size < self.dp:
            raise TrainConfigError(f"--batch-size {self.batch_size} cannot be split over --dp {self.dp} replicas: "
                                   f"use a batch of at least {self.dp}")

    @property
    def clip(self) -> float | None:
        """The gradient-norm bound, or None when clipping is off."""
        return self.max_grad_norm or None

    @property
    def processes(self) -> int:
        return self.stages * self.dp * self.tp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# settings only a config file sets (no flag: the command line stays short)
_FILE_ONLY = {"keep", "min_lr_ratio", "weight_decay", "eval_fraction", "eval_max_sequences"}


def _flag(name: str) -> str:
    """How the user names a setting: its flag, or its key for the settings only a file holds."""
    return name if name in _FILE_ONLY else "--" + name.replace("_", "-")


_NAMES = {f.name for f in fields(TrainConfig)}


def _check_type(name: str, value: Any, declared: Any) -> None:
    """TOML and JSON hand us untyped values: check each against the field's declared type."""
    text = str(declared)
    if value is None:
        if "None" not in text:
            raise TrainConfigError(f"{name} must be set, got nothing")
        return
    if text.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif text.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif text.startswith("bool"):
        ok = isinstance(value, bool)
    else:  # str and str | None
        ok = isinstance(value, str)
    if not ok:
        want = text.split(" ")[0]
        raise TrainConfigError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")


def read_toml(path: str) -> dict[str, Any]:
    """The settings of a flat TOML file, keys normalized to field names (dashes -> underscores)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise TrainConfigError(f"cannot read the config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"{path} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _NAMES:
            raise TrainConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(_NAMES))}")
        if name == "activation_checkpointing" and isinstance(value, bool):  # a plan may write true/false
            value = "full" if value else "none"
        out[name] = value
    return out


def build_config(file: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the TOML ``file``, then every override that is not None (the flags given)."""
    values = read_toml(file) if file else {}
    unknown = set(overrides) - _NAMES
    if unknown:
        raise TrainConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as e:  # pragma: no cover - every field has a default
        raise TrainConfigError(str(e)) from None
