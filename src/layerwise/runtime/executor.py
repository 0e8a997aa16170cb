"""Execute one rank's lowered action list for one training step.

The schedule decides the order; this loop only carries tensors between stages (over the
transport, or by hand when two stages share a rank) and times each action when asked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedule.actions import Action, Kind
from .errors import PipelineError, StageError
from .stage import Stage
from .transport import Transport
from .wire import GRADS, flatten

_MB_RANGE = 100_000  # tags are ((stage * 2 + direction) * _MB_RANGE + microbatch)


def tag_of(stage: int, forward: bool, mb: int) -> int:
    """Unique tag of the message a sender stage posts for a microbatch."""
    return (stage * 2 + (0 if forward else 1)) * _MB_RANGE + mb


@dataclass
class StepData:
    """What one step feeds in: per-microbatch inputs (first stage), targets and loss weights."""

    inputs: Sequence[Any]
    targets: Sequence[Any]
    weights: Sequence[float]


@dataclass
class StepRecord:
    loss: torch.Tensor | None = None  # sum of the weighted microbatch losses (last stage only)
    events: list[tuple[int, int, int, float, float]] = field(default_factory=list)


_KIND_CODE = {k: i for i, k in enumerate(Kind)}
KINDS = list(Kind)


def run_step(
    actions: Sequence[Action],
    stages: dict[int, Stage],
    stage_to_rank: Sequence[int],
    transport: Transport,
    data: StepData,
    record: bool = False,
    stretch: float = 1.0,
) -> StepRecord:
    """Run ``actions``; with ``stretch > 1`` every compute action is followed by a sleep that makes
    it last ``stretch`` times as long: an emulated slower device (see Pipeline(speed=...))."""
    rank = transport.rank
    last = len(stage_to_rank) - 1
    acts: dict[tuple[int, int], Any] = {}  # (stage, mb) -> input waiting for its forward
    grads: dict[tuple[int, int], list[torch.Tensor]] = {}  # (stage, mb) -> output grads
    outbox: dict[tuple[int, int], Any] = {}  # produced here, waiting for a send action
    out = StepRecord()
    clock = time.perf_counter
    timed = record or stretch != 1.0
    for a in actions:
        s, mb = a.stage, a.microbatch
        t0 = clock() if timed else 0.0
        try:
            if a.kind is Kind.F:
                stage = stages[s]
                x = data.inputs[mb] if s == 0 else acts.pop((s, mb))
                if s == last:
                    loss = stage.forward(mb, x, data.targets[mb], data.weights[mb])
                    out.loss = loss if out.loss is None else out.loss + loss
                else:
                    y = stage.forward(mb, x)
                    if stage_to_rank[s + 1] == rank:
                        acts[(s + 1, mb)] = y
                    else:
                        outbox[(s, mb)] = y
            elif a.kind is Kind.SEND_F:
                tensors, structure = flatten(outbox.pop((s, mb)), f"stage {s} output")
                transport.send(tensors, structure, stage_to_rank[s + 1], tag_of(s, True, mb))
            elif a.kind is Kind.RECV_F:
                tensors, structure = transport.recv(stage_to_rank[s - 1], tag_of(s - 1, True, mb))
                acts[(s, mb)] = structure.unflatten(tensors)
            elif a.kind in (Kind.B, Kind.I):
                g = None if s == last else grads.pop((s, mb))
                stage = stages[s]
                gin = stage.backward(mb, g) if a.kind is Kind.B else stage.backward_input(mb, g)
                if s > 0:
                    if stage_to_rank[s - 1] == rank:
                        grads[(s - 1, mb)] = gin
                    else:
                        outbox[(s, mb)] = gin
            elif a.kind is Kind.W:
                stages[s].backward_weight(mb)
            elif a.kind is Kind.SEND_B:
                transport.send(outbox.pop((s, mb)), GRADS, stage_to_rank[s - 1], tag_of(s, False, mb))
            elif a.kind is Kind.RECV_B:
                tensors, _ = transport.recv(stage_to_rank[s + 1], tag_of(s + 1, False, mb))
                grads[(s, mb)] = tensors
        except PipelineError:
            raise
        except Exception as e:
            raise StageError(f"rank {rank} failed at action {a} (stage {s}, microbatch {mb}): {type(e).__name__}: {e}") from e
        if stretch != 1.0 and a.kind.is_compute:
            time.sleep((clock() - t0) * (stretch - 1.0))
        if record:
            out.events.append((s, _KIND_CODE[a.kind], mb, t0, clock()))
    transport.flush()
    return out
