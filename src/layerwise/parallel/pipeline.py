"""``layerwise.Pipeline``: the pipeline runtime on the ``pp`` dimension of a dp x pp x tp mesh.

Parallelism is applied to this rank's layers in small steps, each given only its own sub-mesh
(torchtitan's habit): materialize (meta-device models), tensor parallelism over ``tp``, activation
checkpointing, mixed precision and activation offload per layer, then FSDP2 or DDP over ``dp``.
The pipeline itself runs unchanged on the ``pp`` group; each data-parallel replica runs its own
pipeline on its slice of the batch, and gradients are reduced over ``dp`` once per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.distributed import ensure_initialized
from ..runtime.errors import ConfigError
from ..partition._tree import map_tensors
from ..runtime.pipeline import Pipeline as _PipelineBase
from ..runtime.pipeline import _rows
from ..runtime.split import ModelLike, resolve_partition, stage_bounds
from .mesh import ParallelDims, build_mesh
from .meta import is_meta, materialize, materializer

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("none", "full", "selective")


class Pipeline(_PipelineBase):
    """A model split over ``dp x pp x tp`` processes (``pp`` pipeline stages by default: all of them).

    Every process builds the same model with the same seed, eagerly or on the meta device
    (``with torch.device("meta"): model = ...``: then each rank materializes only its own layers).
    Only this rank's stages are kept, tensor-parallel over ``tp`` ranks and data-parallel over
    ``dp`` replicas. Pass the same global batch to :meth:`step` on every rank: replica ``d`` trains
    on its ``d``-th slice of the rows, and the returned loss is the global batch's.

    Options beyond :class:`layerwise.runtime.Pipeline`'s:

    - ``dp``, ``tp``: degrees (``stages`` is ``pp``; one of the three may be -1, inferred).
    - ``data_parallel``: ``"fsdp"`` (FSDP2, parameters, gradients and optimizer state sharded) or
      ``"ddp"`` (replicated); gradients reduced once per step (see :mod:`layerwise.parallel.data`).
    - ``reshard_after_forward``: FSDP only, ZeRO-3 memory: parameters gathered per layer and
      microbatch, gradients reduce-scattered per microbatch.
    - ``sequence_parallel``: with ``tp``, also split norms and dropout along the sequence.
    - ``precision``: ``"fp32"`` or ``"bf16"`` (bf16 compute, fp32 master weights and reductions).
    - ``activation_checkpointing``: ``"none"``, ``"full"`` or ``"selective"``; ``checkpoint_every=k``
      checkpoints every k-th layer only.
    - ``offload``: ``"none"``, ``"activations"`` (saved activations to host memory), ``"params"``
      (FSDP2 CPU offload of parameters, gradients and optimizer state) or ``"all"``.
    """

    def __init__(
        self,
        model: ModelLike,
        *,
        stages: int | None = None,
        dp: int = 1,
        tp: int = 1,
        data_parallel: str = "fsdp",
        reshard_after_forward: bool = False,
        sequence_parallel: bool = False,
        precision: str = "fp32",
        activation_checkpointing: str = "none",
        checkpoint_every: int = 1,
        offload: str = "none",
        group: Any = None,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        _check_options(precision, activation_checkpointing, checkpoint_every, offload, data_parallel)
        ensure_initialized(timeout)
        world = dist.get_world_size(group)
        if group is not None and (dp != 1 or tp != 1):
            raise ConfigError("dp and tp need the whole job's processes: do not pass group= with dp or tp")
        self.dims = ParallelDims(dp=dp, pp=stages if stages is not None else -1, tp=tp, world_size=world)
        if sequence_parallel and self.dims.tp == 1:
            raise ConfigError("sequence_parallel splits the sequence over the tensor-parallel ranks: it needs tp > 1")
        if reshard_after_forward and kwargs.get("schedule", "1f1b") in ("zb-h1", "zbv", "zb-h2"):
            raise ConfigError(
                "reshard_after_forward reduces gradients after each backward, which a zero-bubble schedule "
                "splits in two: use a 1f1b, gpipe or interleaved schedule, or keep parameters gathered"
            )
        self.mesh = None
        if group is None and (self.dims.dp > 1 or self.dims.tp > 1):
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            self.mesh = build_mesh(self.dims, device_type)
            group = self.mesh.get_group("pp")
        self._opts = dict(
            data_parallel=data_parallel, reshard_after_forward=reshard_after_forward,
            sequence_parallel=sequence_parallel, precision=precision,
            activation_checkpointing=activation_checkpointing, checkpoint_every=checkpoint_every, offload=offload,
        )  # fmt: skip
        self._dp_sync: Any = None
        super().__init__(model, stages=self.dims.pp, group=group, timeout=timeout, **kwargs)

    # -- building this rank's layers --------------------------------------------------------
    def _prepare_layers(self, model: ModelLike, layers: list[nn.Module], owned: list[int]) -> None:
        mine = [layers[i] for i in owned]
        if is_meta(mine):
            materialize(layers, owned, materializer(model))
            mine = [layers[i] for i in owned]
        for layer in mine:
            layer.to(self.device)
        o = self._opts
        if self.dims.tp > 1:
            from .tensor import apply_tp

            # every layer's type (owned or not) tells where the sequence is split with SP
            apply_tp(layers, self.mesh["tp"], sequence_parallel=o["sequence_parallel"], owned=owned)
        if o["activation_checkpointing"] != "none":
            from .checkpointing import apply_ac

            # indices: "every k-th" counts the model's layers, not this rank's
            apply_ac(mine, o["activation_checkpointing"], every=o["checkpoint_every"], indices=owned)
        if o["precision"] != "fp32":
            from .precision import apply_precision

            apply_precision(mine, o["precision"])
        if o["offload"] in ("activations", "all"):
            from .offload import apply_activation_offload

            apply_activation_offload(mine)
        if self.dims.dp > 1:
            self._dp_sync = self._apply_dp(mine)

    def _apply_dp(self, layers: list[nn.Module]) -> Any:
        from .data import DataParallel, apply_dp

        o = self._opts
        mp = offload = None
        if o["precision"] == "bf16" and self.device.type == "cuda":
            from .precision import fsdp_mixed_precision

            mp = fsdp_mixed_precision(o["precision"], self.device)
        if o["offload"] in ("params", "all"):
            from .offload import fsdp_cpu_offload

            offload = fsdp_cpu_offload()
        dp_mesh = self.mesh["dp"]
        placement = None
        if self.dims.tp > 1:
            from .tensor import fsdp_shard_placement as placement
        units, shared, root = apply_dp(layers, dp_mesh, mode=o["data_parallel"], reshard_after_forward=o["reshard_after_forward"],
                                       mp_policy=mp, offload_policy=offload, shard_placement_fn=placement)
        return DataParallel(units, shared, root, dp_mesh.get_group(), per_microbatch=o["reshard_after_forward"])

    def _new_group(self, ranks: list[int]) -> Any:
        """The tie group of this rank's (dp, tp) coordinate. Every rank creates every coordinate's
        group in the same order, as torch.distributed requires of new_group."""
        if self.mesh is None:
            return super()._new_group(ranks)
        mine = None
        d0, _, t0 = self.dims.coords(dist.get_rank())
        for d in range(self.dims.dp):
            for t in range(self.dims.tp):
                pg = dist.new_group([self.dims.rank_of(d, p, t) for p in ranks])
                if (d, t) == (d0, t0):
                    mine = pg
        return mine

    # -- one step ---------------------------------------------------------------------------
    def forward_backward(self, inputs: Any = None, targets: Any = None) -> float:
        if self.dims.dp == 1:
            return super().forward_backward(inputs, targets)
        d = self.dims.coords(dist.get_rank())[0]
        ends = inputs if 0 in self.stages else targets
        rows = _rows(ends) if ends is not None else None
        if rows is not None and rows < self.dims.dp:
            raise ConfigError(f"a batch of {rows} rows cannot be split over dp={self.dims.dp} replicas: "
                              f"use a batch of at least {self.dims.dp} rows")
        if rows is not None:
            # nearly equal contiguous slices, as the uniform partition splits layers
            start, end = stage_bounds(resolve_partition("uniform", rows, self.dims.dp))[d]
            local = end - start
            # weights so that the replicas' average is the global batch's mean (or sum)
            self._loss_scale = local * self.dims.dp / rows if self.loss_reduction == "mean" else float(self.dims.dp)
            rows_of_mine = lambda t: t[start:end]  # noqa: E731
            inputs = map_tensors(rows_of_mine, inputs) if inputs is not None else None
            targets = map_tensors(rows_of_mine, targets) if targets is not None else None
        scale = torch.tensor([self._loss_scale], dtype=torch.float64)
        dist.broadcast(scale, _first_global(self), group=self.group)  # middle stages see no rows
        self._loss_scale = float(scale[0])
        loss = super().forward_backward(inputs, targets)
        total = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(total, group=self.mesh.get_group("dp"))
        return float(total[0]) / self.dims.dp

    def _begin_step(self) -> None:
        if self._dp_sync is not None:
            self._dp_sync.begin_step()

    def _end_backward(self) -> None:
        if self._dp_sync is not None:
            self._dp_sync.finish_step()

    def _begin_eval(self) -> None:
        if self._dp_sync is not None:
            self._dp_sync.begin_eval()

    def _end_eval(self) -> None:
        if self._dp_sync is not None:
            self._dp_sync.end_eval()

    def _norm_group(self) -> Any:
        return self.group if self.mesh is None else None  # every rank of the job

    def _copies(self, g: torch.Tensor) -> int:
        """On how many ranks of this pipeline coordinate (dp x tp) the same values live."""
        sharded: set[str] = set()
        mesh = getattr(g, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.tensor import Shard

            names = mesh.mesh_dim_names or ()
            for name, placement in zip(names, g.placements):
                if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
                    sharded.add(name)
        n = 1
        for name, size in (("dp", self.dims.dp), ("tp", self.dims.tp)):
            if size > 1 and name not in sharded:
                n *= size
        return n


def _check_options(precision: str, ac: str, every: int, offload: str, data_parallel: str) -> None:
    checks: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("precision", precision, PRECISIONS), ("activation_checkpointing", ac, CHECKPOINTING),
        ("offload", offload, ("none", "activations", "params", "all")), ("data_parallel", data_parallel, ("fsdp", "ddp")),
    ]  # fmt: skip
    for name, value, allowed in checks:
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"checkpoint_every must be an integer >= 1, got {every!r}")


def _first_global(pipe: _PipelineBase) -> int:
    from ..runtime.distributed import to_global

    return to_global(pipe.group, pipe.stage_to_rank[0])
