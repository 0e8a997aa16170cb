"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under ``DIR/checkpoints/``: one complete checkpoint per ``step-NNNNNNNN/`` folder, holding
DCP's files (each rank writes its own stages' parameters, named by global layer index like
``3.qkv.weight``, their AdamW state, and its RNG states) and ``meta.json`` (step, learning-rate
schedule, data position, settings), written last.

Atomic: every rank writes into ``.tmp-step-NNNNNNNN/``; when all have finished, rank 0 writes
``meta.json``, syncs, and renames the folder into place. A rename within one file system is
atomic, so a crash at any moment (kill -9 included) leaves either the new checkpoint complete
or no trace of it besides a ``.tmp-`` folder that is ignored and later removed. Older
checkpoints are deleted only after the new one is in place (first renamed to ``.trash-``, so a
half-deleted one never looks complete). With several hosts, ``DIR`` must be a shared file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

META = "meta.json"
_NAME = re.compile(r"^step-(\d{8})$")
# Flattened optimizer state: keys "state.<param>.exp_avg" and "param_groups.<param>.lr", one
# per parameter, so that ranks holding different stages never write the same key (DCP keeps
# one copy of a key it sees on several ranks).
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this run."""


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, ".metadata")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest(root: str) -> tuple[int, str] | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: str) -> None:
    """Delete what interrupted saves and deletions left (``.tmp-`` and ``.trash-`` folders)."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# -- what a rank saves ---------------------------------------------------------------------------
def stage_module(stages: dict[int, Any]) -> nn.ModuleDict:
    """This rank's layers under their global layer index ("3" for layer 3), the names
    Pipeline.named_parameters uses; a ModuleDict so DCP's state-dict helpers can map
    optimizer state to those names."""
    layers: dict[str, nn.Module] = {}
    for stage in stages.values():
        for j, layer in enumerate(stage.layers):
            layers[str(stage.first_layer + j)] = layer
    return nn.ModuleDict(dict(sorted(layers.items(), key=lambda kv: int(kv[0]))))


def _rng_state(rank: int) -> dict[str, torch.Tensor]:
    state = {f"rank{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[f"rank{rank}.cuda"] = torch.cuda.get_rng_state()
    return state


def capture(module: nn.Module, optimizer: torch.optim.Optimizer | None, rank: int) -> dict[str, Any]:
    """The tensors of one rank's checkpoint: parameters, optimizer state, RNG states."""
    state: dict[str, Any] = {"model": get_model_state_dict(module, options=_OPTIONS), "rng": _rng_state(rank)}
    if optimizer is not None:
        # On a fresh optimizer this first initializes its state (a step with zero gradients and
        # learning rate 0), so the same call also gives the loader tensors to read into.
        state["optim"] = get_optimizer_state_dict(module, optimizer, options=_OPTIONS)
    return state


def _is_strided(t: Any) -> bool:
    return any(type(p).__name__ == "_StridedShard" for p in getattr(t, "placements", ()))


def dcp_view(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as DCP can save it. A tensor-parallel fused weight (q, k and v each split over
    the tp ranks: a ``_StridedShard`` DTensor) has no chunk layout DCP's planner accepts in torch
    2.13 (it reports overlapping chunks), so each rank stores its local part under its own key
    (``<name>@tp<coordinate>``); the local part shares storage with the parameter, so loading into
    the view loads the parameter. A resume needs the same tp degree (checked with the settings)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = dcp_view(value)
        elif _is_strided(value):
            coord = "-".join(map(str, value.device_mesh.get_coordinate() or ()))
            out[f"{key}@tp{coord}"] = value.to_local()
        else:
            out[key] = value
    return out


def restore(module: nn.Module, optimizer: torch.optim.Optimizer | None, rank: int, path: str) -> None:
    """Read this rank's part of the checkpoint at ``path`` into the module, optimizer and RNG."""
    state = capture(module, optimizer, rank)
    try:
        with _single_process_quiet():
            dcp.load(dcp_view(state), checkpoint_id=path, no_dist=not _distributed())
    except Exception as e:  # DCP wraps a missing key in a CheckpointException with every rank's traceback
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"rank {rank}: cannot read {path}: {first[-1] if first else type(e).__name__} "
            "(was it written for another model or split?)"
        ) from None
    set_model_state_dict(module, state["model"], options=_OPTIONS)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state["optim"], options=_OPTIONS)
    torch.set_rng_state(state["rng"][f"rank{rank}.cpu"])
    if torch.cuda.is_available() and f"rank{rank}.cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"][f"rank{rank}.cuda"])


# -- atomic save ---------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    root: str, step: int, state: dict[str, Any], meta: dict[str, Any], *, coordinator: bool, keep: int = 1,
    write: Callable[[dict[str, Any], str], None] | None = None,
) -> str:  # fmt: skip
    """Write one checkpoint atomically; every rank calls this with its own ``state``.

    ``coordinator`` (rank 0) prepares the folder, writes ``meta``, commits and prunes to the
    newest ``keep`` checkpoints. ``write`` replaces ``dcp.save`` (tests use it to crash mid-save).
    """
    final = os.path.join(root, folder_name(step))
    tmp = os.path.join(root, ".tmp-" + folder_name(step))
    if coordinator:
        os.makedirs(root, exist_ok=True)
        remove_partial(root)
        os.makedirs(tmp)
    _barrier()  # the folder exists before anyone writes into it
    (write or _dcp_save)(state, tmp)
    _barrier()  # every rank's files are written
    if coordinator:
        write_json_atomic(os.path.join(tmp, META), {**meta, "step": step})
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again (a resumed run that saves at once)
            os.rename(final, os.path.join(root, ".trash-" + folder_name(step)))
        os.rename(tmp, final)  # the commit
        _fsync_dir(root)
        for _, old in complete_checkpoints(root)[:-keep]:
            trash = os.path.join(root, ".trash-" + os.path.basename(old))
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        remove_partial(root)
    _barrier()  # nobody moves on (or exits) before the checkpoint is committed
    return final


def _dcp_save(state: dict[str, Any], path: str) -> None:
    with _single_process_quiet():
        dcp.save(dcp_view(state), checkpoint_id=path, no_dist=not _distributed())


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, META)) as f:
        return dict(json.load(f))
