"""HuggingFace causal LMs as pipeline layers: :func:`from_hf`.

PyTorch's pipelining tracer breaks on these models (rotary embeddings, masks built from the input
inside ``forward``), so nothing is traced: the model's own modules are wrapped as

    prologue  Embed        ids -> {"hidden_states", "position_ids", ["attention_mask"]}
    blocks    DecoderBlock one per decoder layer, dict -> dict
    epilogue  FinalNorm    dict -> hidden state;  LMHead  hidden state -> logits

What crosses a stage boundary is the hidden state plus the 2-D padding mask and the position ids,
a few integers per token. Every block rebuilds its causal or sliding-window mask with
transformers' own ``create_causal_mask`` / ``create_sliding_window_causal_mask`` and its rotary
``(cos, sin)`` with the model's rotary module, exactly as the model's forward does once for all
layers; :mod:`.hf_support` checks that the forward is one this reproduces. Only the hidden state
is floating point, so only it carries gradients back.

A padding mask that is absent stays absent (it is not replaced by ones): transformers detects
packed sequences from the position ids only when there is no mask.
"""

from __future__ import annotations

import copy
import inspect
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..runtime.errors import ConfigError
from ..runtime.split import LayeredModel
from .hf_support import Layout, attn_mask_kinds, check_supported

Source = Union[str, "os.PathLike[str]", nn.Module, Any]
_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


class HFLayer(nn.Module):
    """A pipeline layer made of a HuggingFace model's modules.

    ``hf_names`` maps each of this layer's persistent tensors (``named_parameters`` and
    ``named_buffers`` names) to its names in the HuggingFace checkpoint, the canonical one first
    (a tied weight has two: the embedding's and ``lm_head.weight``).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.hf_config = config  # a PretrainedConfig is not a module: a plain attribute
        self.hf_names: dict[str, tuple[str, ...]] = {}


class Embed(HFLayer):
    """Token (and, for GPT-2, learned position) embeddings: the pipeline's first layer."""

    def __init__(self, config: Any, embed_tokens: nn.Module, wpe: nn.Module | None, drop: nn.Module | None) -> None:
        super().__init__(config)
        self.embed_tokens = embed_tokens
        self.wpe = wpe
        self.drop = drop

    def forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        ids, mask, pos = _unpack(inputs)
        hidden = self.embed_tokens(ids)  # (batch, seq, hidden)
        if pos is None:  # the model's default, arange per row (transformers uses (1, seq): same values)
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).contiguous()
        if self.wpe is not None:
            hidden = hidden + self.wpe(pos)
        if self.drop is not None:
            hidden = self.drop(hidden)
        out = {"hidden_states": hidden, "position_ids": pos}
        if mask is not None:
            out["attention_mask"] = mask.to(device=hidden.device, dtype=torch.bool)
        return out


class DecoderBlock(HFLayer):
    """One decoder layer, with the mask and rotary embeddings rebuilt from what crossed over.

    ``layer`` is the model's own decoder layer (tensor-parallel plans find their projections
    under it); ``rotary`` is the model's rotary module (no parameters), or None for GPT-2.
    """

    def __init__(
        self, config: Any, layer: nn.Module, index: int, rotary: nn.Module | None, sliding: bool, shared: _LastInputs
    ) -> None:
        super().__init__(config)
        self.layer = layer
        self.rotary = rotary
        self.index = index
        self.sliding = sliding
        self._shared = shared

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, pos, padding = x["hidden_states"], x["position_ids"], x.get("attention_mask")
        # The mask and the rotary module read only the batch and sequence sizes, dtype and device
        # of this tensor. Take the sizes from the position ids, which always span the whole
        # sequence: with sequence parallelism the hidden state here is this rank's chunk of it.
        probe = hidden.new_empty((pos.shape[0], pos.shape[1], 0))  # (batch, seq, 0): no memory
        kind = ("sliding" if self.sliding else "full", hidden.dtype, hidden.device)
        mask = self._shared.get(kind, (pos, padding), lambda: _make_mask(self.hf_config, probe, padding, pos, self.sliding))
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": pos}
        if self.rotary is not None:
            rotary = self.rotary
            kwargs["position_embeddings"] = self._shared.get(("rotary", hidden.dtype, hidden.device), (pos,),
                                                             lambda: rotary(probe, position_ids=pos))  # fmt: skip
        out = self.layer(hidden, **kwargs)
        if isinstance(out, tuple):  # older layers return (hidden, attn_weights, ...)
            out = out[0]
        return {**x, "hidden_states": out}


class _LastInputs:
    """The masks and rotary ``(cos, sin)`` built for the last inputs seen, shared by the blocks.

    They depend only on the position ids and the padding mask, which every block of a stage
    passes on unchanged (the same tensor objects), so the blocks of a stage build them once per
    microbatch, as the model's forward builds them once per batch, instead of once per layer.
    Entries are keyed by the inputs' identity (held weakly) and replaced by the next inputs.
    Neither carries gradients (the rotary module has no parameters).
    """

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[tuple[Any, ...], Any]] = {}

    def get(self, kind: Any, inputs: tuple[torch.Tensor | None, ...], build: Callable[[], Any]) -> Any:
        entry = self._entries.get(kind)
        if entry is not None and all(_same(r, t) for r, t in zip(entry[0], inputs)):
            return entry[1]
        value = build()
        self._entries[kind] = (tuple(None if t is None else weakref.ref(t) for t in inputs), value)
        return value

    def __deepcopy__(self, memo: dict[int, Any]) -> _LastInputs:
        return _LastInputs()  # a copied block starts with nothing kept


def _same(ref: Any, t: torch.Tensor | None) -> bool:
    return t is None if ref is None else ref() is t


class FinalNorm(HFLayer):
    def __init__(self, config: Any, norm: nn.Module) -> None:
        super().__init__(config)
        self.norm = norm

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.norm(x["hidden_states"])


class LMHead(HFLayer):
    def __init__(self, config: Any, lm_head: nn.Module) -> None:
        super().__init__(config)
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (batch, seq, vocab)


def from_hf(
    source: Source,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LayeredModel:
    """Split a HuggingFace causal LM into pipeline layers.

    ``source`` is a model (``AutoModelForCausalLM.from_config(...)`` or ``from_pretrained``), a
    config (a random-weight model is built from it), or a local directory in HF format
    (``config.json`` + safetensors). A directory is built on the meta device, allocating
    nothing; its ``materialize`` hook reads one layer's tensors from the safetensors files when
    a pipeline rank fills the layers it holds. Nothing is ever downloaded.

    Inputs: a tensor of token ids, or a dict with ``input_ids`` and optional ``attention_mask``
    (2-D padding mask) and ``position_ids`` (batch, seq). Outputs: logits; train with
    :func:`layerwise.causal_lm_loss`. Tied input and output embeddings stay one parameter.

    ``dtype``: the parameters' dtype for a model built here (default: the config's ``dtype``, as
    in transformers, e.g. bf16 for a bf16 checkpoint; pass ``torch.float32`` for fp32 training).
    ``attn_implementation``: "eager", "sdpa", ... (default: transformers' choice). The models'
    dropout is as configured; call ``.eval()`` on the layers for exact comparisons.
    """
    materialize = None
    if isinstance(source, (str, os.PathLike)):
        model, materialize = _from_directory(Path(source), dtype, attn_implementation)
    elif isinstance(source, nn.Module):
        model = source
    elif hasattr(source, "model_type") and hasattr(source, "to_dict"):  # a PretrainedConfig
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(source)  # the caller's config stays as it was
        _prepare_config(config, attn_implementation)
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
    else:
        raise ConfigError(
            f"layerwise.from_hf takes a HuggingFace causal LM, its config or a local directory, got "
            f"{type(source).__name__}"
        )
    layout = check_supported(model)
    lm = _wrap(model, layout, rebuild_rotary=materialize is not None)
    if materialize is not None:
        materialize.bind(lm.layers())
        lm.materialize = materialize
    return lm


def _from_directory(directory: Path, dtype: torch.dtype | None, attn: str | None) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf_weights import Checkpoint

    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"{directory} is not a local HuggingFace model directory (no config.json); layerwise "
            "never downloads: save the model there first (model.save_pretrained(dir))"
        )
    checkpoint = Checkpoint(directory)  # fails early, naming the directory, when no weights are there
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    _prepare_config(config, attn)
    with torch.device("meta"):  # nothing allocated: each rank fills only its own layers
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
    return model, checkpoint


def _prepare_config(config: Any, attn: str | None) -> None:
    config.use_cache = False  # training: no key/value cache
    if attn is not None:
        config._attn_implementation = attn


def _dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    return {} if dtype is None else {"dtype": dtype}


def _wrap(model: nn.Module, layout: Layout, rebuild_rotary: bool) -> LayeredModel:
    config = model.config
    base = layout.base
    if layout.family == "gpt2":
        prologue: nn.Module = Embed(config, base.wte, base.wpe, base.drop)
        layers, norm, rotary = list(base.h), base.ln_f, None
    else:
        prologue = Embed(config, base.embed_tokens, None, None)
        layers, norm, rotary = list(base.layers), base.norm, base.rotary_emb
        if rebuild_rotary or any(b.is_meta for b in rotary.buffers()):
            # inv_freq is computed, not stored in checkpoints: build it for real, on the CPU
            with torch.device("cpu"):
                rotary = type(rotary)(config=config)
    layers = layers[: config.num_hidden_layers]
    kinds = attn_mask_kinds(layout, config, len(layers))
    shared = _LastInputs()
    blocks = [DecoderBlock(config, layer, i, rotary, kinds[i] == "sliding", shared) for i, layer in enumerate(layers)]
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embeddings (lm_head) to split")
    lm = LayeredModel(prologue=[prologue], blocks=blocks, epilogue=[FinalNorm(config, norm), LMHead(config, head)])
    _name_tensors(model, lm.layers())
    return lm


def _name_tensors(model: nn.Module, layers: list[nn.Module]) -> None:
    """Fill each layer's ``hf_names`` from the model's own state dict names."""
    aliases: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():  # persistent tensors, tied ones twice
        aliases.setdefault(id(t), []).append(name)
    for layer in layers:
        assert isinstance(layer, HFLayer)
        for local, t in _tensors(layer):
            if id(t) in aliases:
                layer.hf_names[local] = tuple(aliases[id(t)])


def _tensors(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*layer.named_parameters(), *layer.named_buffers()]


def _unpack(inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(inputs, torch.Tensor):
        ids, mask, pos = inputs, None, None
    elif isinstance(inputs, dict):
        extra = sorted(set(inputs) - set(_INPUT_KEYS))
        if extra:
            hint = " (labels are the targets: pipe.step(inputs, labels))" if "labels" in extra else ""
            raise ConfigError(f"unsupported input keys {extra}: a from_hf model takes {list(_INPUT_KEYS)}{hint}")
        if "input_ids" not in inputs:
            raise ConfigError("the inputs dict needs 'input_ids'")
        ids, mask, pos = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
    else:
        raise ConfigError(f"a from_hf model takes token ids or a dict of them, got {type(inputs).__name__}")
    if ids.dim() != 2 or ids.is_floating_point():
        raise ConfigError(f"input_ids must be integer (batch, seq), got {tuple(ids.shape)} {ids.dtype}")
    for name, t in (("attention_mask", mask), ("position_ids", pos)):
        if t is not None and tuple(t.shape) != tuple(ids.shape):
            raise ConfigError(
                f"{name} must have the shape of input_ids {tuple(ids.shape)} (one row per sequence, "
                f"so that microbatches split it), got {tuple(t.shape)}"
            )
    return ids, mask, pos


def _make_mask(config: Any, hidden: torch.Tensor, padding: torch.Tensor | None, pos: torch.Tensor, sliding: bool) -> Any:
    fn, cache_arg = _mask_functions()[sliding]
    # inputs_embeds is read only for its shape, dtype and device
    return fn(config=config, inputs_embeds=hidden, attention_mask=padding, position_ids=pos, **{cache_arg: None})


_MASKS: dict[bool, tuple[Callable[..., Any], str]] = {}


def _mask_functions() -> dict[bool, tuple[Callable[..., Any], str]]:
    if not _MASKS:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        for sliding, fn in ((False, create_causal_mask), (True, create_sliding_window_causal_mask)):
            # the cache argument was renamed from past_key_values to cache within transformers 5
            params = inspect.signature(fn).parameters
            _MASKS[sliding] = (fn, "cache" if "cache" in params else "past_key_values")
    return _MASKS
