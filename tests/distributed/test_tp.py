"""Tensor and sequence parallelism (tp=2, and dp=2 x tp=2 with FSDP2) train exactly like one
process (fp32, 1e-5).

Processes start once per world size (2, then 4); each rank runs every case and trains the
unsharded model from the same seed in-process, so only differences travel back.
"""

from __future__ import annotations

from typing import Any

import pytest

import layerwise

from .tp_workers import STEPS, case_key, tp_dp_equivalence, tp_equivalence

# (model, sequence_parallel, vocab_parallel_loss, split into two stages at this layer)
CASES = [
    ["gpt", False, False, None],
    ["gpt", True, False, None],
    ["gpt", False, True, None],
    ["gpt", True, True, None],
    ["gpt", True, False, 2],  # the tied embedding and head on different stages
    ["llama", False, False, None],
    ["llama", True, False, None],
    ["llama", True, False, 1],  # the sequence is cut where the replicated prologue's stage ends
    ["qwen2", True, False, None],
    ["mistral", False, False, None],
]
TOL = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return layerwise.launch(tp_equivalence, 2, CASES, timeout=360)


@pytest.mark.parametrize("case", CASES, ids=case_key)
def test_matches_single_process(results: list[dict[str, Any]], case: list[Any]) -> None:
    kind, sp, vp, split = case
    for rank, row in enumerate(r[case_key(case)] for r in results):
        assert row["keys_same"] and row["names_same"], f"rank {rank}: parameter names changed"
        assert row["init_diff"] == 0.0, f"rank {rank}: full_tensor() of a sharded parameter differs from it"
        assert row["loss_diff"] <= TOL, f"rank {rank}: loss differs by {row['loss_diff']}"
        assert row["grad_diff"][0] <= TOL, f"rank {rank}: gradients differ by {row['grad_diff']}"
        assert row["param_diff"][0] <= TOL, f"rank {rank}: parameters after {STEPS} AdamW steps differ by {row['param_diff']}"
        assert row["grad_placements_ok"] is True, f"rank {rank}: {row['grad_placements_ok']}"
        assert len(set(row["losses"])) == STEPS, "the steps should see different losses"
        # every matmul weight is really split: 4 per GPT block (+ fc.bias) and the embedding, 7 per HF layer
        assert len(row["sharded"]) >= {"gpt": 16, "llama": 14, "qwen2": 14, "mistral": 14}[kind], row["sharded"]
        kinds = {t for t, _ in row["boundaries"]}
        assert kinds == {"Tensor"}, f"a layer boundary carried {kinds}, not a plain tensor"
        seq = [shape[1] for _, shape in row["boundaries"]]  # the last step's sequence length is 8
        if kind == "gpt":
            assert row["qkv_local"] == [48, 32], "each rank holds q, k and v of its 2 of 4 heads"
            assert seq == ([4] * 4 if sp else [8] * 4) + [8], "embedding and blocks give chunks with sequence parallelism"
            assert row["boundaries"][-1][1][-1] == (24 if vp else 48), "whole logits, or the vocab shard for the parallel loss"
            if split is None:
                assert row["tied"], "the head and token embedding must stay one Parameter"
            else:
                head_pl, head_shape, tok_pl, tok_shape = row["tied_layout"]
                assert (head_pl, head_shape) == (tok_pl, tok_shape), "tied copies must be sharded alike"
        else:  # replicated prologue, then each decoder layer, the last one gathering for the epilogue
            assert seq == ([8, 4, 8, 8] if sp else [8] * 4)
    assert all(r[case_key(case)]["losses"] == results[0][case_key(case)]["losses"] for r in results)


def test_errors(results: list[dict[str, Any]]) -> None:
    errors = results[0]["errors"]
    assert errors["heads"].startswith("tensor parallelism: layer 1 (Block) has heads=3, not divisible by tp=2")
    assert "Embedding) has vocab=49" in errors["vocab"]
    assert "num_key_value_heads=1, not divisible by tp=2" in errors["kv_heads"]
    assert "sequence length divisible by 2, got 7" in errors["odd_sequence"]
    assert "vocab_parallel_loss needs a last layer" in errors["vocab_loss_without_head"]
    assert all("\n" not in e for e in errors.values()), "errors are one line"


def test_vocab_parallel_cross_entropy(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        assert r["vocab_loss"]["loss_diff"] <= TOL and r["vocab_loss"]["grad_diff"] <= TOL, f"rank {rank}: {r['vocab_loss']}"


def test_dp2_tp2_fsdp_matches_single_process() -> None:
    """2-D: FSDP2 over dp on top of tp; the fused qkv weight sharded by FSDP on dim 1 (see
    fsdp_shard_placement), so full_tensor() and checkpoints stay right."""
    per_rank = layerwise.launch(tp_dp_equivalence, 4, [False, True], timeout=360)
    for sp in (False, True):
        rows = [r[f"sp={sp}"] for r in per_rank]
        for rank, row in enumerate(rows):
            assert row["names_same"], f"rank {rank}: parameter names changed"
            assert row["init_diff"] == 0.0, f"rank {rank}: full_tensor() differs from the unsharded parameter"
            assert row["qkv_placements"] == ["(Shard(dim=1), _StridedShard(dim=0, sf=3))", "(Shard(dim=0), Replicate())"]
            assert row["loss_diff"] <= TOL, f"rank {rank} sp={sp}: loss differs by {row['loss_diff']}"
            assert row["grad_diff"][0] <= TOL, f"rank {rank} sp={sp}: gradients differ by {row['grad_diff']}"
            assert row["param_diff"][0] <= TOL, f"rank {rank} sp={sp}: parameters differ by {row['param_diff']}"
        assert len(set(rows[0]["losses"])) == STEPS
        assert all(r["losses"] == rows[0]["losses"] for r in rows)
