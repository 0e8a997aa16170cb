"""How many bytes of activations a forward leaves alive for its backward, measured on any device.

A ``TorchDispatchMode`` sees every tensor an op produces during the forward and keeps a weak
reference to its storage. After the forward, the storages still alive are the ones something
holds: autograd's saved tensors, checkpoint's kept inputs, selective checkpointing's cached matmul
outputs, and the forward's own outputs. (Storages, not tensors: a saved view keeps its base alive.)
Parameters and storages the caller still holds can be excluded. This is what activation
checkpointing and offload are meant to shrink, counted exactly, with no allocator statistics, so
it works on the CPU where ``torch.cuda.max_memory_allocated`` has no equivalent.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class ActivationTracker(TorchDispatchMode):
    """Use as ``with ActivationTracker() as t: out = fn(x)``, then ``t.live_bytes(...)``."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: list[tuple[weakref.ref[Any], torch.device]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is torch.Tensor and t.layout == torch.strided:
                s = t.untyped_storage()
                if s.nbytes():
                    self._seen.append((weakref.ref(s), t.device))
        return out

    def live_bytes(self, exclude: Iterable[torch.Tensor] = (), device: str | None = None) -> int:
        """Bytes of the storages produced under the tracker that are still alive, each counted
        once, leaving out the storages of ``exclude`` (parameters, the output you still hold)
        and, with ``device``, storages on other device types (host copies of offloaded ones)."""
        skip = {t.untyped_storage().data_ptr() for t in exclude}
        live: dict[int, int] = {}
        for ref, dev in self._seen:
            s = ref()
            if s is None or (device is not None and dev.type != device):
                continue
            ptr = s.data_ptr()
            if ptr not in skip:
                live[ptr] = s.nbytes()
        return sum(live.values())
