"""A stage's copy brought up to date in the background, off the step's critical path.

At a plain commit (:func:`.driver.run_step`) each holder applies its AdamW step and returns the
gradients it applied; the trainer relays them to the stage's copy (``backup_apply``), which applies
the very same update. Waiting for that relay made it part of every step: in bench/swarm.py (c) the
largest stage's gradients (16 MB) crossed from the trainer to the copy and were applied there
(at half speed on the emulated slow peer) while both peers sat idle, about 40 of the commit's 90 ms.

Here the relay runs in a thread of its own and the step ends when every holder has committed; the
copy applies the update while the next step's first microbatches run. The trainer still holds the
gradients until the copy has acknowledged them, so nothing is lost if the holder dies meanwhile.
Everything that reads or replaces a copy's state first waits for its relay (:func:`settle`): the
next relay of the stage (a copy applies steps in order), a recovery that promotes the copy or hands
its state over, a new copy, a spot check the copy recomputes, a gather of every stage's state, a
re-assignment, and the end of :meth:`Trainer.train`. A relay that failed is sent again if its copy
still answers (``backup_apply`` is idempotent: a copy that already applied the step says so); a
copy that is gone is noted as lost and replaced from the holder, as when the relay was awaited.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..errors import PeerLost
from ..wire import Message

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class Relay:
    copy: str
    msg: Message
    thread: threading.Thread | None = None
    error: BaseException | None = None


def start(tr: Trainer, s: int, step: int, lr: float, grads: list[torch.Tensor]) -> None:
    """Send the committed step's gradients to stage ``s``'s copy without waiting for it to apply them."""
    with tr._lock:
        copy = current(tr, s)
        if copy is None:
            return
        relay = Relay(copy, Message("backup_apply", step, s, -1, tr.epoch, {"lr": lr}, grads))
        relay.thread = threading.Thread(target=_send, args=(tr, s, relay), daemon=True, name=f"relay-stage-{s}")
        tr.relays[s] = relay
        relay.thread.start()


def current(tr: Trainer, s: int) -> str | None:
    """Stage ``s``'s copy, ready for the next relay (the previous one applied: a copy applies steps in
    order), or None: no copy, or a banned one, replaced now by a fresh copy of the holder's state."""
    settle(tr, s)
    copy = tr.assignment.stages[s].copy
    if copy is not None and tr.trust.banned(copy):  # its state is not kept up to date any more
        tr.recopy(s)
        return None
    return copy


def _send(tr: Trainer, s: int, relay: Relay) -> None:
    try:
        t0 = time.perf_counter()
        tr.node.request(relay.copy, relay.msg, tr.opts.request_timeout)
        tr.timeline.record(s, "backup_apply", -1, relay.copy, t0, time.perf_counter())
    except BaseException as e:  # handled by settle, in the thread that needs the copy
        relay.error = e


def settle(tr: Trainer, s: int, on_lost: str = "recopy") -> None:
    """Wait until stage ``s``'s copy has applied the last relayed step. A copy that could not be
    reached is noted as lost, then ``on_lost``: ``recopy`` replaces it from the holder; ``note`` only
    notes it (:meth:`Trainer.recopy`, which replaces it anyway); ``drop`` takes it off the stage (a
    recovery: a copy that missed a step must never be promoted)."""
    with tr._lock:  # one thread settles a stage; the relay's thread never takes this lock
        relay = tr.relays.pop(s, None)
        if relay is None:
            return
        assert relay.thread is not None
        relay.thread.join()
        if relay.error is None:
            return
        if not isinstance(relay.error, PeerLost):
            raise relay.error  # a refusal: a fault of the run, as when the relay was awaited
        if not tr._gone(relay.copy):  # a moment without a route: send again (a copy that applied it says so)
            try:
                tr.node.request(relay.copy, relay.msg, tr.opts.request_timeout)
                return
            except PeerLost:
                pass
        tr.note_lost(relay.copy)
        span = tr.assignment.stages[s]
        if on_lost == "recopy":
            tr.recopy(s)
        elif on_lost == "drop" and span.copy == relay.copy:
            tr._set(replace(span, copy=None))


def settle_all(tr: Trainer) -> None:
    for s in sorted(tr.relays):
        settle(tr, s)
