"""The model ``--model`` names, its loss, how a packed window becomes inputs and targets, and
how the trained model is written to ``DIR/final/``.

``--model`` is ``gpt`` (the built-in byte-level GPT, sized for the tokenizer and ``--seq-len``),
a config JSON file, or a local model directory (``config.json`` + safetensors). A config whose
``model_type`` is ``layerwise-gpt`` is the built-in GPT (``DIR/final/`` of a GPT run is one, so a
finished run can be trained further); any other is a HuggingFace causal LM, split by
``layerwise.from_hf``. Models are built on the meta device where possible, and each rank fills
only its own layers: from the seed, or from the directory's safetensors (reading only its tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..models.gpt import GPT, GPTConfig, lm_loss
from ..runtime.split import LayeredModel

GPT_TYPE = "layerwise-gpt"
# The built-in GPT's size when --model gpt: small enough to train on a laptop's CPU.
GPT_DEFAULTS = {"width": 128, "heads": 4, "blocks": 4}


class ModelError(ValueError):
    """``--model`` names nothing usable."""


@dataclass(kw_only=True)
class TrainModel:
    """A model ready to be split, and what the training loop needs to know about it."""

    model: Any  # ModelLike: whatever Pipeline accepts
    loss_fn: Callable[[Any, Any], torch.Tensor]
    describe: str  # one line for the progress output
    kind: str  # "gpt" or "hf"
    config: dict[str, Any] = field(default_factory=dict)  # the GPT's config.json
    layer_names: list[str] = field(default_factory=list)  # the GPT's name of each pipeline layer
    ties: dict[str, str] = field(default_factory=dict)  # the GPT's tied weight -> name it is saved under

    def inputs_targets(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq_len + 1) tokens -> inputs and targets of (batch, seq_len).

        The GPT's targets are the next tokens. A HuggingFace model's are its labels, which
        ``causal_lm_loss`` shifts as HF does: the loss is exactly ``model(x, labels=x).loss``.
        """
        if self.kind == "hf":
            x = window[:, :-1]
            return x, x
        return window[:, :-1], window[:, 1:]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise ModelError(f"--model {path}: {e.strerror}") from None
    except ValueError:
        raise ModelError(f"--model {path}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ModelError(f"--model {path}: expected a JSON object")
    return obj


def build(spec: str, *, vocab_size: int, seq_len: int, seed: int) -> TrainModel:
    """The model ``spec`` names, with weights from the seed or from its directory."""
    torch.manual_seed(seed)  # every rank builds the same initial weights
    folder = None
    if spec == "gpt":
        # the vocabulary padded to a multiple of 64 so that tensor parallelism can split the
        # embedding and head evenly (Megatron-LM pads the same way); the extra rows are never targets
        vocab = -(-vocab_size // 64) * 64
        cfg: dict[str, Any] = {"model_type": GPT_TYPE, "vocab": vocab, "context": seq_len, **GPT_DEFAULTS}
    elif os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelError(f"--model {spec}: no config.json in the folder (expected a model directory)")
        cfg = _read_json(os.path.join(spec, "config.json"))
        folder = spec
    elif os.path.isfile(spec):
        cfg = _read_json(spec)
    else:
        raise ModelError(f"--model {spec}: not 'gpt', a model directory or a config JSON file")
    if cfg.get("model_type") == GPT_TYPE:
        return _gpt(cfg, vocab_size=vocab_size, seq_len=seq_len, folder=folder)
    return _hf(spec, cfg, vocab_size=vocab_size, seq_len=seq_len, folder=folder)


def _gpt(cfg: dict[str, Any], *, vocab_size: int, seq_len: int, folder: str | None) -> TrainModel:
    known = {f.name for f in fields(GPTConfig)}
    try:
        gcfg = GPTConfig(**{k: v for k, v in cfg.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ModelError(f"--model: bad {GPT_TYPE} config: {e}") from None
    if gcfg.vocab < vocab_size:
        raise ModelError(f"--model: the GPT's vocabulary has {gcfg.vocab} entries but the tokenizer {vocab_size}")
    if gcfg.context < seq_len:
        raise ModelError(f"--seq-len {seq_len} is longer than the GPT's context of {gcfg.context} tokens")
    with torch.device("meta"):  # each rank materializes only its own layers (GPT.materialize_layer)
        gpt = GPT(gcfg)
    names = ["embed", *[f"blocks.{i}" for i in range(gcfg.blocks)], "head"]
    ties = {"head.lm.weight": "embed.tok.weight"} if gcfg.tie_embeddings else {}
    model: Any = gpt
    if folder is not None:  # trained weights: each rank reads its own layers' tensors
        reader = _SafetensorsLayers(folder, names, ties)
        model = LayeredModel(prologue=[gpt.embed], blocks=list(gpt.blocks), epilogue=[gpt.head], materialize=reader)
    n_params = sum(p.numel() for p in {id(p): p for p in gpt.parameters()}.values())
    return TrainModel(
        model=model, loss_fn=lm_loss, kind="gpt", layer_names=names, ties=ties,
        config={"model_type": GPT_TYPE, **asdict(gcfg)},
        describe=f"built-in GPT ({gcfg.blocks} blocks, width {gcfg.width}, {n_params / 1e6:.2f}M parameters)"
        + (f" from {folder}" if folder else ""),
    )  # fmt: skip


def _hf(spec: str, cfg: dict[str, Any], *, vocab_size: int, seq_len: int, folder: str | None) -> TrainModel:
    import layerwise

    if "model_type" not in cfg:
        raise ModelError(f"--model {spec}: the config has no model_type (use 'gpt' or a HuggingFace config)")
    try:
        if folder is not None:
            lm = layerwise.from_hf(folder)  # meta device; each rank reads its own layers' tensors
        else:
            from transformers import AutoConfig

            rest = {k: v for k, v in cfg.items() if k != "model_type"}
            lm = layerwise.from_hf(AutoConfig.for_model(cfg["model_type"], **rest))  # random weights from the seed
    except layerwise.ConfigError as e:
        raise ModelError(f"--model {spec}: {e}") from None
    except (ValueError, KeyError) as e:
        raise ModelError(f"--model {spec}: transformers cannot build it: {e}") from None
    hf_config = lm.layers()[0].hf_config
    vocab = int(getattr(hf_config, "vocab_size", 0))
    if vocab < vocab_size:
        raise ModelError(f"--model {spec}: its vocabulary has {vocab} entries but the tokenizer {vocab_size} "
                         "(pass its own tokenizer with --tokenizer)")
    longest = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if longest is not None and seq_len > int(longest):
        raise ModelError(f"--seq-len {seq_len} is longer than the model's {longest} positions")
    n_params = sum(p.numel() for p in {id(p): p for layer in lm.layers() for p in layer.parameters()}.values())
    return TrainModel(
        model=lm, loss_fn=layerwise.causal_lm_loss, kind="hf",
        describe=f"{type(hf_config).__name__.removesuffix('Config')} ({len(lm.blocks)} layers, "
        f"{n_params / 1e6:.2f}M parameters) " + (f"from {folder}" if folder else "from a config, random weights"),
    )  # fmt: skip


# -- the built-in GPT's weights in safetensors, one layer at a time --------------------------------
class _SafetensorsLayers:
    """``materialize(i, layer)`` for a GPT saved in ``DIR/final/``: reads layer i's tensors only."""

    def __init__(self, folder: str, names: list[str], ties: dict[str, str]) -> None:
        self.folder, self.names, self.ties = folder, names, ties
        index = os.path.join(folder, INDEX)
        if os.path.isfile(index):
            self.weight_map: dict[str, str] = _read_json(index)["weight_map"]
        else:
            raise ModelError(f"--model {folder}: no {INDEX}")
        self.read: list[str] = []

    def __call__(self, index: int, layer: nn.Module) -> None:
        from safetensors import safe_open

        layer.to_empty(device="cpu")
        with torch.no_grad():
            for local, p in layer.named_parameters():
                name = f"{self.names[index]}.{local}"
                stored = name if name in self.weight_map else self.ties.get(name, name)
                if stored not in self.weight_map:
                    raise ModelError(f"--model {self.folder}: no tensor {name!r} in its weights")
                with safe_open(os.path.join(self.folder, self.weight_map[stored]), framework="pt") as f:
                    t = f.get_tensor(stored)
                if t.shape != p.shape:
                    raise ModelError(f"--model {self.folder}: {stored} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
                p.copy_(t)
                self.read.append(stored)


INDEX = "model.safetensors.index.json"


def save_gpt_shard(folder: str, tm: TrainModel, full: dict[str, torch.Tensor], shard: int, shards: int) -> dict[str, str]:
    """Write this pipeline rank's whole tensors (pipeline names ``<layer>.<param>``) to its shard
    under the GPT's own names; returns its part of the index. Tied copies are saved once, under
    the name of the layer that holds the source."""
    from safetensors.torch import save_file

    file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    for key, t in sorted(full.items()):
        index, local = key.split(".", 1)
        name = f"{tm.layer_names[int(index)]}.{local}"
        if name not in tm.ties:
            tensors[name] = t.detach().to("cpu").contiguous().clone()
    save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
    return {name: file for name in tensors}
