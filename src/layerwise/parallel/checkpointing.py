"""Activation checkpointing per pipeline layer: none, full, every k-th layer, or selective.

Checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost") keeps only a
layer's inputs in the forward and recomputes the layer in the backward. Selective checkpointing
(Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models") keeps
the outputs of the expensive ops (matmuls, attention) and recomputes only the cheap elementwise
ones (norms, activations, softmax-free reshapes), trading a little memory for most of the compute.

Both use ``torch.utils.checkpoint`` with ``use_reentrant=False``: the reentrant variant runs its
own backward inside the outer one and does not work inside pipeline stages, whose backward starts
from a stage's outputs with gradients received from the next stage. Recomputation replays the RNG
state (dropout draws the same mask) and the autocast state of the forward, so the gradients are
the ones of the same computation without checkpointing.

The layer's forward is wrapped in place (see :mod:`._wrap`): parameter names do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..runtime.errors import ConfigError
from . import _wrap

MODES = ("none", "full", "selective")


def _ops(*names: str) -> frozenset[Any]:
    """The default overloads of the aten ops this torch build has (attention kernels vary)."""
    found = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            found.add(packet.default)
    return frozenset(found)


# What selective checkpointing keeps: the outputs of matmuls (nn.Linear reaches the dispatcher as
# mm/addmm, batched matmuls as bmm/baddbmm) and of the fused attention kernels; everything else is
# recomputed. torchtitan's selective "op" policy keeps the same set.
SAVED_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
)  # fmt: skip


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _Replayable:
    """The recompute context of selective checkpointing, usable by more than one backward.

    torch's cached mode hands out each kept output once, then marks it consumed, so a second
    backward through the same layer fails ("Trying to backward an extra time"). The zero-bubble
    split backward does exactly that: I (input gradients) and W (weight gradients) are two
    backward passes over the same layer graph, each recomputing it. This wrapper restores the
    kept outputs before each recomputation. They then live as long as the layer's graph, as the
    activations of an unchecked layer would.
    """

    def __init__(self, cached: Any, storage: dict[Any, Any]) -> None:
        self._cached = cached
        self._storage = storage
        self._kept: dict[Any, Any] | None = None

    def __enter__(self) -> Any:
        # each op's entries: a dict by call index (torch 2.13) or a list popped in order (older)
        if self._kept is None:  # first recomputation: the forward has filled the storage
            self._kept = {op: type(entries)(entries) for op, entries in self._storage.items()}
        else:
            for op, entries in self._kept.items():
                self._storage[op] = type(entries)(entries)
        return self._cached.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._cached.__exit__(*exc)


def _selective_contexts() -> tuple[Any, Any]:
    caching, cached = create_selective_checkpoint_contexts(_policy)
    return caching, _Replayable(cached, caching.storage)


def _run(layer: nn.Module, mode: str, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not torch.is_grad_enabled():  # nothing is saved for backward: nothing to checkpoint
        return call(*args, **kwargs)
    if mode == "selective":
        return checkpoint(call, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
    return checkpoint(call, *args, use_reentrant=False, **kwargs)


_wrap.register("checkpoint", _run)


def apply_ac(
    layers: Sequence[nn.Module], mode: str = "none", *, every: int = 1, indices: Sequence[int] | None = None
) -> None:
    """Checkpoint the activations of ``layers`` in place.

    ``mode``: ``"none"`` (keep every activation; also removes an earlier ``apply_ac``),
    ``"full"`` (keep each checkpointed layer's inputs, recompute the layer in the backward) or
    ``"selective"`` (keep matmul and attention outputs, recompute the rest). ``every``: checkpoint
    only every ``every``-th layer (the ``every``-th, ``2*every``-th, ... counting from 1), the
    others keep their activations. ``indices``: each layer's index in the whole model (default
    0, 1, ...), so that on a pipeline rank "every k-th" counts the model's layers, not the rank's
    (pass the rank's owned layer indices, interleaved chunks included).
    """
    if mode not in MODES:
        raise ConfigError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(
            f"activation checkpointing every={every!r}: pass a whole number >= 1 (1 checkpoints every layer)"
        )
    where = list(range(len(layers))) if indices is None else list(indices)
    if len(where) != len(layers):
        raise ConfigError(f"apply_ac got {len(layers)} layers but {len(where)} indices: pass one index per layer")
    for i, layer in zip(where, layers):
        on = mode != "none" and (i + 1) % every == 0
        _wrap.set_tool(layer, "checkpoint", mode if on else None)


def ac_mode(layer: nn.Module) -> str:
    """The checkpointing mode of one layer: ``"none"``, ``"full"`` or ``"selective"``."""
    return str(_wrap.tools(layer).get("checkpoint", "none"))
