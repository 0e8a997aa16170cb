"""Every schedule, on 2 and 4 stages, trains exactly like the unsplit model (fp32, 1e-5).

Processes start once per stage count; each rank runs every case and also trains the unsplit
reference in-process from the same seed, so only differences travel back.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import layerwise

from .workers import MICROBATCHES, SCHEDULES, case_key, equivalence

MODELS = ("mlp", "gpt")
# (model, schedule, microbatches, clip, transport); "auto" is shared memory on one host
CASES = [[*c, None, "auto"] for c in itertools.product(MODELS, SCHEDULES, MICROBATCHES)]
# dicts (with an integer entry) and a skip connection cross every stage boundary
CASES += [["skip", s, 3, None, "auto"] for s in SCHEDULES]
# gradient clipping needs the norm over all stages; 0.05 is below the norm, so it clips
CASES += [["gpt", s, 3, 0.05, "auto"] for s in SCHEDULES]
# ZB-H2 and ZB-V (two stages per rank in a V: rank 0 holds the first and the last stage)
ZERO_BUBBLE = ("zb-h2", "zbv")
CASES += [[k, s, m, None, "auto"] for k in MODELS for s in ZERO_BUBBLE for m in MICROBATCHES]
CASES += [["skip", s, 3, None, "auto"] for s in ZERO_BUBBLE]
# the process group alone, and shared memory whose every payload falls back to the process group
CASES += [["gpt", s, 8, None, t] for s in SCHEDULES for t in ("dist", "inline")]
TRANSPORTS = {"auto": "ShmTransport", "inline": "ShmTransport", "dist": "DistTransport"}
TOL = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"{p}stages")
def results(request: Any) -> tuple[int, list[dict[str, Any]]]:
    stages = request.param
    return stages, layerwise.launch(equivalence, stages, CASES, timeout=540)


@pytest.mark.parametrize("case", CASES, ids=case_key)
def test_matches_single_process(results: tuple[int, list[dict[str, Any]]], case: list[Any]) -> None:
    stages, per_rank = results
    rows = [r[case_key(case)] for r in per_rank]
    assert all(r["transport"] == TRANSPORTS[case[4]] for r in rows)
    compared = set().union(*(r["compared"] for r in rows))
    assert compared == set(rows[0]["all_params"]), "every parameter must live on some rank"
    for rank, row in enumerate(rows):
        assert row["loss_diff"] <= TOL, f"rank {rank}: loss differs by {row['loss_diff']}"
        assert row["eval_diff"] <= TOL, f"rank {rank}: evaluate()'s loss differs by {row['eval_diff']}"
        assert row["grad_diff"] <= TOL, f"rank {rank}: gradients differ by {row['grad_diff']}"
        assert row["param_diff"] <= TOL, f"rank {rank}: parameters differ by {row['param_diff']}"
    if case[3]:
        assert min(rows[0]["norms"]) > case[3], "the clip threshold must be below the norm to test clipping"
    if case[0] == "mlp":  # no tied weights: one process accumulating the same microbatches in the
        # same order gives the same bits, whatever the schedule
        assert all(r["bitwise"] for r in rows), "gradients or loss not bit-identical to microbatch accumulation"
    losses = rows[0]["losses"]
    assert len(set(losses)) == len(losses), "the three steps should see different losses"
    assert all(r["losses"] == losses for r in rows), "every rank reports the same loss"
