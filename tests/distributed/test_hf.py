"""HuggingFace models split by layerwise.from_hf train in a real pipeline exactly like HF's own
forward, loss and backward (fp32, 1e-5): GPT-2, Llama, Qwen2 with sliding-window layers and
Mistral, on 2 and 3 stages, with left and right padding and packed position ids, tied and untied
embeddings; models read from a directory read only their own layers' tensors on each rank.

Processes start once per stage count; every rank runs every case next to HF in-process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import layerwise

from ..hf_tiny import FAMILIES, PADDINGS, batch, tiny
from .workers_hf import MICROBATCHES, ROWS, SEQ, hf_case_key, hf_equivalence, hf_tensor_parallel

# (family, tied, padding, source, schedule, targets)
CASES = [[f, f in ("gpt2", "qwen2"), p, "model", "1f1b", "weighted"] for f in FAMILIES for p in PADDINGS]
CASES += [["llama", True, "right", "model", "1f1b", "weighted"]]
# packed rows all have seq - 1 labelled tokens, so plain labels are exact too
CASES += [[f, False, "packed", "model", "1f1b", "plain"] for f in ("llama", "mistral")]
# other schedules: zero-bubble splits the backward per layer, interleaved puts 2 stages per rank
CASES += [["llama", True, "left", "model", "zb-h1", "weighted"], ["qwen2", True, "right", "model", "interleaved", "weighted"]]
# weights read per rank from a sharded HF directory (the meta build and its materialize hook)
CASES += [["llama", True, "right", "dir", "1f1b", "weighted"], ["llama", False, "left", "dir", "1f1b", "weighted"],
          ["gpt2", True, "packed", "dir", "1f1b", "weighted"]]  # fmt: skip
TOL = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: Any) -> dict[str, str]:
    out = {}
    for family, tied in {(c[0], c[1]) for c in CASES if c[3] == "dir"} | set(SAVES):
        path = tmp_path_factory.mktemp(f"{family}-{tied}")
        tiny(family, tied=tied).save_pretrained(path, max_shard_size="20KB")
        out[f"{family}/{tied}"] = str(path)
    return out


# trained for 2 SGD steps in the pipeline from a directory, then saved by every rank
SAVES = [("llama", False), ("gpt2", True)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}stages")
def results(request: Any, dirs: dict[str, str], tmp_path_factory: Any) -> tuple[int, list[dict[str, Any]]]:
    saves = [[f, t, str(tmp_path_factory.mktemp(f"saved-{f}-{t}"))] for f, t in SAVES]
    per_rank = layerwise.launch(hf_equivalence, request.param, CASES, dirs, saves, timeout=540)
    for f, t, target in saves:  # where the ranks wrote, for the test that loads it
        per_rank[0][f"saved/{f}/{t}"] = target
    return request.param, per_rank


@pytest.mark.parametrize("case", CASES, ids=hf_case_key)
def test_pipeline_matches_hf(results: tuple[int, list[dict[str, Any]]], dirs: dict[str, str], case: list[Any]) -> None:
    stages, per_rank = results
    rows = [r[hf_case_key(case)] for r in per_rank]
    compared = set().union(*(r["compared"] for r in rows))
    assert compared == set(rows[0]["all_params"]), "every HF parameter must live on some rank"
    for rank, row in enumerate(rows):
        assert row["loss_diff"] <= TOL, f"rank {rank}: loss differs from HF's by {row['loss_diff']}"
        assert row["grad_diff"] <= TOL, f"rank {rank}: gradients differ from HF's by {row['grad_diff']}"
    assert rows[0]["grad_norm"] > 1e-2, "gradients this small would make the comparison vacuous"
    assert all(r["loss"] == rows[0]["loss"] for r in rows), "every rank reports the same loss"
    if case[3] == "dir":
        index = Path(dirs[f"{case[0]}/{case[1]}"]) / "model.safetensors.index.json"
        stored = set(json.loads(index.read_text())["weight_map"])
        reads = [r["reads"] for r in rows]
        for rank, row in enumerate(rows):
            assert len(row["reads"]) == len(set(row["reads"])), f"rank {rank} read a tensor twice"
            assert sorted(row["reads"]) == row["expected_reads"], f"rank {rank} read other layers' tensors"
        assert set().union(*map(set, reads)) == stored
        # each tensor is read by one rank; a tied embedding also by the last rank, for its head
        assert sum(map(len, reads)) == len(stored) + (1 if case[1] else 0)


@pytest.mark.parametrize("family, tied", SAVES, ids=lambda v: {True: "tied", False: "untied"}.get(v, v))
def test_train_save_then_from_pretrained(results: tuple[int, list[dict[str, Any]]], family: str, tied: bool) -> None:
    """Each rank read its layers from a directory, trained 2 SGD steps and wrote its own shard;
    transformers loads the directory with the logits of HF's own model trained the same way."""
    import torch
    import transformers

    stages, per_rank = results
    losses = [r[f"save/{family}/{tied}"] for r in per_rank]
    target = Path(per_rank[0][f"saved/{family}/{tied}"])
    ref = tiny(family, tied=tied)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_losses = []
    for step in range(2):
        inputs, labels = batch("right", ROWS, SEQ, seed=100 + step)
        opt.zero_grad()
        ref_losses.append(ref(**inputs, labels=labels).loss)
        ref_losses[-1].backward()
        opt.step()
    assert all(abs(a - b.item()) <= TOL for a, b in zip(losses[0], ref_losses)) and MICROBATCHES > 1
    assert all(r == losses[0] for r in losses)
    files = sorted(p.name for p in target.iterdir())
    shards = [f"model-{k:05d}-of-{stages:05d}.safetensors" for k in range(1, stages + 1)]
    assert files == sorted(["config.json", "model.safetensors.index.json", *shards])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").eval()
    inputs, _ = batch("left", 3, SEQ, seed=9)
    with torch.no_grad():
        diff = (loaded(**inputs).logits - ref(**inputs).logits).abs().max().item()
        moved = (loaded(**inputs).logits - tiny(family, tied=tied)(**inputs).logits).abs().max().item()
    assert diff <= TOL and moved > 1e-3, (diff, moved)


def test_tensor_parallel_blocks(tmp_path: Path) -> None:
    """parallel.tensor finds the HF decoder layer under each block (.layer) and shards its
    projections; with sequence parallelism each block rebuilds its mask and rotary embeddings
    for the whole sequence from the position ids while its hidden state is a sequence chunk.
    save_hf gathers the shards: transformers loads whole weights with HF's own logits."""
    import torch
    import transformers

    cases = [["llama", False], ["qwen2", True]]
    per_rank = layerwise.launch(hf_tensor_parallel, 2, cases, str(tmp_path), timeout=300)
    for rank, result in enumerate(per_rank):
        for key, row in result.items():
            assert row["sharded"] >= 7 * 3, f"rank {rank} {key}: the decoder layers' projections must be sharded"
            assert row["loss_diff"] <= TOL and row["grad_diff"] <= TOL, f"rank {rank} {key}: {row}"
    for family, _ in cases:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family, attn_implementation="eager").eval()
        inputs, _ = batch("right", 3, SEQ, seed=9)
        with torch.no_grad():
            assert torch.allclose(loaded(**inputs).logits, tiny(family, tied=False)(**inputs).logits, rtol=0, atol=TOL)
