"""One training step through the swarm: every stage's actions, then the commit.

Each stage gets a thread that runs its actions in the order of the chosen schedule (GPipe or
1F1B from :mod:`layerwise.schedule`), waiting for its inputs in the :class:`StepCache`. A peer
lost mid-request is replaced (:meth:`Trainer.recover`) and the stage's completed actions are
replayed on the replacement before the failed one is retried. Each stage's thread then asks its
holder for one AdamW step (the commit), without waiting for the other stages; the holder returns
the step's gradients, which are relayed to the stage's copy so that it applies the very same
update, in the background (:mod:`.copies`). A replicated stage gets a thread per replica, each
running the stage's actions for its own microbatches (:mod:`.replicas`); with replicas, a weight
tied across stages or clipping, the commit is two-phase (:mod:`.commit`), after every stage's actions.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from ...schedule.actions import Kind
from ...schedule.generators import build
from ..compress import attach, kept
from ..errors import PeerLost
from ..guard import Rejected
from ..replay import StepCache
from ..wire import Message
from . import commit, copies, replicas

if TYPE_CHECKING:
    from .trainer import Trainer


def run_step(tr: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
    m = tr.spec.microbatches
    stages = len(tr.assignment.stages)
    cache = StepCache(step, stages, m)
    xs, ys = x.chunk(m), y.chunk(m)
    for mb in range(m):
        cache.inputs[0][mb] = xs[mb]
    cache.targets = list(ys)
    cache.slots = [len(x.slots) for x in tr.assignment.stages]
    tr.cache = cache
    schedule = build(tr.spec.schedule, stages=stages, microbatches=m)
    # Plain commits (each holder applies its own sum) start as soon as the stage's own actions are
    # done: a later stage finishes its backwards first and commits while earlier ones still drain.
    # A two-phase commit (commit.py) needs every stage's gradients first.
    two_phase = commit.needed(tr)
    jobs = []
    for s in range(stages):  # a replicated stage: the schedule's actions of each slot's microbatches
        for slot in range(cache.slots[s]):
            acts = [a for a in schedule.ranks[s] if a.microbatch % cache.slots[s] == slot]
            jobs.append(lambda s=s, slot=slot, acts=acts: _run_stage(tr, cache, s, acts, slot, not two_phase))
    _in_threads(cache, jobs)
    if two_phase:
        commit.commit_step(tr, cache, _in_threads, call_stage)
    tr.cache = None
    return sum(cache.losses[mb] for mb in range(m))


def _in_threads(cache: StepCache, jobs: list[Any]) -> None:
    def guard(job: Any) -> None:
        try:
            job()
        except BaseException as e:  # the first failure stops every other stage's wait
            cache.fail(e)

    threads = [threading.Thread(target=guard, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if cache.failed is not None:
        raise cache.failed


def _message(tr: Trainer, cache: StepCache, s: int, kind: str, mb: int) -> Message:
    last = s == cache.stages - 1
    # compressed inputs are forwarded as they came; the reply is compressed as asked (compress.py)
    meta: dict[str, Any] = {} if tr.opts.compress.exact else {"compress": tr.opts.compress.to_meta()}
    if kind == "forward":
        meta["weight"] = 1.0 / cache.microbatches
        items = [cache.wait(cache.inputs, s, mb)] + ([cache.targets[mb]] if last else [])
        return Message("forward", cache.step, s, mb, tr.epoch, meta, attach(meta, items))
    if cache.slots[s] > 1:
        meta["group"] = mb % cache.slots[s]  # a replica's slot: its microbatches' gradients are summed apart
    grads = attach(meta, [] if last else [cache.wait(cache.grads, s, mb)])
    return Message("backward", cache.step, s, mb, tr.epoch, meta, grads)


def _run_stage(tr: Trainer, cache: StepCache, s: int, actions: Any, slot: int = 0, then_commit: bool = False) -> None:
    last = s == cache.stages - 1
    for a in actions:
        kind = "forward" if a.kind == Kind.F else "backward"
        msg = _message(tr, cache, s, kind, a.microbatch)
        out = call_stage(tr, cache, s, msg, slot)
        if kind == "forward" and last:
            cache.losses[a.microbatch] = float(out.tensors[0])
        elif kind == "forward":
            cache.put(cache.inputs, s + 1, a.microbatch, kept(out.meta, out.tensors, single=True))
        elif s > 0:
            cache.put(cache.grads, s - 1, a.microbatch, kept(out.meta, out.tensors, single=False))
        cache.done[s].append((kind, a.microbatch))
    if then_commit:
        _commit(tr, cache, s)


def call_stage(tr: Trainer, cache: StepCache, s: int, msg: Message, slot: int = 0) -> Message:
    """Send ``msg`` to stage ``s``'s holder (or replica ``slot``); on a lost one, recover, replay, and retry.

    A reply that is rejected (:mod:`.trust`: malformed, wrong shape, NaN, a failed spot check) is
    handled like the holder's failure: the work is redone on another peer, the holder gets a strike."""
    while True:
        holder = replicas.peer_of(tr, s, slot) if cache.slots[s] > 1 else tr.holder(s)
        try:
            if tr.trust.banned(holder):  # banned while holding other stages too: they move as after a failure
                _recover(tr, cache, s, holder, msg.kind)
                continue
            if (s, slot) in tr.slot_replay:
                replicas.replay_slot(tr, cache, s, slot, holder)
            if s in tr.replay_needed:
                _replay(tr, cache, s, holder)
            msg.epoch = tr.epoch
            t0 = time.perf_counter()
            reply = tr.trust.request(s, msg, holder, cache)
            tr.request_times.append((s, msg.kind, time.perf_counter() - t0))
            tr.timeline.record(s, msg.kind, msg.mb, holder, t0, time.perf_counter())
            return reply
        except PeerLost as e:
            _recover(tr, cache, s, e.peer, msg.kind, force=False)
        except Rejected as e:
            if not tr.trust.banned(holder):
                tr.trust.strike(holder, e.reason)
            _recover(tr, cache, s, holder, msg.kind)


def _recover(tr: Trainer, cache: StepCache, s: int, peer: str, phase: str, force: bool = True) -> None:
    """Move stage ``s``'s work away from ``peer`` (lost, or with ``force`` alive but rejected)."""
    if cache.slots[s] > 1:
        replicas.recover_slot(tr, s, peer, cache, phase, force=force)
    else:
        tr.recover(s, peer, cache, phase, force=force)


def _replay(tr: Trainer, cache: StepCache, s: int, holder: str) -> None:
    for kind, mb in list(cache.done[s]):
        tr.trust.request(s, _message(tr, cache, s, kind, mb), holder, None)  # replies checked, never spot-checked
    tr.replayed += len(cache.done[s])
    tr.replay_needed.discard(s)
    tr.mark_recovered(s)


def _commit(tr: Trainer, cache: StepCache, s: int) -> None:
    lr = tr.spec.lr_at(cache.step)
    msg = Message("commit", cache.step, s, -1, tr.epoch, {"lr": lr, "microbatches": cache.microbatches})
    reply = call_stage(tr, cache, s, msg)
    if reply.meta.get("already"):
        return  # the new holder's state came from a copy that had already applied this step
    copies.start(tr, s, cache.step, lr, reply.tensors)  # the step does not wait for the copy (copies.py)
