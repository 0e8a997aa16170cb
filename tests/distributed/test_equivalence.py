"""Every schedule, on 2 and 4 stages, trains exactly like the unsplit model (fp32, 1e-5).

Processes start once per stage count; each rank runs every case and also trains the unsplit
reference in-process from the same seed, so only differences travel back.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import layerwise

from .workers import MICROBATCHES, SCHEDULES, equivalence

MODELS = ("mlp", "gpt")
CASES = [[*c, None] for c in itertools.product(MODELS, SCHEDULES, MICROBATCHES)]
# dicts (with an integer entry) and a skip connection cross every stage boundary
CASES += [["skip", s, 3, None] for s in SCHEDULES]
# gradient clipping needs the norm over all stages; 0.05 is below the norm, so it clips
CASES += [["gpt", s, 3, 0.05] for s in SCHEDULES]
TOL = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"{p}stages")
def results(request: Any) -> tuple[int, list[dict[str, Any]]]:
    stages = request.param
    return stages, layerwise.launch(equivalence, stages, CASES, timeout=540)


def _key(case: list[Any]) -> str:
    return "/".join(map(str, case[:3] + ([f"clip{case[3]}"] if case[3] else [])))


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_matches_single_process(results: tuple[int, list[dict[str, Any]]], case: list[Any]) -> None:
    stages, per_rank = results
    key = _key(case)
    rows = [r[key] for r in per_rank]
    compared = set().union(*(r["compared"] for r in rows))
    assert compared == set(rows[0]["all_params"]), "every parameter must live on some rank"
    for rank, row in enumerate(rows):
        assert row["loss_diff"] <= TOL, f"rank {rank}: loss differs by {row['loss_diff']}"
        assert row["grad_diff"] <= TOL, f"rank {rank}: gradients differ by {row['grad_diff']}"
        assert row["param_diff"] <= TOL, f"rank {rank}: parameters differ by {row['param_diff']}"
    if case[3]:
        assert min(rows[0]["norms"]) > case[3], "the clip threshold must be below the norm to test clipping"
    losses = rows[0]["losses"]
    assert len(set(losses)) == len(losses), "the three steps should see different losses"
    assert all(r["losses"] == losses for r in rows), "every rank reports the same loss"
