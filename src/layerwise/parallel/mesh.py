"""One validated device mesh for data, pipeline and tensor parallelism (after torchtitan's
``ParallelDims``): the degrees are checked once, then each parallelism gets only its own
sub-mesh or process group.

Rank layout: ``rank = (d * pp + p) * tp + t``. Tensor parallelism is innermost, so the ranks of one
tensor-parallel group are consecutive and share a host under torchrun (they talk on every layer);
pipeline neighbours come next (point-to-point once per microbatch, through shared memory when on
one host); data parallelism is outermost (one gradient reduction per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..runtime.errors import ConfigError

DIMS = ("dp", "pp", "tp")


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of data (``dp``), pipeline (``pp``) and tensor (``tp``) parallelism.

    One degree may be -1: it is inferred from ``world_size``. The three must multiply to it.
    """

    dp: int = 1  # data-parallel replicas (FSDP shards or DDP replicas)
    pp: int = -1  # pipeline ranks; each holds `chunks` stages with interleaved schedules
    tp: int = 1  # tensor-parallel ranks splitting each layer
    world_size: int = 1  # processes in the job

    def __post_init__(self) -> None:
        degrees = {"dp": self.dp, "pp": self.pp, "tp": self.tp}
        bad = [f"{k}={v}" for k, v in degrees.items() if v == 0 or v < -1]
        if bad:
            raise ConfigError(f"parallel degrees must be >= 1 (or -1 for one inferred degree), got {', '.join(bad)}")
        inferred = [k for k, v in degrees.items() if v == -1]
        if len(inferred) > 1:
            raise ConfigError(f"only one of dp, pp, tp may be -1 (inferred), got {', '.join(inferred)} = -1")
        known = 1
        for v in degrees.values():
            known *= v if v != -1 else 1
        if inferred:
            if self.world_size % known:
                raise ConfigError(
                    f"cannot infer {inferred[0]}: {self._product(degrees, inferred[0])} = {known} does not divide "
                    f"the world size {self.world_size}; start a multiple of {known} processes or change the degrees"
                )
            object.__setattr__(self, inferred[0], self.world_size // known)
        elif known != self.world_size:
            raise ConfigError(
                f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp} = {known}, but there are {self.world_size} "
                f"processes: start {known} processes (torchrun --nproc-per-node {known}) or choose degrees "
                f"that multiply to {self.world_size}"
            )

    @staticmethod
    def _product(degrees: dict[str, int], skip: str) -> str:
        return " x ".join(f"{k}" for k in degrees if k != skip)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(d, p, t)`` of a global rank."""
        d, rest = divmod(rank, self.pp * self.tp)
        p, t = divmod(rest, self.tp)
        return d, p, t

    def rank_of(self, d: int, p: int, t: int) -> int:
        return (d * self.pp + p) * self.tp + t

    def describe(self, rank: int) -> str:
        d, p, t = self.coords(rank)
        parts = [f"pp {p}"] + ([f"dp {d}"] if self.dp > 1 else []) + ([f"tp {t}"] if self.tp > 1 else [])
        return f"rank {rank} ({', '.join(parts)})"


def build_mesh(dims: ParallelDims, device_type: str) -> Any:
    """The 3-D ``DeviceMesh`` (dims ``dp``, ``pp``, ``tp``). Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, dims.shape, mesh_dim_names=DIMS)
