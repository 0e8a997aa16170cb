"""Activation offload to host memory, and FSDP2's offload of parameters, gradients and optimizer state.

``apply_activation_offload(layers)`` runs each layer's forward inside
``torch.autograd.graph.save_on_cpu``: every tensor autograd saves for the backward is copied to
host memory as it is saved and copied back when the backward needs it, so a GPU holds only the
activations of the layer being computed (ZeRO-Offload and ZeRO-Infinity do the same for
activations; Ren et al., 2021). With pinned memory the copies are asynchronous. Tensors that share
a parameter's storage (the weight a matmul saves) stay where they are: the parameter lives on the
device anyway, and copying it for every microbatch would be pure traffic.

On a CPU-only machine the tensors are already in host memory: ``save_on_cpu`` hands them back
unchanged, so the results are identical; it still runs, and :class:`OffloadStats` counts what
went through it.

With activation checkpointing the two compose: a checkpointed layer saves only its inputs, and
``torch.utils.checkpoint`` (non-reentrant, torch 2.13) saves them as ordinary saved tensors,
through these hooks, so offload moves exactly the checkpoint inputs to host memory: the device
then keeps no activations of the layer between its forward and its backward. Everything the
recomputation saves during the backward stays on the device, as it must.

For the parameters, gradients and optimizer state, FSDP2 offloads them itself: pass
:func:`fsdp_cpu_offload` to ``fully_shard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu

from . import _wrap


@dataclass
class OffloadStats:
    """What the offload hooks of some layers saw since they were applied (or last reset)."""

    packed: int = 0  # saved tensors sent to host memory
    packed_bytes: int = 0
    kept: int = 0  # saved tensors left in place: sharing a parameter's storage, or DTensors

    def reset(self) -> None:
        self.packed = self.packed_bytes = self.kept = 0


@dataclass(frozen=True)
class _Spec:
    pin_memory: bool
    stats: OffloadStats


class _SaveOnHost(save_on_cpu):
    """``save_on_cpu`` that leaves parameter storages in place and counts what it moves."""

    def __init__(self, spec: _Spec, device_type: str, keep: set[int]) -> None:
        super().__init__(pin_memory=spec.pin_memory, device_type=device_type)
        to_host, from_host = self.pack_hook, self.unpack_hook
        stats = spec.stats

        def pack(t: torch.Tensor) -> tuple[bool, Any]:
            if not _plain(t) or t.untyped_storage().data_ptr() in keep:
                stats.kept += 1
                return False, t
            stats.packed += 1
            stats.packed_bytes += t.numel() * t.element_size()
            return True, to_host(t)

        def unpack(packed: tuple[bool, Any]) -> torch.Tensor:
            moved, t = packed
            return from_host(t) if moved else t

        self.pack_hook, self.unpack_hook = pack, unpack


def _plain(t: torch.Tensor) -> bool:
    """A tensor with its own storage. Subclasses (a tensor-parallel DTensor, whose storage is its
    shard's) stay where they are: moving one to the host and back would need its sharding too."""
    return type(t) in (torch.Tensor, nn.Parameter)


def _local(p: torch.Tensor) -> torch.Tensor:
    to_local = getattr(p, "to_local", None)  # a DTensor parameter: its shard holds the storage
    return to_local() if callable(to_local) else p


def _run(layer: nn.Module, spec: _Spec, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    keep = {_local(p).untyped_storage().data_ptr() for p in layer.parameters()} - {0}
    # save_on_cpu pins only when this device type is available; with "cpu" it would try to pin
    # without an accelerator and fail, so pinning asks CUDA (no CUDA: a plain host copy)
    with _SaveOnHost(spec, "cuda", keep):
        return call(*args, **kwargs)


_wrap.register("offload", _run)


def apply_activation_offload(
    layers: Sequence[nn.Module], enabled: bool = True, *, pin_memory: bool | None = None
) -> OffloadStats:
    """Offload the activations ``layers`` save for the backward to host memory, in place.

    ``enabled=False`` removes an earlier ``apply_activation_offload``. ``pin_memory`` defaults to whether CUDA
    is available (pinned host memory makes the copies asynchronous). Returns the counters the
    layers' hooks update.
    """
    stats = OffloadStats()
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    for layer in layers:
        _wrap.set_tool(layer, "offload", _Spec(pin, stats) if enabled else None)
    return stats


def fsdp_cpu_offload(enabled: bool = True) -> Any:
    """FSDP2's policy for parameters, gradients and optimizer state: ``CPUOffloadPolicy`` keeps
    the sharded parameters and gradients in host memory (the optimizer step then runs on the CPU,
    so its states live there too) and copies a layer's shard to the device only for its
    all-gather; ``OffloadPolicy()`` is no offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if enabled:
        return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return OffloadPolicy()
