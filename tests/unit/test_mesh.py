"""ParallelDims: degrees checked once, with errors that say what to change; the rank layout."""

from __future__ import annotations

import pytest

from layerwise.parallel.mesh import ParallelDims
from layerwise.runtime.errors import ConfigError


@pytest.mark.parametrize(
    ("dp", "pp", "tp", "world", "expected"),
    [(1, -1, 1, 4, (1, 4, 1)), (2, -1, 1, 4, (2, 2, 1)), (-1, 2, 2, 8, (2, 2, 2)), (2, 2, -1, 8, (2, 2, 2)), (1, 1, 1, 1, (1, 1, 1))],
)
def test_one_degree_is_inferred(dp: int, pp: int, tp: int, world: int, expected: tuple[int, int, int]) -> None:
    assert ParallelDims(dp=dp, pp=pp, tp=tp, world_size=world).shape == expected


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"dp": 2, "pp": 2, "tp": 2, "world_size": 4}, "start 8 processes"),
        ({"dp": 3, "pp": -1, "tp": 1, "world_size": 4}, "does not divide the world size 4"),
        ({"dp": -1, "pp": -1, "tp": 1, "world_size": 4}, "only one of dp, pp, tp may be -1"),
        ({"dp": 0, "pp": 1, "tp": 1, "world_size": 1}, "dp=0"),
        ({"dp": 1, "pp": 1, "tp": -3, "world_size": 1}, "tp=-3"),
    ],
)
def test_bad_degrees_are_one_line_errors(kwargs: dict[str, int], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        ParallelDims(**kwargs)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_tensor_parallel_neighbours_are_consecutive_ranks() -> None:
    dims = ParallelDims(dp=2, pp=2, tp=2, world_size=8)
    # tp innermost (one host under torchrun), then pp, then dp
    assert [dims.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(8))
    assert dims.describe(5) == "rank 5 (pp 0, dp 1, tp 1)"
