"""Data parallelism over the ``dp`` sub-mesh: FSDP2 (``fully_shard``) or DDP, applied per layer.

Each pipeline layer becomes its own FSDP2 unit (and its own root: a stage calls its layers one
by one, never a parent module).

"ddp" uses FSDP2's replicate (``torch.distributed._composable.replicate_with_fsdp``), the
FSDP2-based DDP that PyTorch's own pipelining supports, rather than ``DistributedDataParallel``:
classic DDP reduces in autograd hooks armed by its own ``forward``, which a pipeline stage that
runs layer by layer, microbatch by microbatch, with a split backward (zero-bubble I / W) bypasses.
Both share FSDP2's explicit post-backward step, so gradients are reduced exactly once per step.

When gradients are reduced:
- ``reshard_after_forward=False`` (the default in a pipeline, as torchtitan chooses for PP):
  parameters are gathered at the first microbatch and stay whole for the step, gradients
  accumulate unsharded over the microbatches, and one reduce-scatter (FSDP) or all-reduce (DDP)
  per step runs in :meth:`DataParallel.finish_step`. Fast; the step holds the stage's whole
  parameters and gradients.
- ``reshard_after_forward=True`` (FSDP only; ZeRO-3 memory): parameters are gathered per layer for
  each microbatch's forward and backward and freed after, and gradients are reduce-scattered after
  every microbatch's backward, so a rank never holds more than its shards plus one layer. It costs
  ``microbatches`` times the communication, and needs a fused backward (no zero-bubble split).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..runtime.errors import ConfigError
from ..runtime.split import local_tensor

MODES = ("fsdp", "ddp")


def shared_params(layers: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Parameters that more than one of these layers holds (a tied embedding and head on one rank)."""
    owner: dict[int, int] = {}
    shared: dict[int, nn.Parameter] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if owner.setdefault(id(p), i) != i:
                shared[id(p)] = p
    return list(shared.values())


def apply_dp(
    layers: Sequence[nn.Module],
    dp_mesh: Any,
    *,
    mode: str = "fsdp",
    reshard_after_forward: bool = False,
    mp_policy: Any = None,
    offload_policy: Any = None,
    shard_placement_fn: Any = None,
) -> tuple[list[Any], list[nn.Parameter]]:
    """Shard (FSDP) or replicate (DDP) each layer over ``dp_mesh``. Returns the FSDP units and the
    parameters left outside them (shared by two of the layers)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mode not in MODES:
        raise ConfigError(f"data_parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "ddp" and reshard_after_forward:
        raise ConfigError("reshard_after_forward shards parameters: it needs data_parallel='fsdp', not 'ddp'")
    kwargs: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    # A parameter belongs to one FSDP unit, and a unit of several layers cannot be a root (FSDP2
    # needs a single root module, and a pipeline stage calls its layers one by one). So a weight
    # shared by two of this rank's layers stays outside FSDP, replicated, and its gradient is
    # averaged over dp by DataParallel.finish_step.
    shared = shared_params(layers)
    kwargs["ignored_params"] = set(shared)
    for layer in layers:
        if mode == "fsdp":  # shard_placement_fn: which dim FSDP cuts (tensor.fsdp_shard_placement)
            fully_shard(layer, reshard_after_forward=reshard_after_forward, shard_placement_fn=shard_placement_fn, **kwargs)
        else:
            from torch.distributed._composable.replicate_with_fsdp import replicate

            replicate(layer, **kwargs)
    return list(layers), shared


class DataParallel:
    """Drives the gradient reduction of a rank's FSDP2 units over one pipeline step."""

    def __init__(self, units: Sequence[Any], shared: Sequence[nn.Parameter], dp_group: Any, *, per_microbatch: bool) -> None:
        self.units = list(units)
        self.shared = list(shared)
        self.dp_group = dp_group
        self.per_microbatch = per_microbatch  # ZeRO-3: FSDP's own hooks reduce after each backward

    def begin_step(self) -> None:
        """Before the step's first forward: accumulate locally, keep parameters gathered."""
        for u in self.units:
            u.set_is_last_backward(self.per_microbatch)
            u.set_requires_gradient_sync(self.per_microbatch)
            u.set_reshard_after_backward(self.per_microbatch)

    def finish_step(self) -> None:
        """After the step's last backward: reduce the accumulated gradients once and reshard.

        FSDP2 would do this in its autograd hooks at the end of a ``loss.backward()`` over the whole
        batch; a pipeline runs many partial backwards (and zero-bubble weight passes outside
        autograd's backward), so it is called explicitly, as PyTorch's pipelining does in
        ``PipelineStage.perform_reduce_grad`` (FSDP2 has no public call for it yet).
        """
        self._average_shared()
        if self.per_microbatch:
            return
        from torch.distributed.fsdp import fully_shard

        for u in self.units:
            u.set_is_last_backward(True)
            u.set_reshard_after_backward(True)
            u.set_requires_gradient_sync(True)
            state = _state_of(u, fully_shard)
            for s in state._state_ctx.all_states:
                for group in s._fsdp_param_groups:
                    group.post_backward()
            state._root_post_backward_final_callback()


    def _average_shared(self) -> None:
        import torch
        import torch.distributed as dist

        for p in self.shared:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = local_tensor(p.grad)  # with tensor parallelism: this rank's shard
            dist.all_reduce(g, group=self.dp_group)
            g.div_(dist.get_world_size(self.dp_group))


def _state_of(unit: Any, fully_shard: Any) -> Any:
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate

    return replicate.state(unit) if isinstance(unit, ReplicateModule) else fully_shard.state(unit)
