"""Swarm checkpoints: every layer's weights and AdamW state at a committed step, in safetensors.

Written by the trainer at step boundaries (``TrainerOptions(checkpoint_dir=..., checkpoint_every=N)``),
from the states the holders hand over, so that a run whose stage was lost for good (holder and copy
gone together) can resume from the last one on whatever peers are left: ``resume=DIR``. The data
is a function of (seed, step), so a resumed run continues exactly where the checkpoint stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import SwarmError
from .spec import SwarmSpec

STATE, META = "swarm-state.safetensors", "swarm-state.json"
LayerStates = list[tuple[list[torch.Tensor], int]]  # per layer: (weight, exp_avg, exp_avg_sq per param), step


def save(directory: str | os.PathLike[str], spec: SwarmSpec, layers: LayerStates, losses: list[float]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{j}": t.contiguous() for i, (ts, _) in enumerate(layers) for j, t in enumerate(ts)}
    meta = {"spec": spec.to_json(), "step": layers[0][1], "losses": losses, "counts": [len(ts) for ts, _ in layers]}
    # write both under temporary names, then rename: a crash mid-save leaves the previous checkpoint
    save_file(tensors, path / f".{STATE}.tmp")
    (path / f".{META}.tmp").write_text(json.dumps(meta))
    os.replace(path / f".{STATE}.tmp", path / STATE)
    os.replace(path / f".{META}.tmp", path / META)


def load(directory: str | os.PathLike[str], spec: SwarmSpec) -> tuple[LayerStates, list[float]]:
    path = Path(directory)
    try:
        meta: dict[str, Any] = json.loads((path / META).read_text())
        tensors = load_file(path / STATE)
    except (OSError, ValueError) as e:
        raise SwarmError(f"cannot resume from {directory}: {e}") from None
    if SwarmSpec.from_json(meta["spec"]) != spec:
        raise SwarmError(f"the checkpoint in {directory} is of another model or data: {meta['spec']}")
    step = int(meta["step"])
    layers = [([tensors[f"{i}.{j}"] for j in range(n)], step) for i, n in enumerate(meta["counts"])]
    return layers, [float(x) for x in meta["losses"]][:step]


def last_step(directory: str | os.PathLike[str] | None) -> int | None:
    if directory is None:
        return None
    try:
        return int(json.loads((Path(directory) / META).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None
