"""Process-group setup: from torchrun's or our launcher's environment variables."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError


def ensure_initialized(timeout_s: float, backend: str | None = None) -> None:
    """Initialize the default process group if the caller has not, with a bounded timeout.

    The timeout bounds every wait: a rank whose peer hangs fails after it instead of hanging.
    """
    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"no process group and no {', '.join(missing)} in the environment: start the script with "
            "`torchrun --nproc-per-node N script.py`, or call layerwise.launch(fn, nprocs=N), "
            "or initialize torch.distributed yourself"
        )
    if backend is None:
        # NCCL for CUDA tensors and gloo for CPU ones: the runtime's small bookkeeping collectives
        # (batch size, loss, gradient norm) use CPU tensors, which a plain "nccl" group rejects
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    # We created the group, so we tear it down. Ranks leave at different moments; one that closes
    # its connections while a peer is still talking to it can make the peer's gloo thread abort
    # (SIGABRT) during interpreter teardown. Meet at a barrier first, then destroy the group.
    atexit.register(shutdown)
    global _owns_group
    _owns_group = True


_owns_group = False  # this module initialized the default group (and tears it down)
_after_barrier: list[Callable[[], None]] = []


def at_shutdown(fn: Callable[[], None]) -> bool:
    """Run ``fn`` at exit once every rank has reached the shutdown barrier (so no peer still
    needs what ``fn`` releases). Only possible when we created the group; returns whether it
    was registered."""
    if _owns_group:
        _after_barrier.append(fn)
    return _owns_group


def shutdown() -> None:
    """Meet the other ranks at a barrier, then destroy the default process group (if any)."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except Exception:  # a peer already failed: nothing left to wait for
        pass
    while _after_barrier:
        try:
            _after_barrier.pop()()
        except Exception:
            pass
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def to_global(group: Any, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def all_gather_rows(rows: torch.Tensor, group: Any, world_size: int) -> list[torch.Tensor]:
    """Every rank's 2-D float tensor of rows (row counts may differ), padded to gather in one call."""
    count = torch.tensor([rows.shape[0]], dtype=torch.int64)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    width = max(int(c[0]) for c in counts)
    padded = torch.zeros(width, rows.shape[1], dtype=rows.dtype)
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [g[: int(c[0])] for g, c in zip(gathered, counts)]
