"""Text every machine has: the Python standard library's own source files, as bytes."""

from __future__ import annotations

import os
import sysconfig

import torch


def stdlib_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """The first ``max_bytes`` of the stdlib's ``.py`` files in sorted order (same on every rank)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks: list[bytes] = []
    total = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "site-packages" in folder or "test" in os.path.relpath(folder, root).split(os.sep):
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()
    if not chunks:
        raise RuntimeError(f"no .py files found under {root}: the demo trains on the standard library's source")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def batch(corpus: torch.Tensor, step: int, size: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq + 1`` bytes, the same for a given (seed, step) in every process."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, corpus.numel() - seq - 1, (size,), generator=g)
    windows = torch.stack([corpus[s : s + seq + 1] for s in starts.tolist()])  # (size, seq + 1)
    return windows[:, :-1], windows[:, 1:]
