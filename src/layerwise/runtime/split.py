"""Splitting a model into contiguous pipeline stages.

A model is a flat list of layers run one after another, each called as ``layer(x)`` with the
previous layer's output. It can be given as an ``nn.Sequential``, a list of modules, or a
:class:`LayeredModel` with a prologue (an embedding), blocks and an epilogue (final norm, head).
A partition is a plain value (layer counts per stage, ``"uniform"``, or explicit index lists) so
that a balancer can produce it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from .errors import ConfigError


@dataclass(kw_only=True)
class LayeredModel:
    """A model as prologue + blocks + epilogue, e.g. embedding, transformer blocks, norm and head.

    The prologue's and epilogue's modules count as layers like any block, so a balancer can give
    a heavy embedding or head a stage of its own.
    """

    prologue: Sequence[nn.Module] = ()  # run first, e.g. token embedding
    blocks: Sequence[nn.Module] = ()  # the repeated body
    epilogue: Sequence[nn.Module] = ()  # run last, e.g. final norm and LM head
    # For a model built on the meta device: fill layer i's tensors in place (allocate with
    # to_empty, then initialize or load). Each rank calls it for its own layers only.
    materialize: Callable[[int, nn.Module], None] | None = None
    names: list[str] = field(default_factory=list, init=False)

    def layers(self) -> list[nn.Module]:
        return [*self.prologue, *self.blocks, *self.epilogue]


ModelLike = Union[nn.Sequential, Sequence[nn.Module], LayeredModel, nn.Module]
Partition = Union[str, Sequence[int], Sequence[Sequence[int]]]


def as_layers(model: ModelLike) -> list[nn.Module]:
    """The flat list of layers of a model given in any supported form."""
    if isinstance(model, LayeredModel):
        layers = model.layers()
    elif isinstance(model, nn.Sequential):
        layers = list(model)
    elif isinstance(model, (list, tuple, nn.ModuleList)):
        layers = list(model)
    elif hasattr(model, "pipeline_layers"):
        layers = list(getattr(model, "pipeline_layers")())
    else:
        raise ConfigError(
            f"cannot split a {type(model).__name__} into layers: pass an nn.Sequential, a list of "
            "modules, a layerwise.LayeredModel(prologue=..., blocks=..., epilogue=...), or give the "
            "model a pipeline_layers() method that returns its layers in order"
        )
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise ConfigError(f"layer {i} is a {type(layer).__name__}, not an nn.Module")
        if isinstance(layer, nn.modules.loss._Loss):
            raise ConfigError(
                f"layer {i} is a loss ({type(layer).__name__}); the loss runs on the last stage: "
                f"remove it from the layers and pass it as loss_fn=..."
            )
    if not layers:
        raise ConfigError("the model has no layers to split")
    return layers


def resolve_partition(partition: Partition, num_layers: int, num_stages: int) -> list[int]:
    """Turn a partition into layer counts per stage, rejecting anything not contiguous."""
    if num_stages < 1:
        raise ConfigError(f"the number of stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ConfigError(
            f"{num_stages} stages but the model has only {num_layers} layers: every stage needs at "
            f"least one layer. Use at most {num_layers} stages (or fewer pipeline ranks / chunks), "
            "or split the model into finer layers"
        )
    if isinstance(partition, str):
        if partition != "uniform":
            raise ConfigError(f"unknown partition {partition!r}: use 'uniform' or a list of layer counts")
        base, extra = divmod(num_layers, num_stages)
        return [base + (1 if s < extra else 0) for s in range(num_stages)]
    items: list[Any] = list(partition)
    if items and all(isinstance(x, Sequence) and not isinstance(x, str) for x in items):
        return _counts_from_indices([list(x) for x in items], num_layers, num_stages)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise ConfigError(
            f"a partition is 'uniform', a list of layer counts per stage (ints) or a list of layer "
            f"index lists, got {items!r}"
        )
    counts = [int(x) for x in items]
    if len(counts) != num_stages:
        raise ConfigError(f"the partition {counts} has {len(counts)} stages, expected {num_stages}")
    for s, c in enumerate(counts):
        if c < 1:
            raise ConfigError(f"stage {s} of the partition {counts} is empty: every stage needs >= 1 layer")
    if sum(counts) != num_layers:
        raise ConfigError(
            f"the partition {counts} covers {sum(counts)} layers but the model has {num_layers}: "
            "the counts must add up to the number of layers"
        )
    return counts


def _counts_from_indices(groups: list[list[int]], num_layers: int, num_stages: int) -> list[int]:
    if len(groups) != num_stages:
        raise ConfigError(f"the partition has {len(groups)} stages, expected {num_stages}")
    expected = 0
    counts = []
    for s, g in enumerate(groups):
        if not g:
            raise ConfigError(f"stage {s} of the partition is empty: every stage needs >= 1 layer")
        if g != list(range(expected, expected + len(g))):
            raise ConfigError(
                f"stage {s} holds layers {g}, which is not the next contiguous run "
                f"(expected layers {expected}..{expected + len(g) - 1}). A pipeline stage must be a "
                "group of consecutive layers, because each stage's output is the next stage's input; "
                "an assignment such as round-robin would send activations back and forth for every "
                "layer. Give the partition as layer counts per stage, e.g. "
                f"{[len(x) for x in groups]}"
            )
        expected += len(g)
        counts.append(len(g))
    if expected != num_layers:
        raise ConfigError(f"the partition covers {expected} layers but the model has {num_layers}")
    return counts


def stage_bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """``[(first_layer, end_layer), ...]`` per stage."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def tied_parameters(layers: Sequence[nn.Module], bounds: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Stages sharing each parameter that more than one stage uses, e.g. tied embeddings.

    Returns one sorted stage list per shared parameter, in the order the parameters first
    appear, identical on every rank (all ranks build the same model).
    """
    owners: dict[int, list[int]] = {}
    order: list[int] = []
    for s, (a, b) in enumerate(bounds):
        for layer in layers[a:b]:
            for p in layer.parameters():
                key = id(p)
                if key not in owners:
                    owners[key] = []
                    order.append(key)
                if s not in owners[key]:
                    owners[key].append(s)
    return [sorted(owners[k]) for k in order if len(owners[k]) > 1]


TieSlots = tuple[list[int], dict[int, tuple[nn.Module, str]]]


def tie_slots(layers: Sequence[nn.Module], bounds: Sequence[tuple[int, int]]) -> list[TieSlots]:
    """For each parameter used by more than one stage: the stages, and per stage the first
    (module, attribute) slot holding it. Slots survive what replaces a parameter object later
    (meta-device materialization, sharding), which identity alone would not."""
    found: dict[int, tuple[list[int], dict[int, tuple[nn.Module, str]]]] = {}
    for s, (a, b) in enumerate(bounds):
        for layer in layers[a:b]:
            for module in layer.modules():
                for name, p in module._parameters.items():
                    if p is None:
                        continue
                    stages, slots = found.setdefault(id(p), ([], {}))
                    if s not in slots:
                        stages.append(s)
                        slots[s] = (module, name)
    return [(sorted(st), sl) for st, sl in found.values() if len(st) > 1]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor (a sharded or replicated parameter), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def describe_layer(layers: Sequence[nn.Module], index: int) -> str:
    text = repr(layers[index]).splitlines()[0]
    return f"layer {index} ({text[:80]})"


def sample_shapes(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(sample_shapes(o) for o in obj) + ")"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {sample_shapes(v)}" for k, v in obj.items()) + "}"
    return type(obj).__name__
