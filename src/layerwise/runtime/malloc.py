"""Keep a training process's large buffers on glibc's heap instead of mapping each afresh.

glibc serves an allocation above its mmap threshold (128 KiB at first, adapting up to 32 MiB)
with a fresh ``mmap`` and returns it to the system on ``free``; it also trims the top of the heap
when more than twice that threshold is free. A pipeline rank allocates and frees the same large
activations and gradients every microbatch, so each of them is mapped, page-faulted (the kernel
zeroes every 4 KiB page) and unmapped again, over and over: measured on a 2-stage GPT pipeline,
6 000 page faults per step with 1F1B and 9 000-15 000 with a zero-bubble schedule, whose
deferred weight gradients keep more buffers alive at once. PyTorch's CPU allocator does not cache
(on a GPU its caching allocator does this job), so the ranks set the thresholds instead: no mmap
below 32 MiB, no trimming. Memory freed in a step is reused by the next; the process's resident
size stays at its peak instead of shrinking between steps.

``layerwise.launch`` calls :func:`keep_heap` in every rank it starts; set ``LAYERWISE_KEEP_HEAP=0``
to leave glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX_THRESHOLD = 32 << 20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_heap() -> bool:
    """Set glibc's mmap threshold to 32 MiB and turn off heap trimming in this process.

    Returns True if it took effect (Linux with glibc, and ``LAYERWISE_KEEP_HEAP`` not ``0``)."""
    if os.environ.get("LAYERWISE_KEEP_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    # Setting a threshold also ends glibc's adaptation of it.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
