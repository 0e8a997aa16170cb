"""`layerwise train`'s checkpoints, in real 2-stage pipelines: a run stopped after 5 of 10 steps
and resumed draws the same losses at steps 6..10 as a run never stopped, bit for bit; a rank
killed with SIGKILL in the middle of a save leaves the previous checkpoint whole, and a run
resumed from it again matches the uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import layerwise
from layerwise.train import checkpoint as ckpt

from .train_workers import (
    killed_while_saving,
    resume,
    settings,
    several,
    tiny_llama,
    uninterrupted_then_stopped_and_resumed,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def runs(folder: Path) -> dict[str, Any]:
    a, b = settings(str(folder), "full"), settings(str(folder), "stopped")
    return layerwise.launch(uninterrupted_then_stopped_and_resumed, 2, a, b, timeout=300)[0]


def _metric_losses(path: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_resume_after_5_of_10_steps_gives_the_same_losses(runs: dict[str, Any], folder: Path) -> None:
    full = runs["full"]["losses"]
    assert len(full) == 10 and len(set(full)) == 10 and full[-1] < full[0]
    assert runs["first"]["losses"] == full[:5]
    assert runs["rest"]["resumed_from"] == 5
    assert runs["rest"]["losses"] == full[5:], "steps 6..10 after resuming equal the uninterrupted run's"
    assert runs["rest"]["eval_loss"] == runs["full"]["eval_loss"]
    # metrics.jsonl of the resumed run reads like one run: steps 1..10, once each
    assert _metric_losses(folder / "stopped" / "metrics.jsonl") == list(enumerate(full, 1))


def test_checkpoints_hold_every_rank_s_layers_and_the_final_model_is_written(runs: dict[str, Any], folder: Path) -> None:
    root = folder / "full" / "checkpoints"
    assert [s for s, _ in ckpt.complete_checkpoints(str(root))] == [10]  # keep=1: step 5 was pruned
    meta = ckpt.read_meta(str(root / "step-00000010"))
    assert meta["step"] == 10 and meta["data"]["position"] == 60 and meta["partition"] == [3, 2]
    assert sorted(f for f in os.listdir(root / "step-00000010") if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    final = folder / "full" / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())["weight_map"]
    assert "embed.tok.weight" in index and "head.lm.weight" not in index  # tied: saved once
    assert set(index.values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_and_resume_matches(runs: dict[str, Any], folder: Path) -> None:
    cfg = settings(str(folder), "killed", save_every=2)
    with pytest.raises(layerwise.LaunchError, match="killed by signal 9"):
        layerwise.launch(killed_while_saving, 2, cfg, 4, timeout=300, grace=3)
    root = folder / "killed" / "checkpoints"
    assert (root / ".tmp-step-00000004").is_dir(), "the kill came in the middle of the step-4 save"
    assert [s for s, _ in ckpt.complete_checkpoints(str(root))] == [2]
    resumed = layerwise.launch(resume, 2, {**cfg, "save_every": 0}, timeout=300)[0]  # saves only at the end
    assert resumed["resumed_from"] == 2
    assert resumed["losses"] == runs["full"]["losses"][2:]
    assert not (root / ".tmp-step-00000004").exists(), "the next save cleared what the crash left"


def test_resume_with_fsdp_replicas_and_with_tensor_parallel_ranks(folder: Path) -> None:
    """dp 2 x pp 2 (FSDP2) and pp 2 x tp 2, in the same 4 processes: each rank saves its own shards
    of the parameters and AdamW state (DTensors; a fused qkv split per tp rank) and its RNG;
    stopped after 3 of 6 steps and resumed, the losses are the uninterrupted run's. Then a tiny
    Llama trained with tp 2 is saved whole, equal to the same model trained with 4 stages."""
    cases = {name: [settings(str(folder), f"{name}-{run}", steps=6, save_every=3, **extra) for run in ("full", "stopped")]
             for name, extra in (("dp", {"dp": 2}), ("tp", {"tp": 2}))}
    llama = tiny_llama(str(folder))
    exports = {name: settings(str(folder), name, model=llama, steps=4, save_every=0, **extra)
               for name, extra in (("hf-tp", {"tp": 2}), ("hf-pp", {"stages": 4}))}
    results = layerwise.launch(several, 4, cases, exports, timeout=400)[0]
    for name in cases:
        r = results[name]
        full = r["full"]["losses"]
        assert len(set(full)) == 6 and r["first"]["losses"] + r["rest"]["losses"] == full, name
        assert r["rest"]["eval_loss"] == r["full"]["eval_loss"], name
        shards = [f for f in os.listdir(folder / f"{name}-full" / "checkpoints" / "step-00000006") if f.endswith(".distcp")]
        assert len(shards) == 4, "every rank wrote its own part"
    # a HuggingFace model trained with tp 2 is written whole: the same weights as pp only
    from transformers import AutoModelForCausalLM

    assert results["hf-tp"]["losses"] == pytest.approx(results["hf-pp"]["losses"], abs=1e-5)
    tp, pp = (AutoModelForCausalLM.from_pretrained(folder / name / "final").state_dict() for name in ("hf-tp", "hf-pp"))
    assert sorted(tp) == sorted(pp)
    assert max(float((tp[k] - pp[k]).abs().max()) for k in tp) < 1e-5
