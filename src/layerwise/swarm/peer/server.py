"""A swarm peer: announces itself, holds the spans it is given, and serves them.

One zenoh queryable per peer; requests are served one at a time in arrival order (the peer's
compute is the bottleneck, and serial handling keeps every span's state changes ordered). What a
peer does with each kind of message:

- ``hello``: measure capacity for the trainer's spec, reply speed and memory.
- ``reset`` / ``install`` / ``promote`` / ``drop``: drop all its spans; build one (from the seed,
  or from a hand-over of weights and AdamW state); turn a copy into the stage's holder; drop a copy.
- ``forward`` / ``backward``: one microbatch through a held stage (runtime :class:`Stage`).
- ``commit``: one AdamW step from the accumulated gradients; the gradients go back to the trainer,
  which relays them to the stage's copy (``backup_apply``). The commit may carry gradients that
  replace the peer's own (the sum over a stage's replicas, or a tied weight's sum over its stages)
  and a clip coefficient (``max_grad_norm``); ``grads`` reports a group's gradients (or only their
  norms) and a cross-tied weight's per-microbatch gradients before such a commit.
- ``get_state`` / ``status``: hand-over and monitoring.

Stale messages (an older step or assignment epoch) and duplicates (a second backward of one
microbatch, a second commit of one step) are refused or acknowledged without effect, never applied.
Test hooks: ``LAYERWISE_SWARM_FAULT=kill:forward:2:1`` makes the peer SIGKILL (``stop:`` SIGSTOP)
itself while serving that kind of request at that step and microbatch (``*`` matches any);
``--fault corrupt:0.05`` (and ``nan``, ``shape``, ``stale``, ``garbage``) makes it lie in a fraction of
its outputs (:mod:`.fault`). Every refused request is counted by its reason (:mod:`..guard`), and
``check`` recomputes another holder's output for a spot check (:mod:`.checks`).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from typing import Any

import torch
import zenoh

from ..net import alive_key, config, open_session, peer_key
from ..assignment import layer_costs
from ..compress import Streams, pack_reply, unpack
from ..spec import SwarmSpec, init_checksum
from ..guard import Ledger, Reason, Rejected, reason_of
from ..wire import Message, decode_message, encode_message, error
from .capacity import block_seconds, default_memory_bytes
from .checks import run_check, validate
from .fault import Tamper, parse_tamper, spoil
from .options import PeerOptions, identity_of, parse_fault_hook
from .state import Span

ALONE_S = 5.0  # after this long with no link, a peer says it is alone (a refused TLS handshake is silent)


class Peer:
    def __init__(self, opts: PeerOptions) -> None:
        self.opts = opts
        self.id = opts.name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.identity, self.guard = identity_of(opts)
        if self.identity is not None:
            self.id = self.identity.name
        self.spans: dict[int, Span] = {}
        self.spec: SwarmSpec | None = None
        self.epoch = 0
        self.block_s: dict[str, float] = {}
        self.checksum: dict[str, float] = {}
        self.fault = parse_fault_hook(os.environ.get("LAYERWISE_SWARM_FAULT", ""))
        mode = parse_tamper(opts.fault)
        self.tamper = Tamper(mode[0], mode[1], start=mode[2], seed=zlib.crc32(self.id.encode())) if mode else None
        self.ledger = Ledger()  # what this peer refused, by reason
        self.served = 0
        self.streams: dict[int, Streams] = {}  # per held stage: error feedback of what it sends (compress.py)

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        if msg.kind not in ("hello", "status", "get_state") and msg.epoch < self.epoch:
            raise _Refuse(f"stale assignment epoch {msg.epoch} (peer is at {self.epoch})", Reason.REPLAYED)
        fn = getattr(self, f"_on_{msg.kind}", None)
        if fn is None:
            raise _Refuse(f"peer {self.id} does not serve {msg.kind!r}", Reason.MALFORMED)
        if msg.kind in ("forward", "backward", "check"):
            if "packed" in msg.meta:  # compressed inputs (--compress): checked and used as the values they stand for
                msg = dataclasses.replace(msg, meta={k: v for k, v in msg.meta.items() if k != "packed"},
                                          tensors=unpack(msg.meta, msg.tensors, msg.describe()))  # fmt: skip
            validate(self._span(msg), msg)
        self._maybe_fault(msg)
        t0 = time.perf_counter()
        reply = fn(msg)
        if msg.kind in ("forward", "backward", "commit", "backup_apply", "check", "grads") and self.opts.speed != 1.0:
            time.sleep((time.perf_counter() - t0) * (1.0 / self.opts.speed - 1.0))  # emulated slower device
        return reply

    def _maybe_fault(self, msg: Message) -> None:
        if self.fault is None:
            return
        action, kind, step, mb = self.fault
        if kind == msg.kind and step in (None, msg.step) and mb in (None, msg.mb):
            os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)

    def _span(self, msg: Message, role: str | None = None) -> Span:
        span = self.spans.get(msg.stage)
        if span is None or (role is not None and span.role != role):
            raise _Refuse(f"peer {self.id} holds no {role or 'copy'} of stage {msg.stage} (it has {self._have()})",
                          Reason.WRONG_STAGE)  # fmt: skip
        return span

    def _have(self) -> str:
        return ", ".join(f"stage {s} as {sp.role}" for s, sp in sorted(self.spans.items())) or "nothing"

    def _on_hello(self, msg: Message) -> Message:
        spec = SwarmSpec.from_json(msg.meta["spec"])
        key = repr(spec.to_json())
        if key not in self.block_s:
            self.block_s[key] = block_seconds(spec) / self.opts.speed
            self.checksum[key] = init_checksum(spec)
        return Message("ok", meta=self._info() | {"block_s": self.block_s[key], "checksum": self.checksum[key]})

    def _info(self) -> dict[str, Any]:
        mem = self.opts.memory_gib * (1 << 30) if self.opts.memory_gib else default_memory_bytes()
        info = {"peer": self.id, "speed": self.opts.speed, "memory_bytes": mem, "epoch": self.epoch,
                "spans": [s.describe() for s in self.spans.values()], "served": self.served,
                "rejected": dict(self.ledger.rejected), "tampered": self.tamper.tampered if self.tamper else 0}  # fmt: skip
        if self.guard is not None:
            info |= {"identity": self.id, "refused": self.guard.refusals.list()}
        return info

    def _on_status(self, msg: Message) -> Message:
        return Message("ok", meta=self._info())

    def _on_reset(self, msg: Message) -> Message:
        self.spans.clear()
        self.streams.clear()
        self.epoch = msg.epoch
        return Message("ok")

    def _on_install(self, msg: Message) -> Message:
        spec = SwarmSpec.from_json(msg.meta["spec"])
        first, count, role = int(msg.meta["first"]), int(msg.meta["count"]), str(msg.meta["role"])
        if role not in ("holder", "copy") or not (0 <= first and count >= 1 and first + count <= spec.layers):
            raise _Refuse(f"bad install: layers {first}+{count} as {role!r} of a {spec.layers}-layer model",
                          Reason.MALFORMED)  # fmt: skip
        others = [sp for sp in self.spans.values() if sp.stage != msg.stage]
        need = sum(sum(layer_costs(sp.spec)[1][sp.first : sp.first + sp.count]) for sp in others)
        need += sum(layer_costs(spec)[1][first : first + count])  # 16 bytes per parameter, fp32 AdamW
        budget = self._info()["memory_bytes"]
        if need > budget:
            raise _Refuse(f"peer {self.id} has a memory budget of {budget / 2**30:.2f} GiB; stage {msg.stage} "
                          f"(layers {first}-{first + count - 1}) with what it holds needs {need / 2**30:.2f} GiB",
                          Reason.REFUSED)  # fmt: skip
        self.spec, self.epoch = spec, msg.epoch
        span = Span(spec, stage=msg.stage, first=first, count=count, role=role, where=f"peer {self.id} (stage {msg.stage})")
        if msg.tensors:
            span.load(msg.tensors, int(msg.meta["step"]))
        self.spans[msg.stage] = span
        self.streams.pop(msg.stage, None)
        return Message("ok", meta={"step": span.step})

    def _on_drop(self, msg: Message) -> Message:
        span = self._span(msg, "copy")
        del self.spans[span.stage]
        return Message("ok")

    def _on_promote(self, msg: Message) -> Message:
        span = self._span(msg)
        span.make_holder()
        self.streams.pop(msg.stage, None)
        return Message("ok", meta={"step": span.step})

    def _on_forward(self, msg: Message) -> Message:
        span = self._span(msg, "holder")
        self._check_step(span, msg)
        if msg.mb in span.bwd_done:
            raise _Refuse(f"duplicate forward of microbatch {msg.mb}: its backward already ran", Reason.REPLAYED)
        assert span.runner is not None
        inputs = unpack(msg.meta, msg.tensors, msg.describe())
        x = inputs[0]
        target = inputs[1] if span.runner.is_last else None
        out = span.runner.forward(msg.mb, x, target, float(msg.meta.get("weight", 1.0)))
        span.fwd_done.add(msg.mb)
        return self._reply(msg, "fwd", [out.detach()])

    def _on_backward(self, msg: Message) -> Message:
        span = self._span(msg, "holder")
        self._check_step(span, msg)
        if msg.mb in span.bwd_done:
            raise _Refuse(f"duplicate backward of microbatch {msg.mb}", Reason.REPLAYED)
        if msg.mb not in span.fwd_done:
            raise _Refuse(f"backward of microbatch {msg.mb} before its forward", Reason.OUT_OF_ORDER)
        runner = span.runner
        assert runner is not None
        inputs = None if runner.is_last else unpack(msg.meta, msg.tensors, msg.describe())
        group = int(msg.meta.get("group", 0))  # a replica's slot: its microbatches' gradients are summed apart
        grads = span.accumulate(group, msg.mb, lambda: runner.backward(msg.mb, inputs))
        span.bwd_done.add(msg.mb)
        return self._reply(msg, "bwd", list(grads))

    def _reply(self, msg: Message, direction: str, tensors: list[torch.Tensor]) -> Message:
        """Compressed as the request asks (``meta['compress']``); error feedback per stage and stream."""
        streams = self.streams.setdefault(msg.stage, Streams())
        meta, wire = pack_reply(msg.meta.get("compress"), streams, msg.step, direction, msg.mb, tensors)
        return Message("ok", msg.step, msg.stage, msg.mb, meta=meta, tensors=wire)

    def _on_commit(self, msg: Message) -> Message:
        span = self._span(msg, "holder")
        if span.step == msg.step + 1:
            return Message("ok", msg.step, msg.stage, meta={"already": True})  # a duplicate commit
        self._check_step(span, msg)
        want = int(msg.meta["microbatches"])
        replace = [int(i) for i in msg.meta.get("replace", [])]
        if len(replace) != len(msg.tensors) or any(not 0 <= i < len(span.unique) for i in replace):
            raise _Refuse(f"commit of step {msg.step} replaces gradients {replace} with {len(msg.tensors)} tensors",
                          Reason.MALFORMED)  # fmt: skip
        if len(replace) < len(span.unique) and len(span.bwd_done) != want:
            raise _Refuse(f"commit of step {msg.step} after {len(span.bwd_done)} of {want} backwards",
                          Reason.OUT_OF_ORDER)  # fmt: skip
        grads = span.grads()
        for i, g in zip(replace, msg.tensors):
            grads[i] = g.to(span.unique[i].dtype).clone()
        if msg.meta.get("clip") is not None:  # the trainer's clip_grad_norm_ coefficient (fp32, as torch's)
            coef = torch.tensor(float(msg.meta["clip"]), dtype=torch.float32)
            for g in grads:
                g.mul_(coef)
        span.apply(grads, float(msg.meta["lr"]))
        if msg.stage in self.streams:
            self.streams[msg.stage].commit(msg.step)
        keep = msg.meta.get("reply_grads", True)  # only a stage with a copy needs them back
        return Message("ok", msg.step, msg.stage, meta={"already": False}, tensors=grads if keep else [])

    def _on_grads(self, msg: Message) -> Message:
        """A group's summed gradients (``full``) or only their norms, and the per-microbatch gradients
        of cross-tied weights for the group's microbatches ``mbs``: what the trainer needs to sum
        replicas, sum a tie, or compute the global norm before the commit."""
        span = self._span(msg, "holder")
        self._check_step(span, msg)
        group, mbs = int(msg.meta.get("group", 0)), [int(m) for m in msg.meta.get("mbs", [])]
        if span.counts.get(group, 0) != len(mbs) or any((i, m) not in span.tied for i in span.cross for m in mbs):
            raise _Refuse(f"gradients of group {group} asked after {span.counts.get(group, 0)} of {len(mbs)} backwards",
                          Reason.OUT_OF_ORDER)  # fmt: skip
        grads = span.grads(group)
        tied = [[i, m] for i in sorted(span.cross) for m in mbs]
        meta = {"norms": [float(torch.linalg.vector_norm(g, 2.0)) for g in grads], "tied": tied}
        tensors = (grads if msg.meta.get("full") else []) + [span.tied[(i, m)] for i, m in tied]
        return Message("ok", msg.step, msg.stage, meta=meta, tensors=tensors)

    def _on_backup_apply(self, msg: Message) -> Message:
        span = self._span(msg, "copy")
        if span.step == msg.step + 1:
            return Message("ok", meta={"already": True})
        self._check_step(span, msg)
        span.apply(list(msg.tensors), float(msg.meta["lr"]))
        return Message("ok", meta={"already": False})

    def _on_check(self, msg: Message) -> Message:
        span = self._span(msg)  # the copy (or any holder) of the stage recomputes one output
        self._check_step(span, msg)
        return Message("ok", msg.step, msg.stage, msg.mb, tensors=run_check(span, msg))

    def _on_get_state(self, msg: Message) -> Message:
        span = self._span(msg)
        return Message("ok", stage=msg.stage, meta=span.describe(), tensors=span.export())

    @staticmethod
    def _check_step(span: Span, msg: Message) -> None:
        if msg.step != span.step:
            why = Reason.REPLAYED if msg.step < span.step else Reason.OUT_OF_ORDER
            raise _Refuse(f"stale or early {msg.describe()}: stage {span.stage} here has committed {span.step} steps",
                          why)  # fmt: skip

    # -- serving -------------------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None, ready: Any = None) -> None:
        stop = stop or threading.Event()
        torch.set_num_threads(self.opts.threads)
        cfg = config(listen=self.opts.listen, connect=self.opts.join, lease_ms=self.opts.lease_ms,
                     identity=self.identity, relay=self.opts.relay)  # fmt: skip
        work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with open_session(cfg, f"peer {self.id}", self.opts.relay, self.identity) as session:
            qbl = session.declare_queryable(peer_key(self.opts.swarm, self.id), zenoh.handlers.Callback(work.put))
            token = session.liveliness().declare_token(alive_key(self.opts.swarm, self.id))
            if ready is not None:
                ready(self)
            alone = threading.Timer(ALONE_S, self._say_if_alone, (session,))
            alone.daemon = True
            alone.start()
            try:
                while not stop.is_set():
                    try:
                        query = work.get(timeout=0.25)
                    except queue.Empty:
                        continue
                    self._serve_one(query)
            finally:
                alone.cancel()
                token.undeclare()
                qbl.undeclare()

    def _say_if_alone(self, session: zenoh.Session) -> None:
        """zenoh refuses a TLS link in silence: a peer linked to no one says so, by its name."""
        if self.opts.join and not list(session.info.peers_zid()) and not list(session.info.routers_zid()):
            how = ("mutual TLS refuses a certificate of another swarm's CA, an expired one, or none"
                   if self.identity else "a swarm that runs with --identity refuses processes without one")  # fmt: skip
            print(f"peer {self.id}: linked to no process of swarm {self.opts.swarm!r} at {', '.join(self.opts.join)} "
                  f"after {ALONE_S:.0f} s ({how}; or nobody listens there)", file=sys.stderr, flush=True)  # fmt: skip

    def _serve_one(self, query: Any) -> None:
        raw = query.payload.to_bytes() if query.payload is not None else b""
        self._delay(len(raw))
        adm = self.guard.admit_query(query, raw) if self.guard is not None else None
        garbled = ""
        try:
            if adm is not None and adm.session is None:  # a step of the hello, or refused before decoding
                raise _Answer(Message("ok") if adm.hello is not None else error(str(adm.refused)))
            msg = decode_message(raw, "the trainer", self.opts.max_message)
            try:
                reply = self.handle(msg)
                if self.tamper is not None:
                    reply, garbled = self.tamper.apply(msg, reply)
            except Rejected as r:
                self.ledger.count(r.reason)
                reply = error(str(r), msg)
            except (ValueError, KeyError, TypeError) as e:
                self.ledger.count(Reason.MALFORMED)
                reply = error(f"{type(e).__name__}: {e}", msg)
        except _Answer as a:
            reply = a.reply
        except Exception as e:  # a malformed message: answer with the reason, keep serving
            self.ledger.count(reason_of(e))
            reply = error(f"{type(e).__name__}: {e}")
        self.served += 1
        try:
            data = encode_message(reply)
        except Exception as e:  # a reply that cannot be encoded is answered with why, not a dead peer
            data = encode_message(error(f"peer {self.id} could not encode its reply: {type(e).__name__}: {e}"))
        data = spoil(data, garbled)
        self._delay(len(data))
        query.reply(query.key_expr, data, attachment=adm.attachment(data) if adm is not None else None)
        query.drop()  # ends the query now: the trainer's get returns without waiting for a timeout

    def _delay(self, nbytes: int) -> None:
        secs = self.opts.latency_ms / 1000.0
        if self.opts.bandwidth_mbit:
            secs += nbytes * 8 / (self.opts.bandwidth_mbit * 1e6)
        if secs > 0:
            time.sleep(secs)


class _Refuse(Rejected):
    """A request this peer will not apply: stale, duplicate, or for a stage it does not hold."""

    def __init__(self, text: str, reason: Reason) -> None:
        super().__init__(text, reason)


class _Answer(Exception):
    """Answer with this reply without serving (the hello, or a request refused by access control)."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply


def serve(opts: PeerOptions, *, on_ready: Any = None) -> None:
    """Run a peer until SIGINT / SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    peer = Peer(opts)
    peer.serve(stop, on_ready)
    print(f"peer {peer.id} left swarm {opts.swarm!r}", flush=True)
