"""Execute one rank's lowered action list for one training step.

The schedule decides the order; this loop only carries tensors between stages (over the
transport, or by hand when two stages share a rank) and times each action when asked.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedule.actions import Action, Kind
from ..schedule.comm import peer_stage
from .errors import PipelineError, StageError
from .stage import Stage
from .transport import Transport
from .wire import GRADS, flatten

_MB_RANGE = 100_000  # tags are (channel * _MB_RANGE + microbatch); x3 on the wire stays < 2**31


def channel_of(stage: int, forward: bool) -> int:
    """The channel a sender stage's messages travel on: one per boundary and direction."""
    return stage * 2 + (0 if forward else 1)


def tag_of(stage: int, forward: bool, mb: int) -> int:
    """Unique tag of the message a sender stage posts for a microbatch."""
    return channel_of(stage, forward) * _MB_RANGE + mb


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
    # Receives are posted one message ahead per channel: as soon as a channel's receive completes,
    # the next one on it is posted, so the sender's data lands while this rank computes.
    queues: dict[int, deque[Action]] = {}
    for a in actions:
        if a.kind in (Kind.RECV_F, Kind.RECV_B):
            queues.setdefault(_recv_channel(a), deque()).append(a)
    posted: dict[int, Any] = {ch: _post(transport, q.popleft(), stage_to_rank) for ch, q in queues.items()}
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
                transport.send(tensors, structure, stage_to_rank[s + 1], tag_of(s, True, mb), channel_of(s, True))
            elif a.kind is Kind.RECV_F:
                tensors, structure = _take(transport, a, posted, queues, stage_to_rank)
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
                transport.send(outbox.pop((s, mb)), GRADS, stage_to_rank[s - 1], tag_of(s, False, mb), channel_of(s, False))
            elif a.kind is Kind.RECV_B:
                tensors, _ = _take(transport, a, posted, queues, stage_to_rank)
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


def _recv_channel(a: Action) -> int:
    """The channel a receive listens on: its sender stage's, in its direction."""
    return channel_of(peer_stage(a), a.kind is Kind.RECV_F)


def _post(transport: Transport, a: Action, stage_to_rank: Sequence[int]) -> Any:
    sender = peer_stage(a)
    tag = tag_of(sender, a.kind is Kind.RECV_F, a.microbatch)
    return transport.post_recv(stage_to_rank[sender], tag, _recv_channel(a))


def _take(
    transport: Transport, a: Action, posted: dict[int, Any], queues: dict[int, deque[Action]], stage_to_rank: Sequence[int]
) -> tuple[list[torch.Tensor], Any]:
    """Wait for ``a``'s posted receive, then post the next receive on its channel."""
    ch = _recv_channel(a)
    out = transport.wait_recv(posted.pop(ch))
    if queues[ch]:
        posted[ch] = _post(transport, queues[ch].popleft(), stage_to_rank)
    return out
