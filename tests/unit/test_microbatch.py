"""Splitting a batch into microbatches along its first dimension."""

from __future__ import annotations

import pytest
import torch

from layerwise.runtime.errors import ConfigError
from layerwise.runtime.microbatch import split_batch


def _check_sizes(parts: list[torch.Tensor], batch: int, m: int) -> None:
    sizes = [p.shape[0] for p in parts]
    assert len(parts) == m and sum(sizes) == batch
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra rows go to the first microbatches


@pytest.mark.parametrize(("batch", "m"), [(10, 3), (7, 7), (8, 4), (13, 5), (5, 1), (9, 2)])
def test_tensor(batch: int, m: int) -> None:
    x = torch.randn(batch, 3, 2)
    parts = split_batch(x, m, "inputs")
    _check_sizes(parts, batch, m)
    assert all(p.shape[1:] == x.shape[1:] for p in parts)
    assert torch.equal(torch.cat(parts), x)


def test_tuple_and_list_keep_their_type_and_pair_rows() -> None:
    x, y = torch.randn(10, 4), torch.randint(0, 9, (10,))
    for batch in ((x, y), [x, y]):
        parts = split_batch(batch, 3, "inputs")
        assert len(parts) == 3 and all(type(p) is type(batch) and len(p) == 2 for p in parts)
        _check_sizes([p[0] for p in parts], 10, 3)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        for px, py in parts:
            assert px.shape[0] == py.shape[0]


def test_dict() -> None:
    batch = {"ids": torch.randint(0, 50, (11, 6)), "mask": torch.rand(11, 6) > 0.5, "w": torch.randn(11)}
    parts = split_batch(batch, 4, "inputs")
    assert len(parts) == 4 and all(list(p) == list(batch) for p in parts)
    for k, v in batch.items():
        _check_sizes([p[k] for p in parts], 11, 4)
        assert torch.equal(torch.cat([p[k] for p in parts]), v)


def test_nested_tuple_in_dict() -> None:
    batch = {"x": (torch.randn(5, 2), torch.randn(5))}
    parts = split_batch(batch, 2, "inputs")
    assert torch.equal(torch.cat([p["x"][0] for p in parts]), batch["x"][0])
    assert torch.equal(torch.cat([p["x"][1] for p in parts]), batch["x"][1])


def test_batch_smaller_than_m_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        split_batch(torch.randn(3, 4), 4, "inputs")
    msg = str(info.value)
    assert "inputs" in msg and "(3, 4)" in msg and "4 microbatches" in msg
    with pytest.raises(ConfigError, match=r"targets\['y'\] with shape \(2,\)"):
        split_batch({"x": torch.randn(5), "y": torch.randn(2)}, 3, "targets")
    with pytest.raises(ConfigError, match="targets"):
        split_batch((torch.randn(5), torch.randn(1)), 2, "targets")


def test_zero_dim_and_unsupported_types_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"shape \(\)"):
        split_batch(torch.tensor(2.5), 1, "inputs")
    with pytest.raises(ConfigError, match="must be a tensor, a tuple or a dict of tensors, got int"):
        split_batch(3, 2, "inputs")
    with pytest.raises(ConfigError, match="got NoneType"):
        split_batch((torch.randn(4), None), 2, "inputs")
