"""Functions the launched ranks run for the `layerwise train` tests (module level, for spawn)."""

from __future__ import annotations

import json
import os
import random
import signal
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from layerwise.train import checkpoint as ckpt
from layerwise.train.loop import train_rank

TINY_GPT = {"model_type": "layerwise-gpt", "vocab": 260, "context": 32, "width": 32, "heads": 2, "blocks": 3}


def write_inputs(folder: str) -> dict[str, str]:
    """A small text file and a tiny GPT config in ``folder``; returns their paths."""
    rng = random.Random(0)
    words = "the a pipeline stage layer trains on text and saves its state then resumes".split()
    text = os.path.join(folder, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)))
    model = os.path.join(folder, "tiny-gpt.json")
    with open(model, "w") as f:
        json.dump(TINY_GPT, f)
    return {"data": text, "model": model}


def settings(folder: str, out: str, **extra: Any) -> dict[str, Any]:
    paths = write_inputs(folder) if not os.path.exists(os.path.join(folder, "corpus.txt")) else {
        "data": os.path.join(folder, "corpus.txt"), "model": os.path.join(folder, "tiny-gpt.json")}
    return {**paths, "out": os.path.join(folder, out), "steps": 10, "seq_len": 16, "batch_size": 6,
            "microbatches": 3, "stages": 2, "lr": 3e-3, "warmup": 3, "save_every": 5, **extra}


def uninterrupted_then_stopped_and_resumed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Run ``a`` straight through; run ``b`` (the same settings) to its first save, then resume it."""
    full = train_rank(a)
    first = train_rank(b, stop_after=b["save_every"])
    rest = train_rank({**b, "resume": True})
    return {"full": full, "first": first, "rest": rest}


def several(cases: dict[str, list[dict[str, Any]]], exports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """:func:`uninterrupted_then_stopped_and_resumed` for each named pair of settings, then a
    plain run for each of ``exports``."""
    out = {name: uninterrupted_then_stopped_and_resumed(a, b) for name, (a, b) in cases.items()}
    return {**out, **{name: train_rank(cfg) for name, cfg in exports.items()}}


def tiny_llama(folder: str) -> str:
    """A tiny Llama directory in HF format (random weights from a config)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    from tiny_llama import main

    path = os.path.join(folder, "tiny-llama")
    main(path)
    return path


class _KilledWhileWriting(FileSystemWriter):
    def write_data(self, plan: Any, planner: Any) -> Any:
        result = super().write_data(plan, planner)
        result.wait()  # this rank's tensors are on disk; the checkpoint's metadata is not
        os.kill(os.getpid(), signal.SIGKILL)
        return result


def killed_while_saving(cfg: dict[str, Any], kill_at: int) -> dict[str, Any]:
    """Train; rank 1 kills itself with SIGKILL in the middle of the checkpoint at ``kill_at``."""
    original = ckpt._dcp_save

    def save(state: dict[str, Any], path: str) -> None:
        if dist.get_rank() == 1 and path.endswith(ckpt.folder_name(kill_at)):
            dcp.save(state, storage_writer=_KilledWhileWriting(path))
        else:
            original(state, path)

    ckpt._dcp_save = save
    return train_rank(cfg)


def resume(cfg: dict[str, Any]) -> dict[str, Any]:
    return train_rank({**cfg, "resume": True})
