"""What a peer offers: a short benchmark of one model block, scaled by the emulated speed."""

from __future__ import annotations

import os
import time

import torch

from ..spec import SwarmSpec, build_layers


def block_seconds(spec: SwarmSpec, budget_s: float = 0.3, max_reps: int = 200) -> float:
    """Fastest forward + backward time of one transformer block on one microbatch, in seconds.

    Repeated for about ``budget_s`` and the minimum kept: on a shared machine other processes
    only ever add time, and a burst of theirs should not make this peer look slow for good.
    """
    block = build_layers(spec)[1]
    x = torch.randn(spec.batch_size // spec.microbatches, spec.seq, spec.width)
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 3 or (time.perf_counter() - start < budget_s and reps < max_reps):
        t0 = time.perf_counter()
        block(x.requires_grad_(True)).sum().backward()
        if reps >= 1:  # the first run warms up the allocator and kernels
            best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def default_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2
    except (ValueError, OSError, AttributeError):
        return float(4 << 30)
