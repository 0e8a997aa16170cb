"""Shared by the wire-format tests: random tensors of every dtype the wire carries, and header helpers."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import settings

from layerwise.runtime.wire import Meta, decode_header, encode, flatten

PEER = "rank 1 (stage 1)"
INT64 = (-(2**63), 2**63 - 1)
PROPERTY = settings(max_examples=300, deadline=None)


def rand_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random values of any dtype the wire carries (never all zeros when non-empty)."""
    if dtype == torch.bool:
        t = torch.rand(shape, generator=gen) > 0.5
        if t.numel():
            t.view(-1)[0] = True
        return t
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randint(1, 100, shape, generator=gen).to(dtype)


def header_of(obj: Any) -> list[int]:
    return encode(*flatten(obj))[0].tolist()


def decode_meta(h: list[int] | torch.Tensor) -> Meta:
    return decode_header(torch.as_tensor(h, dtype=torch.int64), PEER)
