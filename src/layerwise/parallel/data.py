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
) -> tuple[list[Any], list[nn.Parameter], Any]:
    """Shard (FSDP) or replicate (DDP) each layer over ``dp_mesh``. Returns the FSDP units, the
    parameters left outside them (shared by two of the layers) and the FSDP state of their root."""
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
            if reshard_after_forward:
                # ZeRO-3: what is gathered at once is one unit's parameters and gradients, so the
                # big matrices get units of their own (a GPT block: 4 units instead of 1; measured
                # on bench/memory.py's model, the step's peak fell by about 3 such matrices).
                for sub in _big_submodules(layer, shared):
                    fully_shard(sub, reshard_after_forward=True, shard_placement_fn=shard_placement_fn, **kwargs)
            fully_shard(layer, reshard_after_forward=reshard_after_forward, shard_placement_fn=shard_placement_fn, **kwargs)
        else:
            _replicate()(layer, **kwargs)
    # One FSDP root over all of this rank's layers, so that they share FSDP's communication state:
    # each layer's reduce-scatter then frees the previous layer's buffers, where separate roots
    # would each keep theirs until the end of the backward (measured: one layer's gradients per
    # layer, +70 MB a block on bench/memory.py's model). The stage never calls the root's forward,
    # so its lazy initialization is run here, and DataParallel plays the root's part at the start
    # and end of each step.
    root = _Root(layers)
    if mode == "fsdp":
        fully_shard(root, reshard_after_forward=reshard_after_forward, **kwargs)
    else:
        _replicate()(root, **kwargs)
    root_state = _state_of(root)
    root_state._lazy_init()
    return list(layers), shared, root_state


_BIG = 1 << 16  # parameter elements that make a submodule worth its own ZeRO-3 unit


def _big_submodules(layer: nn.Module, shared: Sequence[nn.Parameter]) -> list[nn.Module]:
    """Submodules (not the layer) holding a large parameter of their own, innermost first."""
    skip = {id(p) for p in shared}
    out = []
    for name, m in layer.named_modules():
        if not name:
            continue
        own = [p for p in m.parameters(recurse=False) if id(p) not in skip]
        if own and sum(p.numel() for p in own) >= _BIG:
            out.append(m)
    return out[::-1]


class _Root(nn.Module):
    """Holds a rank's layers for FSDP's root state; the stage runs the layers itself."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *args: Any) -> Any:  # never called: the pipeline stage calls each layer
        raise RuntimeError("the pipeline runs this rank's layers one by one, not through their FSDP root")


def _replicate() -> Any:
    from torch.distributed._composable.replicate_with_fsdp import replicate

    return replicate


class DataParallel:
    """Drives the gradient reduction of a rank's FSDP2 units over one pipeline step."""

    def __init__(self, units: Sequence[Any], shared: Sequence[nn.Parameter], root: Any, dp_group: Any, *,
                 per_microbatch: bool) -> None:
        self.units = list(units)
        self.shared = list(shared)
        self.root = root  # the FSDP state over all units (see apply_dp)
        self.dp_group = dp_group
        self.per_microbatch = per_microbatch  # ZeRO-3: FSDP's own hooks reduce after each backward

    def begin_step(self) -> None:
        """Before the step's first forward: what FSDP's root does before an iteration (wait for the
        optimizer step on GPUs), then accumulate locally and keep parameters gathered, or (ZeRO-3)
        reduce-scatter after each layer's backward."""
        self.root._root_pre_forward(self.root._modules[0], (), {})
        for u in self.units:
            u.set_is_last_backward(False)
            u.set_requires_gradient_sync(self.per_microbatch)
            u.set_reshard_after_backward(self.per_microbatch)

    def begin_eval(self) -> None:
        """Before forward-only work: FSDP's root pre-forward (its lazy init on a first call)."""
        self.root._root_pre_forward(self.root._modules[0], (), {})

    def end_eval(self) -> None:
        """After forward-only work: under ``no_grad`` FSDP leaves parameters gathered for a backward
        that will not come, and the root's iteration open (our root module never runs a forward to
        close it). FSDP's own iteration reset shards them again and clears the recorded forward
        order; gradients already reduced into the sharded ``.grad`` are kept."""
        self.root._reset_iter_state()

    def finish_step(self) -> None:
        """After the step's last backward: reduce what is left once, reshard, reset FSDP's state.

        FSDP2 would do this in its autograd hooks at the end of a ``loss.backward()`` over the whole
        batch; a pipeline runs many partial backwards (and zero-bubble weight passes outside
        autograd's backward), so it is called explicitly, as PyTorch's pipelining does in
        ``PipelineStage.perform_reduce_grad`` (FSDP2 has no public call for it yet). With ZeRO-3 only
        the layers whose backward hook could not fire (an embedding: its inputs need no gradient)
        still hold gradients to reduce.
        """
        self._average_shared()
        for u in self.units:
            u.set_is_last_backward(True)
            u.set_reshard_after_backward(True)
            u.set_requires_gradient_sync(True)
        if not self.per_microbatch:
            for s in self.root._state_ctx.all_states:
                for group in s._fsdp_param_groups:
                    group.post_backward()
        # also runs post_backward for any group whose hook did not fire, and resets every state
        self.root._root_post_backward_final_callback()

    def _average_shared(self) -> None:
        import torch
        import torch.distributed as dist

        for p in self.shared:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = local_tensor(p.grad)  # with tensor parallelism: this rank's shard
            dist.all_reduce(g, group=self.dp_group)
            g.div_(dist.get_world_size(self.dp_group))


def _state_of(module: Any) -> Any:
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule
    from torch.distributed.fsdp import fully_shard

    return _replicate().state(module) if isinstance(module, ReplicateModule) else fully_shard.state(module)
