"""Which HuggingFace causal LMs :func:`layerwise.from_hf` can split, and why it refuses the rest.

The adapter re-runs, stage by stage, what the model's own ``forward`` runs between its layers:
embeddings, position ids, the causal or sliding-window mask, the rotary embeddings, the final norm
and the head. That is only correct when the model's forward is one of the forwards the adapter
reproduces. Instead of trusting a list of model names, the check compares the model's base-model
forward and its causal-LM forward, as syntax trees (docstring, decorators and type annotations
removed, the class-name prefix replaced), with those of the four reference families in the
installed transformers: GPT-2, Llama, Qwen2 and Mistral. Models generated from them by
transformers' modular converter (Qwen3, OLMo-2, GLM, ...) have the identical forward and pass;
a forward that scales the embeddings (Gemma), soft-caps or scales the logits (Gemma 2, Cohere)
or does anything else between the layers does not, and is refused with what differs.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..runtime.errors import ConfigError

# family -> (base model class, causal-LM class) in transformers, the forwards the adapter reproduces
REFERENCES = {
    "gpt2": ("GPT2Model", "GPT2LMHeadModel"),
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Model", "Qwen2ForCausalLM"),
    "mistral": ("MistralModel", "MistralForCausalLM"),
}

# Config attributes that change what happens between the layers (or to the logits), with the name
# an error gives them. Checked first, so a refusal says what is unsupported, not only that the
# source differs.
# A value in the third entry (or None) means the feature is off.
_CONFIG_FEATURES: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    ("final_logit_softcapping", "final logit soft-capping", ()),
    ("logits_scaling", "logit scaling", (1, 1.0)),
    ("logit_scale", "logit scaling", (1, 1.0)),
    ("embedding_multiplier", "embedding scaling (embedding_multiplier)", (1, 1.0)),
    ("scale_embedding", "embedding scaling (scale_embedding)", (False,)),
    ("use_parallel_residual", "parallel residual", (False,)),
    ("parallel_attn", "parallel residual", (False,)),
    ("add_cross_attention", "cross-attention", (False,)),
    ("is_encoder_decoder", "an encoder-decoder layout", (False,)),
)
# Words in a forward's source that name what it does beyond the reference forwards.
_SOURCE_FEATURES = (
    ("normalizer", "embedding scaling (the embeddings are multiplied by a normalizer)"),
    ("embed_scale", "embedding scaling (embed_scale)"),
    ("softcap", "logit soft-capping"),
    ("logit_scale", "logit scaling"),
    ("logits_scaling", "logit scaling"),
    ("embedding_multiplier", "embedding scaling (embedding_multiplier)"),
)


@dataclass(frozen=True)
class Layout:
    """Where a supported model keeps its pieces, and which family's forward it runs."""

    family: str  # "gpt2", "llama", "qwen2" or "mistral"
    base: nn.Module  # the base model (model.model / model.transformer)
    base_prefix: str  # its attribute name in the causal LM, e.g. "model"


def check_supported(model: nn.Module) -> Layout:
    """The layout of ``model`` or a :class:`ConfigError` that names what the adapter cannot do."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if config is None or not isinstance(base, nn.Module) or base is model:
        raise ConfigError(
            f"layerwise.from_hf needs a HuggingFace causal LM (a *ForCausalLM or GPT2LMHeadModel, "
            f"e.g. AutoModelForCausalLM.from_config(config)), got {cls}"
        )
    for attr, what, off in _CONFIG_FEATURES:
        value = getattr(config, attr, None)
        # compare with type: True == 1, but parallel_attn=True is on while logit_scale=1 is off
        if value is not None and not any(type(value) is type(o) and value == o for o in off):
            raise ConfigError(_refusal(cls, f"unsupported {what} (config.{attr}={value!r})"))
    try:
        base_tree = _forward_tree(type(base))
        head_tree = _forward_tree(type(model))
    except (OSError, TypeError, SyntaxError) as e:  # source not available (compiled, REPL)
        raise ConfigError(_refusal(cls, f"its forward's source cannot be read to check what it does ({e})")) from None
    for family, (base_name, head_name) in REFERENCES.items():
        ref_base, ref_head = _reference_trees(family)
        if base_tree == ref_base and head_tree == ref_head:
            return Layout(family=family, base=base, base_prefix=prefix)
    for source, owner in ((_source(type(base)), type(base).__name__), (_source(type(model)), cls)):
        for word, what in _SOURCE_FEATURES:
            if word in source:
                raise ConfigError(_refusal(cls, f"unsupported {what} in {owner}.forward"))
    raise ConfigError(
        _refusal(
            cls,
            f"{type(base).__name__}.forward or {cls}.forward differs from the GPT-2, Llama, Qwen2 and "
            "Mistral forwards in what it does between the layers",
        )
    )


def _refusal(cls: str, what: str) -> str:
    return (
        f"layerwise.from_hf cannot split {cls}: {what}, which the per-stage adapter does not "
        "reproduce (the split model would compute a different loss). Supported: causal LMs whose "
        "forward is GPT-2's, Llama's, Qwen2's or Mistral's (or a copy of one)"
    )


def _source(cls: type) -> str:
    try:
        return textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))
    except (OSError, TypeError):
        return ""


def _forward_tree(cls: type) -> str:
    """``cls.forward`` as a normalized syntax tree: no docstring, decorators or annotations, and
    the class-name prefix (``Qwen3`` in ``Qwen3Model``) replaced, so generated copies compare equal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))).body[0]
    if not isinstance(tree, ast.FunctionDef):
        raise TypeError(f"{cls.__name__}.forward is not a plain function")
    tree.decorator_list = []
    tree.returns = None
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        tree.body = body[1:]
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant(None)
    name = cls.__name__
    for suffix in ("ForCausalLM", "LMHeadModel", "Model"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return ast.dump(tree).replace(name[: -len(suffix)], "<prefix>")
    return ast.dump(tree)


@functools.cache
def _reference_trees(family: str) -> tuple[str, str]:
    import transformers

    base_name, head_name = REFERENCES[family]
    return _forward_tree(getattr(transformers, base_name)), _forward_tree(getattr(transformers, head_name))


def attn_mask_kinds(layout: Layout, config: Any, num_layers: int) -> list[str]:
    """Per decoder layer, "full" or "sliding": the mask the family's forward gives that layer."""
    if layout.family == "qwen2":  # per layer, from config.layer_types
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
        return ["sliding" if t == "sliding_attention" else "full" for t in types[:num_layers]]
    if layout.family == "mistral":  # every layer, when a window is set
        return ["sliding" if getattr(config, "sliding_window", None) is not None else "full"] * num_layers
    return ["full"] * num_layers
