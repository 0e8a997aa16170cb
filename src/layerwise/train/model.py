"""The model ``--model`` names, its loss, how a packed window becomes inputs and targets, and
how the trained model is written to ``DIR/final/``.

Three kinds of ``--model``: ``gpt`` (the built-in byte-level GPT, sized for the tokenizer and
``--seq-len``), a JSON config file, or a local model directory (``config.json`` + safetensors).
A config or directory whose ``model_type`` is ``layerwise-gpt`` is the built-in GPT, which is
also what ``DIR/final/`` holds after training it, so a finished run can be trained further.
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
    vocab_size: int
    config: dict[str, Any]  # written to DIR/final/config.json
    # the model's own name of every pipeline layer, in order ("embed", "blocks.0", ...)
    layer_names: list[str]
    weights: str | None = None  # a folder to load trained weights from, stage by stage
    ties: dict[str, str] = field(default_factory=dict)  # tied weight -> the name it is saved under

    def inputs_targets(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq_len + 1) tokens -> next-token inputs and targets, each (batch, seq_len)."""
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
    """The model ``spec`` names, with weights from the seed (and a folder to load trained ones from)."""
    weights = None
    if spec == "gpt":
        cfg: dict[str, Any] = {"model_type": GPT_TYPE, "vocab": vocab_size, "context": seq_len, **GPT_DEFAULTS}
    elif os.path.isdir(spec):
        config_path = os.path.join(spec, "config.json")
        if not os.path.isfile(config_path):
            raise ModelError(f"--model {spec}: no config.json in the folder (expected a model directory)")
        cfg = _read_json(config_path)
        weights = spec
    elif os.path.isfile(spec):
        cfg = _read_json(spec)
    else:
        raise ModelError(f"--model {spec}: not 'gpt', a model directory or a config JSON file")
    if cfg.get("model_type") == GPT_TYPE:
        return _gpt(cfg, vocab_size=vocab_size, seq_len=seq_len, seed=seed, weights=weights)
    kind = cfg.get("model_type", "no model_type")
    raise ModelError(
        f"--model {spec}: {kind!r} models are not supported by this version of layerwise train "
        f"(use --model gpt or a {GPT_TYPE} folder)"
    )


def _gpt(cfg: dict[str, Any], *, vocab_size: int, seq_len: int, seed: int, weights: str | None) -> TrainModel:
    known = {f.name for f in fields(GPTConfig)}
    try:
        gcfg = GPTConfig(**{k: v for k, v in cfg.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ModelError(f"--model: bad {GPT_TYPE} config: {e}") from None
    if gcfg.vocab < vocab_size:
        raise ModelError(f"--model: the GPT's vocabulary has {gcfg.vocab} entries but the tokenizer {vocab_size}")
    if gcfg.context < seq_len:
        raise ModelError(f"--seq-len {seq_len} is longer than the GPT's context of {gcfg.context} tokens")
    torch.manual_seed(seed)  # every rank builds the same initial weights
    model = GPT(gcfg)
    names = ["embed", *[f"blocks.{i}" for i in range(gcfg.blocks)], "head"]
    n_params = sum(p.numel() for p in model.parameters())
    return TrainModel(
        model=model, loss_fn=lm_loss, vocab_size=gcfg.vocab, layer_names=names, weights=weights,
        config={"model_type": GPT_TYPE, **asdict(gcfg)},
        ties={"head.lm.weight": "embed.tok.weight"} if gcfg.tie_embeddings else {},
        describe=f"built-in GPT ({gcfg.blocks} blocks, width {gcfg.width}, {n_params / 1e6:.2f}M parameters)",
    )  # fmt: skip


# -- stage-by-stage weights in safetensors ----------------------------------------------------
def full_names(tm: TrainModel, named: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Pipeline names (``<layer index>.<param>``) -> the model's own (``blocks.2.<param>``)."""
    out = {}
    for key, p in named.items():
        index, rest = key.split(".", 1)
        out[f"{tm.layer_names[int(index)]}.{rest}"] = p
    return out


def load_stage_weights(folder: str, params: dict[str, nn.Parameter], ties: dict[str, str]) -> int:
    """Copy this rank's tensors from a safetensors folder (sharded with an index, or one file),
    reading only the tensors it needs. ``ties`` maps a tied weight's name to the name it is
    stored under. Returns how many tensors it read."""
    from safetensors import safe_open

    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map: dict[str, str] = _read_json(index_path)["weight_map"]
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        weight_map = {name: "model.safetensors" for name in params}
    else:
        raise ModelError(f"--model {folder}: no model.safetensors or model.safetensors.index.json")
    by_file: dict[str, list[tuple[str, str]]] = {}  # file -> (our name, stored name)
    seen: set[int] = set()
    for name, p in params.items():
        if id(p) in seen:  # one weight under two names on this rank (tied): read it once
            continue
        seen.add(id(p))
        stored = name if name in weight_map else ties.get(name, name)
        if stored not in weight_map:
            raise ModelError(f"--model {folder}: no tensor {name!r} in its weights")
        by_file.setdefault(weight_map[stored], []).append((name, stored))
    count = 0
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(os.path.join(folder, file), framework="pt") as f:
                for name, stored in names:
                    t = f.get_tensor(stored)
                    if t.shape != params[name].shape:
                        raise ModelError(f"--model {folder}: {stored} has shape {tuple(t.shape)}, "
                                         f"the model's {name} {tuple(params[name].shape)}")
                    params[name].copy_(t)
                    count += 1
    return count


def save_stage_weights(
    folder: str, params: dict[str, nn.Parameter], *, rank: int, world: int, skip: set[str]
) -> dict[str, str]:
    """Write this rank's tensors to its own shard ``model-<rank+1>-of-<world>.safetensors``;
    returns its part of the index's weight map. ``skip``: tied copies, saved under their source."""
    from safetensors.torch import save_file

    file = f"model-{rank + 1:05d}-of-{world:05d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in sorted(params.items()):
        if name in skip or id(p) in seen:
            continue
        seen.add(id(p))
        tensors[name] = p.detach().to("cpu").contiguous()
    save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
    return {name: file for name in tensors}
