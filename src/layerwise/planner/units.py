"""What the runtime's data parallelism sends, call by call (layerwise.parallel.data).

Every pipeline layer (embedding, block, head) is one FSDP2 unit, or one unit of FSDP2's
``replicate`` for DDP, and each unit is one collective call:

- ZeRO-0 (``data_parallel="ddp"``): one all-reduce of each layer's gradients after the rank's
  last backward (``DataParallel.finish_step``), not overlapped with any compute.
- ZeRO-1/2 (``"fsdp"``, parameters kept gathered for the step): one all-gather per layer at its
  first forward of the step, one reduce-scatter of its gradients after the last backward.
- ZeRO-3 (``"fsdp"`` with ``reshard_after_forward``): each module holding at least :data:`BIG`
  parameters of its own gets a unit of its own (a GPT block: Q/K/V, output projection and the
  two MLP matrices, plus the block for its norms); every microbatch all-gathers every unit in
  its forward and again in its backward, and reduce-scatters its gradients after the backward.

Each call costs the cluster's alpha-beta time (:class:`.cluster.Cluster`): many small units pay
the latency many times, which is what makes ZeRO-3 slow on a high-latency link.
"""

from __future__ import annotations

from collections.abc import Sequence

BIG = 1 << 16  # layerwise.parallel.data._BIG: elements that make a module a ZeRO-3 unit (tested equal)


def layer_units(modules: Sequence[float], *, zero3: bool) -> list[float]:
    """Parameters of each FSDP unit of one layer whose modules hold ``modules`` parameters
    (counted whole, before tensor parallelism, as the runtime counts a DTensor's numel)."""
    total = float(sum(modules))
    if not zero3:
        return [total] if total else []
    big = [float(n) for n in modules if n >= BIG]
    rest = total - sum(big)
    return big + ([rest] if rest else [])


__all__ = ["BIG", "layer_units"]
