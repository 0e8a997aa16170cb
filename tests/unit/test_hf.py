"""layerwise.from_hf in one process: the split layers run one after another compute HF's own loss
and gradients; weights load per layer from safetensors and save back; unsupported forwards are
refused by name. The multi-process pipeline versions are in tests/distributed/test_hf.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import layerwise
from layerwise.models.hf import DecoderBlock
from layerwise.models.hf_weights import Checkpoint, save_hf
from layerwise.parallel.meta import materialize as materialize_owned

from ..hf_tiny import FAMILIES, PADDINGS, VOCAB, batch, reference, tiny

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _run(lm: layerwise.LayeredModel, inputs: Any) -> torch.Tensor:
    x = inputs
    for layer in lm.layers():
        x = layer(x)
    return x


def _grad_diff(lm: layerwise.LayeredModel, ref: torch.nn.Module) -> tuple[float, int]:
    """Largest gradient difference by HF name, and how many HF parameters were compared."""
    ref_params = dict(ref.named_parameters())
    worst, seen = 0.0, set()
    for layer in lm.layers():
        for local, p in layer.named_parameters():
            name = layer.hf_names[local][0]
            if name in seen:
                continue
            seen.add(name)
            worst = max(worst, (p.grad - ref_params[name].grad).abs().max().item())
    assert seen == set(ref_params), "every HF parameter must belong to exactly one layer"
    return worst, len(seen)


# every family with every padding; tied and untied embeddings for Llama, one of them for the others
EQUIVALENCE = [(f, p, f in ("gpt2", "qwen2")) for f in (*FAMILIES, "qwen3") for p in PADDINGS]
EQUIVALENCE += [("llama", p, True) for p in PADDINGS]


@pytest.mark.parametrize("family, padding, tied", EQUIVALENCE, ids=lambda v: {True: "tied", False: "untied"}.get(v, v))
def test_layers_compute_hf_loss_and_gradients(family: str, padding: str, tied: bool) -> None:
    model = tiny(family, tied=tied)
    ref = copy.deepcopy(model)
    lm = layerwise.from_hf(model)
    if tied:
        assert lm.layers()[0].embed_tokens.weight is lm.layers()[-1].lm_head.weight
    inputs, labels = batch(padding, rows=5, seq=12, seed=1)
    ref_loss = reference(ref, inputs, labels)
    loss = layerwise.causal_lm_loss(_run(lm, inputs), labels)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= TOL
    worst, count = _grad_diff(lm, ref)
    assert worst <= TOL and count > 5


def test_blocks_get_the_sliding_window_only_where_the_config_says() -> None:
    lm = layerwise.from_hf(tiny("qwen2", tied=False))
    kinds = [b.sliding for b in lm.blocks]
    assert kinds == [t == "sliding_attention" for t in lm.layers()[0].hf_config.layer_types] == [False, True, True]
    assert all(b.sliding for b in layerwise.from_hf(tiny("mistral", tied=False)).blocks)
    # the window matters on these sequences: without it the loss changes
    model = tiny("mistral", tied=False)
    inputs, labels = batch("right", rows=3, seq=12, seed=2)
    with torch.no_grad():
        windowed = model(**inputs, labels=labels).loss
        model.config.sliding_window = None
        full = model(**inputs, labels=labels).loss
    assert abs(windowed - full) > 1e-3


@pytest.mark.parametrize("padding", ["left", "right"])
def test_token_weighted_targets_give_the_batch_mean_over_any_microbatch_split(padding: str) -> None:
    """The Pipeline weights each microbatch's loss by its rows; with causal_lm_targets the sum is
    HF's mean over the batch's labelled tokens even though rows hold different numbers of them."""
    model = tiny("llama", tied=False)
    lm = layerwise.from_hf(model)
    inputs, labels = batch(padding, rows=7, seq=10, seed=3)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss.item()
        targets = layerwise.causal_lm_targets(labels)
        total, naive = 0.0, 0.0
        for part in torch.tensor_split(torch.arange(7), 3):
            x = {k: v[part] for k, v in inputs.items()}
            logits = _run(lm, x)
            share = len(part) / 7  # the Pipeline's weight for loss_reduction="mean"
            total += share * layerwise.causal_lm_loss(logits, {k: v[part] for k, v in targets.items()}).item()
            naive += share * layerwise.causal_lm_loss(logits, labels[part]).item()
    assert abs(total - ref) <= TOL
    assert abs(naive - ref) > 1e-4, "the rows hold different token counts, so plain labels differ"


def test_block_exposes_the_hf_decoder_layer() -> None:
    model = tiny("llama", tied=False)
    block = layerwise.from_hf(model).blocks[1]
    assert isinstance(block, DecoderBlock) and block.layer is model.model.layers[1]
    assert isinstance(block.layer.self_attn.q_proj, torch.nn.Linear)
    assert not list(block.rotary.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_stage_reads_only_its_own_tensors(tmp_path: Path, family: str, tied: bool) -> None:
    """Each stage's rank materializes its layers the way the Pipeline does (layerwise.parallel.meta)
    and reads exactly its own layers' tensors from the sharded directory, each once."""
    model = tiny(family, tied=tied)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # many shard files
    stored = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    n = len(layerwise.from_hf(tmp_path).layers())
    union: set[str] = set()
    for a, b in [(0, 2), (2, 4), (4, n)]:  # embedding + block 0 | blocks 1-2 | norm + head
        lm = layerwise.from_hf(tmp_path)  # each stage's rank builds its own meta model
        layers = lm.layers()
        assert all(t.is_meta for layer in layers for t in layer.parameters())
        assert isinstance(lm.materialize, Checkpoint)
        shared = {id(p) for i in range(a, b) for p in layers[i].parameters()}  # before: ids change
        materialize_owned(layers, range(a, b), lm.materialize)
        own = {n for i in range(a, b) for names in layers[i].hf_names.values() for n in names if n in stored}
        assert len(lm.materialize.read) == len(set(lm.materialize.read)) == len(own)
        assert set(lm.materialize.read) == own
        assert all(not t.is_meta for i in range(a, b) for t in layers[i].parameters())
        others = [t for i in range(n) if not a <= i < b for t in layers[i].parameters() if id(t) not in shared]
        assert others and all(t.is_meta for t in others)
        union |= own
    assert union == stored
    if tied:  # the last stage filled its head from the embedding's key
        assert "lm_head.weight" in model.state_dict() and "lm_head.weight" not in stored
        assert torch.equal(layers[-1].lm_head.weight, model.get_input_embeddings().weight)
    lm = layerwise.from_hf(tmp_path, attn_implementation="eager")
    materialize_owned(lm.layers(), range(n), lm.materialize)
    lm.materialize.read.clear()
    lm.materialize(1, lm.layers()[1])  # the hook itself: a layer it loaded before reads nothing
    assert lm.materialize.read == []
    inputs, _ = batch("right", rows=3, seq=9, seed=4)
    with torch.no_grad():
        assert torch.equal(_run(lm, inputs), model(**inputs).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_then_from_pretrained_gives_the_same_logits(tmp_path: Path, family: str, tied: bool) -> None:
    lm = layerwise.from_hf(tiny(family, tied=tied, seed=5))
    n = len(lm.layers())
    shards = [[0, 1], list(range(2, n - 1)), [n - 1]]  # the last shard holds only the head
    written = [save_hf(lm, tmp_path / "sharded", shards=shards, shard=k) for k in (2, 1, 0)]  # any order
    assert [len(w) for w in written] == [1, 1, 3]  # shard 0's writer also writes config and index
    save_hf(lm, tmp_path / "single")
    inputs, _ = batch("left", rows=3, seq=9, seed=6)
    with torch.no_grad():
        ours = _run(lm, inputs)
        for sub in ("sharded", "single"):
            loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / sub, attn_implementation="eager").eval()
            assert torch.equal(loaded(**inputs).logits, ours), sub
            if tied:
                assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not tied or "lm_head.weight" not in index
    assert not list((tmp_path / "sharded").glob("*.tmp"))


def test_save_refuses_a_shard_it_does_not_hold(tmp_path: Path) -> None:
    model = tiny("llama", tied=False)
    model.save_pretrained(tmp_path / "src")
    lm = layerwise.from_hf(tmp_path / "src")
    lm.materialize(0, lm.layers()[0])
    shards = [[0], list(range(1, len(lm.layers())))]
    save_hf(lm, tmp_path / "out", shards=shards, shard=0)  # its own layers: fine
    with pytest.raises(layerwise.ConfigError, match="shard 1 holds layers that are not materialized"):
        save_hf(lm, tmp_path / "out", shards=shards, shard=1)
    with pytest.raises(layerwise.ConfigError, match="must hold every layer"):
        save_hf(lm, tmp_path / "out", shards=[[0]], shard=0)


def _meta(config_name: str, model_name: str, **extra: Any) -> torch.nn.Module:
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = getattr(transformers, config_name)(**small, **extra)
    with torch.device("meta"):
        return getattr(transformers, model_name)(cfg)


class _DoubledLogits(transformers.LlamaForCausalLM):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: _meta("Gemma2Config", "Gemma2ForCausalLM", head_dim=8), "final logit soft-capping"),
        (lambda: _meta("CohereConfig", "CohereForCausalLM"), "logit scaling"),
        (lambda: _meta("GPTNeoXConfig", "GPTNeoXForCausalLM"), "parallel residual"),
        # Gemma scales its embeddings inside its embedding module, but its forward is not a copy
        (lambda: _meta("GemmaConfig", "GemmaForCausalLM", head_dim=8), "GemmaModel.forward or GemmaForCausalLM.forward differs"),
    ],
    ids=["gemma2", "cohere", "gpt-neox", "gemma"],
)
def test_unsupported_forward_is_refused_by_name(build: Any, words: str) -> None:
    with pytest.raises(layerwise.ConfigError, match=f"cannot split .*{words}"):
        layerwise.from_hf(build())


def test_a_changed_forward_or_a_base_model_is_refused() -> None:
    with torch.device("meta"):
        model = _DoubledLogits(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4))  # fmt: skip
    with pytest.raises(layerwise.ConfigError, match="_DoubledLogits.forward differs"):
        layerwise.from_hf(model)
    with pytest.raises(layerwise.ConfigError, match="needs a HuggingFace causal LM .* got LlamaModel"):
        layerwise.from_hf(model.model)


def test_bad_inputs_and_directories(tmp_path: Path) -> None:
    lm = layerwise.from_hf(tiny("llama", tied=False))
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(layerwise.ConfigError, match="labels are the targets"):
        lm.layers()[0]({"input_ids": ids, "labels": ids})
    with pytest.raises(layerwise.ConfigError, match="position_ids must have the shape of input_ids"):
        lm.layers()[0]({"input_ids": ids, "position_ids": torch.arange(5)[None]})
    with pytest.raises(layerwise.ConfigError, match="never downloads"):
        layerwise.from_hf(tmp_path / "gpt2")
    tiny("llama", tied=False).config.save_pretrained(tmp_path)
    with pytest.raises(layerwise.ConfigError, match="no model.safetensors"):
        layerwise.from_hf(tmp_path)


def test_from_a_config_builds_random_weights() -> None:
    config = tiny("llama", tied=True).config
    lm = layerwise.from_hf(config)
    assert lm.materialize is None and not any(p.is_meta for layer in lm.layers() for p in layer.parameters())
    assert lm.layers()[0].embed_tokens.weight is lm.layers()[-1].lm_head.weight


def test_blocks_of_a_stage_build_masks_and_rotary_once_per_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the model's forward does once per batch: one mask per kind (Qwen2 here: full and
    sliding) and one rotary (cos, sin), not one per layer; new inputs build new ones."""
    from layerwise.models import hf

    built: list[bool] = []
    real = hf._make_mask
    monkeypatch.setattr(hf, "_make_mask", lambda *a: built.append(a[-1]) or real(*a))
    model = tiny("qwen2", tied=False, layers=4)
    lm = layerwise.from_hf(copy.deepcopy(model))  # its own rotary module, to count its calls
    rotary_calls = []
    lm.blocks[0].rotary.register_forward_hook(lambda *a: rotary_calls.append(1))
    for seed in (1, 2):
        inputs, _ = batch("left", rows=3, seq=8, seed=seed)
        with torch.no_grad():
            assert torch.equal(_run(lm, inputs), model(**inputs).logits)
    assert sorted(built) == [False, False, True, True] and len(rotary_calls) == 2
