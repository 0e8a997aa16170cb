"""What a peer offers: a short benchmark of one model block, scaled by the emulated speed."""

from __future__ import annotations

import os
import time

import torch

from ..spec import SwarmSpec, build_layers


def block_seconds(spec: SwarmSpec, reps: int = 9) -> float:
    """Fastest forward + backward time of one transformer block on one microbatch, in seconds."""
    block = build_layers(spec)[1]
    x = torch.randn(spec.batch_size // spec.microbatches, spec.seq, spec.width)
    times = []
    for _ in range(reps + 2):  # the first runs warm up the allocator and kernels
        t0 = time.perf_counter()
        block(x.requires_grad_(True)).sum().backward()
        times.append(time.perf_counter() - t0)
    # the minimum, not the median: on a shared machine the other processes only ever add time
    return min(times[2:])


def default_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2
    except (ValueError, OSError, AttributeError):
        return float(4 << 30)
