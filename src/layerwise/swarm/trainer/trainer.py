"""The swarm's trainer: finds peers, assigns spans, runs steps, and keeps every stage alive.

Fault tolerance (see the package docstring for the costs): each stage has a holder and a copy.
The copy is brought up to date at every commit with the holder's gradients (relayed by the
trainer), so it always equals the holder's state as of the last committed step. When a holder is
lost, :meth:`Trainer.recover` moves the stage to a spare peer (handing over the copy's state) or
promotes the copy, gives the stage a new copy, and marks the stage for replay of the step's
completed work. At each step boundary, dead copies are replaced, peers that joined are measured,
and the layers are re-balanced when the solver predicts a gain above the hysteresis threshold.
A stage with replicas (spare peers, :mod:`.replicas`) needs no copy: its replicas back each other up.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..assignment import Assignment, PeerInfo, StageSpan, assign, relative_speeds, worth_moving
from .. import checkpoint
from ..errors import PeerLost, StageLost, SwarmError
from ..membership import Membership
from ..net import Node, config, open_session, trainer_key
from ..replay import StepCache
from ..spec import SwarmSpec, build_layers, init_checksum, load_corpus, step_batch
from ..timeline import StepTimeline
from ..wire import Message, encode_message
from . import admission, copies, replicas, report
from .driver import run_step
from .options import Failure, TrainerOptions
from .identity import TrainerIdentity
from .trust import Trust


class Trainer:
    def __init__(self, spec: SwarmSpec, opts: TrainerOptions) -> None:
        self.spec, self.opts = spec, opts
        self.epoch = 0
        self.assignment = Assignment(epoch=0, stages=())
        self.block_s: dict[str, float] = {}
        self.memory: dict[str, float] = {}
        self.declared: dict[str, float] = {}
        self.failures: list[Failure] = []
        self.replay_needed: set[int] = set()
        self.slot_replay: set[tuple[int, int]] = set()  # (stage, replica slot) to replay on its new peer
        self.relays: dict[int, copies.Relay] = {}  # per stage: its copy's update still in flight (copies.py)
        self.replayed = 0
        self.request_times: list[tuple[int, str, float]] = []  # (stage, kind, seconds) of each request
        self.timeline = StepTimeline()  # the last step's requests, for the status page
        self.cache: StepCache | None = None
        self.phase = "idle"
        self.step_times: list[tuple[int, float, float]] = []  # (step, wall end, seconds)
        self.losses: list[float] = []
        self.rebalances = 0
        self._lock = threading.RLock()
        self._counts = [len(list(m.parameters())) for m in build_layers(spec)]
        self._checksum = init_checksum(spec)
        self.refused: set[str] = set()
        self._corpus: Any = None
        self.ident = TrainerIdentity(opts)  # identity and access (identity.py); inert without --identity
        self.trust = Trust(self)  # reply checks, spot checks, probation and bans

    # -- session -------------------------------------------------------------------------------
    def __enter__(self) -> Trainer:
        cfg = config(listen=self.opts.listen, connect=self.opts.join, lease_ms=self.opts.lease_ms,
                     identity=self.ident.identity, relay=self.opts.relay)  # fmt: skip
        self.session = open_session(cfg, "trainer", self.opts.relay, self.ident.identity)
        self.node = Node(self.session, self.opts.swarm, auth=self.ident.client)
        self.membership = Membership(self.session, self.opts.swarm)
        self._status = self.session.declare_queryable(trainer_key(self.opts.swarm), self._on_status)
        return self

    def __exit__(self, *exc: Any) -> None:
        for relay in list(self.relays.values()):  # no request left running on a closing session
            assert relay.thread is not None
            relay.thread.join()
        self._status.undeclare()
        self.membership.close()
        self.session.close()

    def _on_status(self, query: Any) -> None:
        g = self.ident.guard
        adm = g.admit_query(query, query.payload.to_bytes() if query.payload is not None else b"") if g else None
        if adm is not None and adm.session is None:
            reply = Message("ok") if adm.hello is not None else Message("error", meta={"error": adm.refused})
        else:
            reply = Message("ok", meta=self.status())
        data = encode_message(reply)
        query.reply(query.key_expr, data, attachment=adm.attachment(data) if adm is not None else None)
        query.drop()

    # -- the run -------------------------------------------------------------------------------
    def train(self, steps: int, on_step: Callable[[Trainer, int], None] | None = None) -> list[float]:
        if self._corpus is None:
            self._corpus = load_corpus(self.spec)
        if not self.assignment.stages:
            self.start()
        for step in range(len(self.losses), steps):
            if on_step is not None:
                on_step(self, step)
            self.boundary()
            x, y = step_batch(self.spec, self._corpus, step)
            t0 = time.perf_counter()
            self.phase = "step"
            self.timeline.begin(step)
            loss = run_step(self, step, x, y)
            self.timeline.end()
            self.phase = "idle"
            self.losses.append(loss)
            self.step_times.append((step, time.time(), time.perf_counter() - t0))
            if self.opts.checkpoint_every and len(self.losses) % self.opts.checkpoint_every == 0:
                checkpoint.save(str(self.opts.checkpoint_dir), self.spec, self._gather(), self.losses)
        copies.settle_all(self)  # every copy as up to date as its holder when the run returns
        return self.losses

    def start(self) -> None:
        if not self.membership.wait_for(self.opts.min_peers, self.opts.wait_s):
            have = len(self.membership.snapshot())
            raise SwarmError(
                f"only {have} of {self.opts.min_peers} peers joined swarm {self.opts.swarm!r} within "
                f"{self.opts.wait_s:.0f} s: start more with 'layerwise swarm serve --join ENDPOINT'{self.ident.hint()}"
            )
        # gossip makes direct links after the first ones through the seed; tokens may flap meanwhile
        self.membership.settle(quiet_s=1.0, timeout=10.0)
        admission.measure_new(self)
        if not self.peers():
            raise SwarmError(f"no peer of swarm {self.opts.swarm!r} answered: check that they run the same version")
        states = None
        if self.opts.resume:
            states, self.losses = checkpoint.load(self.opts.resume, self.spec)
        self._reconfigure(states=states)

    def peers(self) -> list[PeerInfo]:
        live = {p: s for p, s in self.block_s.items() if self.membership.is_alive(p) and not self.trust.banned(p)}
        if self.opts.capacity == "declared":
            live = {p: 1.0 / self.declared[p] for p in live}
        speeds = relative_speeds(live) if live and self.opts.capacity != "blind" else dict.fromkeys(live, 1.0)
        return [PeerInfo(id=p, speed=speeds[p], memory_bytes=self.memory[p]) for p in sorted(live)]

    def holder(self, s: int) -> str:
        with self._lock:
            return self.assignment.stages[s].holder

    # -- step boundary: replace what died, take in who joined ---------------------------------
    def boundary(self) -> None:
        self.ident.at_boundary(self)  # a revoked peer now counts as gone; collect the peers' refusals
        for s in range(len(self.assignment.stages)):
            span = self.assignment.stages[s]
            if len(span.slots) > 1:
                replicas.heal(self, s)
            elif self._lost_peer(span.holder):
                self.recover(s, span.holder, None, force=True)
                self.mark_recovered(s)
            elif span.copy is None or self._lost_peer(span.copy):
                if span.copy is not None:
                    self.note_lost(span.copy)
                self.recopy(s)
        admission.measure_new(self)
        peers = self.peers()
        order = [s.holder for s in self.assignment.stages]
        proposed = assign(self.spec, peers, epoch=self.epoch + 1, max_stages=self.opts.max_stages, order=order)
        speeds = {p.id: p.speed for p in peers}
        if worth_moving(self.assignment, proposed, self.spec, speeds, self.opts.rebalance_threshold):
            self._reconfigure(states=self._gather())
            self.rebalances += 1
        else:
            self._use_idle_peers(peers)

    def _use_idle_peers(self, peers: list[PeerInfo]) -> None:
        """A peer with nothing to do takes over the copy of a stage from a peer that also holds one."""
        holders = {x.holder for x in self.assignment.stages}
        busy = self.assignment.peers()
        for peer in replicas.fill(self, [p.id for p in peers if p.id not in busy]):
            doubled = [x for x in self.assignment.stages if x.copy in holders]
            if not doubled:
                return
            old = doubled[0]
            self.recopy(old.stage, to=peer)
            if old.copy is not None and self.assignment.stages[old.stage].copy == peer:
                try:  # the old copy is no longer kept up to date: free it
                    self.node.request(old.copy, Message("drop", stage=old.stage, epoch=self.epoch))
                except PeerLost as e:
                    self.note_lost(e.peer)

    def _gather(self) -> list[tuple[list[torch.Tensor], int]]:
        """Every layer's weights and AdamW state, from each stage's holder (or its copy)."""
        copies.settle_all(self)
        layers: list[tuple[list[torch.Tensor], int]] = []
        for span in self.assignment.stages:
            for peer in (*dict.fromkeys(span.slots), span.copy):
                if peer is None:
                    continue
                try:
                    r = self.node.request(peer, Message("get_state", stage=span.stage, epoch=self.epoch))
                    break
                except PeerLost as e:
                    self.note_lost(e.peer)
            else:
                raise self._lost(span)
            pos = 0
            for i in span.layers:
                n = 3 * self._counts[i]
                layers.append((r.tensors[pos : pos + n], int(r.meta["step"])))
                pos += n
        return layers

    def _reconfigure(self, states: list[tuple[list[torch.Tensor], int]] | None) -> None:
        """Install a new assignment on every live peer, from the seed or from gathered states."""
        copies.settle_all(self)  # a reset drops the copies: no update may arrive after it
        for _attempt in range(5):
            peers = self.peers()
            if not peers:  # every token away at once: gossip re-linking, or really no one left
                time.sleep(0.5)
                continue
            order = [s.holder for s in self.assignment.stages]
            new = assign(self.spec, peers, epoch=self.epoch + 1, max_stages=self.opts.max_stages, order=order)
            try:
                for p in sorted(p.id for p in peers):
                    self.node.request(p, Message("reset", epoch=new.epoch))
                for span in new.stages:
                    for peer, role in (*((p, "holder") for p in dict.fromkeys(span.slots)), (span.copy, "copy")):
                        if peer is not None:
                            self._install(peer, span, role, states, new.epoch)
            except PeerLost as e:
                if self._gone(e.peer):  # else a moment without a route: assign again
                    self.note_lost(e.peer)
                continue
            with self._lock:
                self.assignment, self.epoch = new, new.epoch
            return
        raise SwarmError("peers kept failing while layers were being assigned; check the peers' logs")

    def _install(self, peer: str, span: StageSpan, role: str, states: Any, epoch: int,
                 tensors: list[torch.Tensor] | None = None, step: int | None = None) -> None:  # fmt: skip
        if states is not None:
            tensors = [t for i in span.layers for t in states[i][0]]
            step = states[span.first][1]
        meta: dict[str, Any] = {"spec": self.spec.to_json(), "first": span.first, "count": span.count, "role": role}
        if tensors is not None:
            meta["step"] = step
        self.node.request(peer, Message("install", stage=span.stage, epoch=epoch, meta=meta, tensors=tensors or []))

    # -- failures ------------------------------------------------------------------------------
    def note_lost(self, peer: str, phase: str = "relay") -> Failure:
        with self._lock:
            for f in self.failures:
                if f.peer == peer:
                    return f
            f = Failure(peer=peer, step=len(self.losses), phase=phase, noticed_at=time.time(),
                        left_at=self.membership.left_at(peer))  # fmt: skip
            self.failures.append(f)
            return f

    def mark_recovered(self, s: int) -> None:
        with self._lock:
            for f in self.failures:
                if s in f.stages and f.recovered_at is None:
                    f.recovered_at = time.time()

    def _lost(self, span: StageSpan) -> StageLost:
        names = f"{self.spec.layer_name(span.first)} to {self.spec.layer_name(span.first + span.count - 1)}"
        return StageLost(
            f"stage {span.stage} (layers {span.first}-{span.first + span.count - 1}: {names}) is lost: its holder "
            f"{span.holder} and its copy {span.copy or '(none)'} are both gone, at step {len(self.losses)}. "
            f"No live peer has these weights. {self._resume_hint()}"
        )

    def fresh_spare(self, span: StageSpan, phase: str) -> str | None:
        """Before the first commit a stage's state is its seeded init, which any peer can build: a peer
        to build it on, or None (past that, resumed, or no other peer)."""
        spares = [p.id for p in self.peers() if p.id not in span.slots and p.id != span.copy]
        return None if self.losses or self.opts.resume or phase == "commit" or not spares else spares[0]

    def _resume_hint(self) -> str:
        done = checkpoint.last_step(self.opts.checkpoint_dir)
        if done is not None:
            return (f"To resume from the checkpoint of step {done}, run the trainer again with --resume "
                    f"{self.opts.checkpoint_dir} (at least 2 peers, so that every stage has a copy).")
        return ("To resume, start the run again with at least 2 peers, so that every stage has a copy; "
                "with --checkpoint DIR the trainer saves every layer's state and --resume DIR continues from it.")

    def recover(self, s: int, dead: str, cache: StepCache | None, phase: str = "boundary", force: bool = False) -> None:
        """Give stage ``s`` a live holder again after ``dead`` was lost (or, ``force``, is not to be trusted
        with this work); mark it for replay."""
        with self._lock:
            copies.settle(self, s, on_lost="drop")  # the copy has the last committed step, or is no copy
            span = self.assignment.stages[s]
            if span.holder != dead and self.membership.is_alive(span.holder):
                return  # another thread already recovered this stage
            if not force and not self._gone(dead):
                return  # a moment without a route to it, not a failure: the request is sent again
            failure = self.note_lost(dead, phase)
            failure.interrupted(phase, s)
            failure.left_at = failure.left_at or self.membership.left_at(dead)
            if span.copy is None or self._lost_peer(span.copy):
                spare = self.fresh_spare(span, phase)
                if spare is None:
                    raise self._lost(span)
                fresh = StageSpan(stage=s, first=span.first, count=span.count, holder=spare, copy=None)
                try:
                    self._install(spare, fresh, "holder", None, self.epoch)
                except PeerLost as e:
                    self.note_lost(e.peer)
                    raise self._lost(span) from None
                self._set(fresh)
                self.recopy(s)
                if cache is not None and cache.done[s]:
                    self.replay_needed.add(s)
                else:
                    self.mark_recovered(s)
                return
            busy = self.assignment.peers()
            spares = [p.id for p in self.peers() if p.id not in busy]
            try:
                if spares:  # a peer with nothing to do takes the stage over from the copy
                    r = self.node.request(span.copy, Message("get_state", stage=s, epoch=self.epoch))
                    new = StageSpan(stage=s, first=span.first, count=span.count, holder=spares[0], copy=span.copy)
                    self._install(spares[0], new, "holder", None, self.epoch, r.tensors, int(r.meta["step"]))
                    step = int(r.meta["step"])
                    self._set(new)
                else:  # the copy becomes the holder; a new copy is made from it
                    r = self.node.request(span.copy, Message("promote", stage=s, epoch=self.epoch))
                    step = int(r.meta["step"])
                    self._set(StageSpan(stage=s, first=span.first, count=span.count, holder=span.copy, copy=None))
                    self.recopy(s)
            except PeerLost as e:  # the copy died too while taking over
                self.note_lost(e.peer)
                raise self._lost(span) from None
            if cache is not None and step == cache.step and cache.done[s]:
                self.replay_needed.add(s)
            else:
                self.mark_recovered(s)

    def _gone(self, peer: str) -> bool:
        """Is ``peer`` really lost? Liveliness tokens can vanish for a moment while gossip links peers
        directly, and a request can find no route meanwhile; a dead peer stays gone, a hung one stops
        answering within the lease."""
        if peer not in self.membership.snapshot() or self.trust.banned(peer):
            return True  # gone for longer than the membership's grace, or banned
        try:
            self.node.request(peer, Message("status"), timeout=self.opts.lease_ms / 1000 + 1)
            return False
        except PeerLost:
            return True

    def _lost_peer(self, peer: str) -> bool:
        return self.trust.banned(peer) or (not self.membership.is_alive(peer) and self._gone(peer))

    def recopy(self, s: int, to: str | None = None) -> None:
        """Make a fresh copy of stage ``s`` from its holder on ``to`` or the least busy other live peer."""
        with self._lock:
            copies.settle(self, s, on_lost="note")  # the old copy's update is done before it is replaced
            span = self.assignment.stages[s]
            held = Counter(p for x in self.assignment.stages for p in (*x.slots, x.copy))
            load = {p.id: held[p.id] for p in self.peers()}
            candidates = [(0, to)] if to else sorted((n, p) for p, n in load.items() if p not in span.slots)
            new = replace(span, copy=None)
            if candidates:
                peer = candidates[0][1]
                try:
                    r = self.node.request(span.holder, Message("get_state", stage=s, epoch=self.epoch))
                except PeerLost as e:  # the holder is gone too, and the old copy with it
                    self.note_lost(e.peer)
                    raise self._lost(span) from None
                try:
                    self._install(peer, new, "copy", None, self.epoch, r.tensors, int(r.meta["step"]))
                    new = replace(span, copy=peer)
                except PeerLost as e:
                    self.note_lost(e.peer)  # left without a copy; the next boundary tries again
            self._set(new)
            if new.copy is not None:  # a lost copy counts as recovered once its stage has a new one
                for f in self.failures:
                    if f.peer == span.copy and f.recovered_at is None:
                        f.stages.append(s)
                        f.recovered_at = time.time()

    def _set(self, span: StageSpan) -> None:
        stages = list(self.assignment.stages)
        stages[span.stage] = span
        self.assignment = Assignment(epoch=self.assignment.epoch, stages=tuple(stages))

    # -- results -------------------------------------------------------------------------------
    def final_params(self) -> list[torch.Tensor]:
        """Every parameter, in the model's layer order, as the swarm holds it now."""
        return [t for i, (ts, _) in enumerate(self._gather()) for t in ts[0::3]]

    def committed_steps(self) -> list[int]:
        """Each holder's committed step count for its stage (:func:`.report.committed_steps`)."""
        return report.committed_steps(self)

    def status(self) -> dict[str, Any]:
        """What ``layerwise swarm status`` and the status page show (:func:`.report.status`)."""
        return report.status(self)
