"""The schedule container: per-rank action lists plus the stage-to-rank placement."""

from __future__ import annotations

from dataclasses import dataclass, field

from .actions import Action, format_actions, parse_actions


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule for one training step.

    ``ranks[r]`` is the ordered list of actions rank ``r`` executes. ``stage_to_rank[s]`` is the
    rank that holds stage ``s`` (``num_stages = len(stage_to_rank)``; with interleaving a rank holds
    several stages, ``s % num_ranks`` in the looping placement of Narayanan et al., 2021).
    """

    name: str
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    ranks: tuple[tuple[Action, ...], ...]
    split_backward: bool = False  # True when backward is written as I and W (zero-bubble)
    meta: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def has_comm(self) -> bool:
        return any(a.kind.is_comm for acts in self.ranks for a in acts)

    def to_text(self) -> str:
        """One line per rank: ``rank <r>: <actions>``, the format of the golden files."""
        return "\n".join(f"rank {r}: {format_actions(list(acts))}" for r, acts in enumerate(self.ranks))

    def with_ranks(self, ranks: list[list[Action]]) -> Schedule:
        return Schedule(
            name=self.name,
            num_microbatches=self.num_microbatches,
            stage_to_rank=self.stage_to_rank,
            ranks=tuple(tuple(r) for r in ranks),
            split_backward=self.split_backward,
            meta=dict(self.meta),
        )


def ranks_from_text(text: str) -> list[list[Action]]:
    """Inverse of :meth:`Schedule.to_text` for the action lists."""
    out: list[list[Action]] = []
    for line in text.strip().splitlines():
        head, _, body = line.partition(":")
        if not head.strip().startswith("rank"):
            raise ValueError(f"expected 'rank <r>: <actions>', got {line!r}")
        out.append(parse_actions(body))
    return out
