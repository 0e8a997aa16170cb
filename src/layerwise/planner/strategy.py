"""One way to run a training step: the degrees of parallelism and the memory-saving options."""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule.generators import SCHEDULES
from .memory import RECOMPUTE

# Every schedule the runtime runs (layerwise.schedule.generators, pure) can be pinned and searched.
# Those that split the backward into input- and weight-gradient passes (Qi et al., 2023):
SPLIT_BACKWARD = ("zb-h1", "zb-h2", "zbv")


class StrategyError(ValueError):
    """A strategy that cannot run on this model and cluster; the message says why."""


@dataclass(frozen=True, kw_only=True)
class Strategy:
    dp: int  # data-parallel degree
    tp: int  # tensor-parallel degree (Megatron-style, inside a node)
    pp: int  # pipeline ranks
    schedule: str = "1f1b"
    chunks: int = 1  # stages per pipeline rank: interleaved's choice; ZB-V always 2 (its V)
    micro: int = 1  # samples per microbatch
    zero_stage: int = 0  # 0-3 (Rajbhandari et al., 2020); 3 = FSDP
    recompute: str = "none"  # none, selective, full (Korthikanti et al., 2022)
    offload: bool = False  # optimizer state in host memory (ZeRO-Offload)
    sequence_parallel: bool = True  # with tp > 1 (Korthikanti et al., 2022, Sec. 4.2.2)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "chunks", "micro"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise StrategyError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise StrategyError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "zbv":
            if self.chunks not in (1, 2):
                raise StrategyError(f"zbv holds 2 chunks per rank in a V, not chunks={self.chunks}")
            object.__setattr__(self, "chunks", 2)  # the default 1 means "the schedule's own"
        elif self.chunks > 1 and self.schedule != "interleaved":
            raise StrategyError(f"chunks={self.chunks} needs the interleaved schedule, not {self.schedule}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise StrategyError(f"zero stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.recompute not in RECOMPUTE:
            raise StrategyError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def stages(self) -> int:
        """Model stages: ``chunks`` per pipeline rank."""
        return self.pp * self.chunks

    def stage_ranks(self) -> tuple[int, ...]:
        """Pipeline rank of each model stage: round robin (``s % pp``), or ZB-V's V
        (0, 1, ..., p-1, p-1, ..., 1, 0; layerwise.schedule.zero_bubble.v_placement)."""
        if self.schedule == "zbv":
            return tuple(range(self.pp)) + tuple(reversed(range(self.pp)))
        return tuple(st % self.pp for st in range(self.stages))

    @property
    def split_backward(self) -> bool:
        return self.schedule in SPLIT_BACKWARD

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def microbatches(self, global_batch: int) -> int:
        per_replica, rest = divmod(global_batch, self.dp * self.micro)
        if rest or per_replica < 1:
            raise StrategyError(
                f"global batch {global_batch} is not a multiple of dp x microbatch size = "
                f"{self.dp} x {self.micro}"
            )
        return per_replica

    def label(self) -> str:
        sched = f"{self.schedule}x{self.chunks}" if self.schedule == "interleaved" and self.chunks > 1 else self.schedule
        extra = [f"zero{self.zero_stage}", f"recompute={self.recompute}"]
        if self.offload:
            extra.append("offload")
        return f"dp{self.dp} tp{self.tp} pp{self.pp} {sched} mb{self.micro} " + " ".join(extra)
