"""Build only this rank's part of a model that was constructed on the meta device.

``with torch.device("meta"): model = GPT(cfg)`` allocates nothing. Each rank then materializes
only the layers it holds, one at a time, so its peak memory is its share plus one layer, never the
whole model. The values equal those of the same model built eagerly after the same
``torch.manual_seed``, so training still equals one process:

- A model that knows how to initialize one layer by itself provides ``materialize_layer(i, layer)``
  (a method, or ``LayeredModel(materialize=...)``): it allocates layer ``i`` (``to_empty``) and fills
  it, e.g. from a per-layer seed (layerwise's GPT) or from a checkpoint file (``from_hf``). Only the
  rank's own layers are touched.
- Otherwise the default initialization is replayed: every layer, in order, is allocated as a
  scratch copy and each of its modules' ``reset_parameters()`` runs, drawing from torch's global
  generator exactly as the eager constructor did; the rank keeps the copies of its own layers and
  drops the others at once. This is exact for models whose constructor initializes each module
  through ``reset_parameters`` in definition order (plain ``nn.Sequential`` stacks of torch layers);
  a parameter or buffer that no ``reset_parameters`` covers is refused, since replay would leave it
  uninitialized. It costs the whole model's initialization time on every rank, not its memory.

Parameters shared between layers (tied embeddings) keep the value of the first layer holding them,
as the eager ``head.weight = embed.weight`` assignment does, and stay one parameter on a rank
holding several of their layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..runtime.errors import ConfigError

Materialize = Callable[[int, nn.Module], None]


def is_meta(layers: Sequence[nn.Module]) -> bool:
    """Whether any layer still has tensors on the meta device."""
    return any(t.is_meta for layer in layers for t in (*layer.parameters(), *layer.buffers()))


def materializer(model: Any) -> Materialize | None:
    """The model's own per-layer materialization, if it has one."""
    hook = getattr(model, "materialize", None)  # LayeredModel field
    if hook is None:
        hook = getattr(model, "materialize_layer", None)
    return hook if callable(hook) else None


def materialize(layers: Sequence[nn.Module], owned: Sequence[int], hook: Materialize | None = None) -> None:
    """Materialize ``layers[i]`` for each ``i`` in ``owned`` on the CPU, in place.

    The other layers stay on the meta device (they cost nothing). Afterwards, tied parameters are
    one object again among the owned layers, with the value of the first layer that holds them.
    """
    owned_set = set(owned)
    first_holder: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            first_holder.setdefault(id(p), i)
    # (module, attribute name, meta parameter id) for every parameter slot of the owned layers
    slots = [(m, n, id(p)) for i in sorted(owned_set) for m in layers[i].modules() for n, p in m._parameters.items() if p is not None]
    # values of tied parameters whose first holder is not owned here: filled from that layer
    foreign = {pid for _, _, pid in slots if first_holder[pid] not in owned_set}
    values: dict[int, torch.Tensor] = {}
    if hook is None:
        _replay(layers, owned_set, first_holder, foreign, values)
    else:
        meta_ids = {i: _param_ids(layers[i]) for i in owned_set}
        for i in sorted(owned_set):
            hook(i, layers[i])
            _record(layers[i], meta_ids[i], first_holder, i, values)
        for k in sorted({first_holder[pid] for pid in foreign}):
            scratch = copy.deepcopy(layers[k])
            hook(k, scratch)
            _record(scratch, _param_ids(layers[k]), first_holder, k, values, only=foreign)
    _retie(slots, values)
    for i in owned_set:
        left = [n for n, t in (*layers[i].named_parameters(), *layers[i].named_buffers()) if t.is_meta]
        if left:
            raise ConfigError(f"layer {i} still has meta tensors after materialization: {', '.join(left[:4])}")


def _param_ids(layer: nn.Module) -> list[tuple[str, int]]:
    """(qualified name, id) of each parameter slot, recorded before materialization changes ids."""
    return [(f"{mn}.{n}" if mn else n, id(p)) for mn, m in layer.named_modules() for n, p in m._parameters.items() if p is not None]


def _record(
    layer: nn.Module, ids: list[tuple[str, int]], first_holder: dict[int, int], index: int,
    values: dict[int, torch.Tensor], only: set[int] | None = None,
) -> None:
    """Keep the materialized value of each parameter whose first holder is layer ``index``."""
    tensors = {f"{mn}.{n}" if mn else n: p for mn, m in layer.named_modules() for n, p in m._parameters.items() if p is not None}
    for name, pid in ids:
        if first_holder[pid] == index and (only is None or pid in only) and pid not in values:
            values[pid] = tensors[name].detach()


def _replay(
    layers: Sequence[nn.Module], owned: set[int], first_holder: dict[int, int], foreign: set[int],
    values: dict[int, torch.Tensor],
) -> None:
    """Default initialization, replayed layer by layer in construction order (see the module doc)."""
    for i, layer in enumerate(layers):
        ids = _param_ids(layer)
        _check_replayable(i, layer)
        scratch = copy.deepcopy(layer)  # meta: free; its tensors are this layer's own
        scratch.to_empty(device="cpu")
        with torch.no_grad():
            for m in scratch.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        if i in owned:
            _record(scratch, ids, first_holder, i, values)
            bufs = dict(scratch.named_buffers())
            for name, b in list(layer.named_buffers()):
                mod_name, _, attr = name.rpartition(".")
                owner = layer.get_submodule(mod_name) if mod_name else layer
                owner._buffers[attr] = bufs[name]
        elif any(first_holder[pid] == i and pid in foreign for _, pid in ids):
            _record(scratch, ids, first_holder, i, values, only=foreign)
        del scratch


def _check_replayable(i: int, layer: nn.Module) -> None:
    for mn, m in layer.named_modules():
        direct = [n for n, t in (*m._parameters.items(), *m._buffers.items()) if t is not None]
        if direct and not callable(getattr(m, "reset_parameters", None)):
            name = f"{mn}.{direct[0]}" if mn else direct[0]
            raise ConfigError(
                f"layer {i} ({type(layer).__name__}) is on the meta device and its tensor {name!r} has no "
                f"reset_parameters() to initialize it: give the model a materialize_layer(index, layer) "
                f"method (or LayeredModel(materialize=...)) that fills one layer, or build the model eagerly"
            )


def _retie(slots: list[tuple[nn.Module, str, int]], values: dict[int, torch.Tensor]) -> None:
    """Put one Parameter per original parameter back into every slot that held it."""
    made: dict[int, nn.Parameter] = {}
    for module, name, pid in slots:
        if pid not in made:
            current = module._parameters[name]
            value = values.get(pid)
            if value is None:
                raise ConfigError(f"no value for parameter {name!r} of {type(module).__name__} after materialization")
            requires_grad = bool(current.requires_grad) if current is not None else True
            made[pid] = nn.Parameter(value, requires_grad=requires_grad)
        module._parameters[name] = made[pid]
