"""Splitting a batch into microbatches along its first dimension."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError


def split_batch(batch: Any, m: int, what: str) -> list[Any]:
    """Split a tensor / tuple / dict of tensors into ``m`` microbatches.

    Sizes may differ by one when ``m`` does not divide the batch (``torch.tensor_split``); the
    runtime weights each microbatch's loss by its size so the result equals the full batch.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] < m:
            raise ConfigError(f"{what} with shape {tuple(batch.shape)} cannot be split into {m} microbatches")
        return list(torch.tensor_split(batch, m, dim=0))
    if isinstance(batch, (tuple, list)):
        parts = [split_batch(t, m, what) for t in batch]
        if hasattr(batch, "_fields"):  # a namedtuple takes its fields as arguments
            return [type(batch)(*(p[i] for p in parts)) for i in range(m)]
        return [type(batch)(p[i] for p in parts) for i in range(m)]
    if isinstance(batch, dict):
        by_key = {k: split_batch(v, m, f"{what}[{k!r}]") for k, v in batch.items()}
        return [{k: v[i] for k, v in by_key.items()} for i in range(m)]
    raise ConfigError(f"{what} must be a tensor, a tuple or a dict of tensors, got {type(batch).__name__}")


def batch_rows(x: Any) -> int:
    """Rows of a batch: the first dimension of its first tensor."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return batch_rows(x[0])
    if isinstance(x, dict) and x:
        return batch_rows(next(iter(x.values())))
    raise ConfigError(f"cannot tell the batch size of {type(x).__name__}: pass tensors (batch first)")
