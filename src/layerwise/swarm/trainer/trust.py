"""The trainer's side of trust: check every reply, spot-check a sample, put peers on probation, ban them.

:meth:`Trust.request` replaces a plain request to a stage's holder. The reply must be ``ok``, for
the step, stage and microbatch asked, with the tensors the stage produces (shapes, dtypes, finite
values). With probability ``spot_check`` per output (and for every output of a peer on probation)
the same forward or backward is sent at the same time to the stage's copy (or, for a stage with
replicas, another replica), which recomputes it
from the same committed weights (:mod:`..spot`); results further apart than the fp32 tolerance go
to the trainer, which recomputes the output itself from the copy's weights and blames whichever
side disagrees with it. A reply that fails raises :class:`~..guard.Rejected` naming the holder:
the driver then redoes the work elsewhere exactly as after the holder's failure, so the step is
the same as without the fault. Each rejection is a strike (:class:`~..guard.Ledger`): probation,
then a ban; a banned peer gets no more work and its stages move as after a failure.

**Trust is earned.** With spot checks on, a peer new to the run (or back after a failure) is on
probation until it has passed ``probation_checks`` checks (as a holder whose output a copy
reproduced, or as a copy that reproduced a holder's): a peer lying in a fraction q of its outputs
gets through n checks with probability (1 - q)^n, so the default 90 catches one lying in 5% with
probability 0.99, within its first steps. After that only the ``spot_check`` sample is checked,
and a peer that starts lying later is caught at that rate: a first catch after about
1 / (checked outputs a step x q) steps.

**Proof bans at once.** On a mismatch the trainer asks the holder for its weights too: when they
agree with the copy's, the trainer's recomputation is what the holder should have sent, and a side
that differs from it is *confirmed* wrong and banned at once. When they do not agree (or the
holder is gone) a mismatch is a plain strike: a lying copy with made-up weights cannot frame an
honest holder.

Cost: a checked output costs one more forward (a backward check: a forward and a backward) on the
copy's peer, run while the holder computes; probation makes that every output of the peer, and a
mismatch costs two ``get_state`` requests and one recomputation on the trainer.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from ..compress import unpack
from ..errors import PeerLost, PeerRefused, WireError
from ..guard import Expect, Ledger, Policy, Reason, Rejected, check_tensors, finite, reason_of, relative_error
from ..replay import StepCache
from ..spec import build_layers
from ..spot import U, expected, load_layers, recompute, tolerance
from ..wire import MAX_MESSAGE, Message, header_bytes
from . import copies

if TYPE_CHECKING:
    from .trainer import Trainer

# Holder and copy run the same elementwise AdamW code on the same gradients, so their weights are
# bit-identical on one kind of CPU; across machines a fused multiply-add may round differently, by a
# few units of roundoff per step. 2^10 u (6e-5 relative) leaves room for that over a long run and is
# far below what made-up weights would differ by.
WEIGHT_TOLERANCE = 1024 * U


class Trust:
    def __init__(self, tr: Trainer) -> None:
        self.tr = tr
        self.ledger = Ledger(Policy(ban_after=tr.opts.ban_after, probation_checks=tr.opts.probation_checks))
        self._failures_seen = 0  # tr.failures already read: a failed peer earns its trust again
        # which outputs are checked must be unpredictable to the peers (a seeded choice could be dodged);
        # it does not change the result, which is the same with or without checks
        self.rng = random.SystemRandom()
        self.stats: Counter[str] = Counter()  # checks, mismatches, arbitrations, checks the trainer made alone
        self._shapes = [[tuple(p.shape) for p in m.parameters()] for m in build_layers(tr.spec)]
        self._lock = threading.Lock()

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        snap = self.ledger.snapshot()
        return {"rejected": snap["rejected"], "bans": snap["bans"], "spot_checks": dict(self.stats),
                "spot_check_rate": self.tr.opts.spot_check, "checks_passed": snap["passed"],
                "probation_checks": self.tr.opts.probation_checks}  # fmt: skip

    def banned(self, peer: str | None) -> bool:
        return peer is not None and self.ledger.banned(peer)

    def on_probation(self, peer: str) -> bool:
        """Every output of ``peer`` is checked: after a strike, or (spot checks on) until it earned trust."""
        if self.ledger.on_probation(peer):
            return True
        if self.tr.opts.spot_check <= 0:
            return False  # no spot checks asked for: none for new peers either
        failures = self.tr.failures
        while self._failures_seen < len(failures):  # lost (or refused) and perhaps back as another process
            self.ledger.forget(failures[self._failures_seen].peer)
            self._failures_seen += 1
        return self.ledger.unproven(peer)

    def strike(self, peer: str, reason: Reason, confirmed: bool = False) -> str:
        verdict = self.ledger.strike(peer, reason, len(self.tr.losses), confirmed)
        if verdict == "ban":
            why = "confirmed by the trainer's own recomputation" if confirmed else "after earlier rejections"
            print(f"warning: peer {peer} is banned from this run ({reason} {why}); its stages move to other peers",
                  flush=True)  # fmt: skip
            # its copies are replaced now, so that a stage whose holder is banned next still has one;
            # the stages it holds move at their next request (driver.call_stage), between two actions
            for span in list(self.tr.assignment.stages):
                if span.copy == peer:
                    self.tr.recopy(span.stage)
        return verdict

    # -- one request ---------------------------------------------------------------------------
    def request(self, s: int, msg: Message, holder: str, cache: StepCache | None) -> Message:
        """Ask ``holder`` (stage ``s``) for ``msg``; a reply that is not to be used raises Rejected(sender=holder)."""
        checker = self._checker(s, holder)
        check = self._check_message(s, msg, holder, cache)
        result: dict[str, Any] = {}
        worker = None
        if check is not None and checker is not None:
            copies.settle(self.tr, s)  # the copy recomputes with the last committed step's weights
            worker = threading.Thread(target=self._ask_checker, args=(checker, check, result), daemon=True)
            worker.start()
        try:
            reply = self._ask(holder, msg)
            self._verify(s, msg, reply, holder)
        finally:
            if worker is not None:
                worker.join()
        if check is not None and checker is not None:
            self._compare(s, msg, check, reply, holder, checker, result)
        elif check is not None:
            self._check_alone(s, msg, check, reply, holder)
        if self.banned(holder):  # banned by another stage's thread while this request ran
            raise Rejected(f"peer {holder} was banned during {msg.describe()}", Reason.REFUSED, holder)
        return reply

    def _checker(self, s: int, holder: str) -> str | None:
        """Another holder of stage ``s``'s layers to recompute an output: its copy, else another replica."""
        span = self.tr.assignment.stages[s]
        for p in (span.copy, *span.slots):
            if p is not None and p != holder and not self.banned(p) and self.tr.membership.is_alive(p):
                return p
        return None

    def _ask(self, peer: str, msg: Message) -> Message:
        try:
            return self.tr.node.request(peer, msg, self.tr.opts.request_timeout, limit=self._limit(msg))
        except PeerRefused as e:
            raise Rejected(str(e), Reason.REFUSED, peer) from None
        except Rejected as e:
            e.sender = peer
            raise
        except WireError as e:  # an undecodable reply: garbage, truncated, oversized
            raise Rejected(str(e), reason_of(e), peer) from None

    def _limit(self, msg: Message) -> int:
        """The largest reply that can be right: the expected tensors plus room for headers and meta."""
        span = self.tr.assignment.stages[msg.stage]
        if msg.kind == "commit":
            shapes = [sh for i in span.layers for sh in self._shapes[i]]
            nbytes = 4 * sum(math.prod(sh) for sh in shapes)
        elif msg.kind in ("forward", "backward", "check"):
            kind = f"check:{msg.meta.get('what')}" if msg.kind == "check" else msg.kind
            shapes = [e.shape for e in expected(self.tr.spec, span.first, span.count, kind)[1]]
            nbytes = 8 * sum(math.prod(sh) for sh in shapes)
        else:
            return MAX_MESSAGE
        return nbytes + (64 << 10) + header_bytes([len(sh) for sh in shapes])  # room for the meta, then the headers

    def _verify(self, s: int, msg: Message, reply: Message, peer: str) -> None:
        what = f"peer {peer}'s reply to {msg.describe()}"
        if reply.kind != "ok":
            raise Rejected(f"{what}: a {reply.kind!r} message", Reason.MALFORMED, peer)
        if msg.kind == "commit":
            if reply.step != msg.step or reply.stage != msg.stage:
                raise Rejected(f"{what} is for step {reply.step}, stage {reply.stage}", _routing(msg, reply), peer)
            if not reply.meta.get("already") and msg.meta.get("reply_grads", True):  # else none come back
                span = self.tr.assignment.stages[s]
                shapes = [sh for i in span.layers for sh in self._shapes[i]]
                check_tensors(reply.tensors, [Expect(sh, True) for sh in shapes], what)
            return
        if msg.kind not in ("forward", "backward", "check"):
            return
        if (reply.step, reply.stage, reply.mb) != (msg.step, msg.stage, msg.mb):
            raise Rejected(f"{what} is for step {reply.step}, stage {reply.stage}, microbatch {reply.mb}",
                           _routing(msg, reply), peer)  # fmt: skip
        span = self.tr.assignment.stages[s]
        kind = f"check:{msg.meta['what']}" if msg.kind == "check" else msg.kind
        _, want = expected(self.tr.spec, span.first, span.count, kind)
        try:
            # a compressed reply (--compress) is checked as the values it stands for
            tensors = unpack(reply.meta, reply.tensors, what)
        except WireError as e:
            raise Rejected(str(e), reason_of(e), peer) from None
        try:
            check_tensors(tensors, want, what)
        except Rejected as e:
            e.sender = peer
            raise

    # -- spot checks ---------------------------------------------------------------------------
    def _check_message(self, s: int, msg: Message, holder: str, cache: StepCache | None) -> Message | None:
        if msg.kind not in ("forward", "backward") or cache is None:
            return None
        if not self.tr.opts.compress.exact:
            return None  # a lossy codec's error is far above the fp32 tolerance: no check could pass
        if msg.kind == "backward" and s == 0:
            return None  # the first stage's backward returns nothing to compare (token ids have no gradient)
        with self._lock:
            chosen = self.on_probation(holder) or self.rng.random() < self.tr.opts.spot_check
        if not chosen:
            return None
        last = s == cache.stages - 1
        weight = 1.0 / cache.microbatches
        if msg.kind == "forward":
            tensors = list(msg.tensors)
        else:
            x = cache.inputs[s][msg.mb]
            tensors = [x] + ([cache.targets[msg.mb]] if last else []) + list(msg.tensors)
        return Message("check", msg.step, s, msg.mb, msg.epoch, {"what": msg.kind, "weight": weight}, tensors)

    def _ask_checker(self, copy: str, check: Message, result: dict[str, Any]) -> None:
        try:
            reply = self._ask(copy, check)
            self._verify(check.stage, check, reply, copy)
            result["reply"] = reply
        except BaseException as e:  # reported by _compare
            result["error"] = e

    def _compare(self, s: int, msg: Message, check: Message, reply: Message, holder: str, copy: str,
                 result: dict[str, Any]) -> None:  # fmt: skip
        err = result.get("error")
        if isinstance(err, Rejected):  # the checker sent something unusable: its strike, not the holder's
            self.strike(copy, err.reason)
        if err is not None:  # (or it is gone: the boundary replaces a dead copy) the trainer checks alone
            self._check_alone(s, msg, check, reply, holder)
            return
        self.stats["checks"] += 1
        span = self.tr.assignment.stages[s]
        tol = tolerance(self.tr.spec, span.count, msg.kind)
        other: Message = result["reply"]
        if _agree(reply.tensors, other.tensors, tol):
            self.ledger.passes(holder)
            self.ledger.passes(copy)
            return
        self.stats["mismatches"] += 1
        local, confirmed = self._arbitrate(s, check, holder, copy)
        holder_ok = local is not None and _agree(reply.tensors, local, tol)
        checker_ok = local is not None and _agree(other.tensors, local, tol)
        if confirmed:
            self.stats["confirmed"] += 1
        for peer, ok in ((holder, holder_ok), (copy, checker_ok)):
            if ok:
                self.ledger.passes(peer)
            elif peer == copy or confirmed:  # the holder's plain strike is the driver's (call_stage)
                self.strike(peer, Reason.MISMATCH, confirmed=confirmed)
        if not holder_ok:
            raise Rejected(f"peer {holder}'s {msg.describe()} differs from its recomputation by another holder "
                           f"(beyond the fp32 tolerance {tol:.1e})", Reason.MISMATCH, holder)  # fmt: skip

    def _check_alone(self, s: int, msg: Message, check: Message, reply: Message, holder: str) -> None:
        """No other holder could recompute a chosen output (none alive and unbanned, or its answer was
        unusable): the trainer recomputes it itself from the holder's own weights. A chosen output is
        never used unchecked, least of all a peer's on probation. Without a second holder this catches a
        wrong output (the holder's weights do not produce it: proof, banned at once), not made-up
        weights; those are compared with the copy's at the next check that has one."""
        self.stats["alone"] += 1
        try:
            local, _ = self._recompute_with(holder, s, check)
        except (PeerLost, PeerRefused, WireError, ValueError) as e:  # its output cannot be checked: not used
            raise Rejected(f"peer {holder}'s {msg.describe()} could not be checked: {e}", Reason.MISMATCH,
                           holder) from None  # fmt: skip
        self.stats["checks"] += 1
        if _agree(reply.tensors, local, tolerance(self.tr.spec, self.tr.assignment.stages[s].count, msg.kind)):
            self.ledger.passes(holder)
            return
        self.stats["mismatches"] += 1
        self.stats["confirmed"] += 1
        self.strike(holder, Reason.MISMATCH, confirmed=True)
        raise Rejected(f"peer {holder}'s {msg.describe()} differs from what its own weights give (recomputed by "
                       f"the trainer)", Reason.MISMATCH, holder)  # fmt: skip

    def _arbitrate(self, s: int, check: Message, holder: str, copy: str) -> tuple[list[torch.Tensor] | None, bool]:
        """The trainer recomputes the output itself, from the copy's committed weights.

        Returns the output and whether it is *confirmed*: the holder's weights agree with the copy's,
        so it is what both should have sent (a copy that made up its weights cannot frame a holder)."""
        self.stats["arbitrations"] += 1
        try:
            local, state = self._recompute_with(copy, s, check)
        except (PeerLost, PeerRefused, WireError, ValueError):
            return None, False  # no arbiter: both sides are treated as wrong, the work is redone elsewhere
        try:
            theirs = self.tr.node.request(holder, Message("get_state", stage=s, epoch=self.tr.epoch))
        except (PeerLost, WireError):
            return local, False
        return local, _same_weights(theirs.tensors[0::3], state[0::3])

    def _recompute_with(self, peer: str, s: int, check: Message) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The checked output recomputed by the trainer from ``peer``'s weights of stage ``s``, and that state."""
        span = self.tr.assignment.stages[s]
        state = self.tr.node.request(peer, Message("get_state", stage=s, epoch=self.tr.epoch))
        finite(state.tensors, f"peer {peer}'s weights of stage {s}")
        layers = load_layers(self.tr.spec, span.first, span.count, state.tensors)
        last = span.first + span.count == self.tr.spec.layers
        local = recompute(layers, is_first=span.first == 0, is_last=last, what=str(check.meta["what"]),
                          tensors=list(check.tensors), weight=float(check.meta["weight"]))  # fmt: skip
        return local, state.tensors


def _same_weights(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Holder and copy apply the same AdamW update to the same gradients: equal up to a few roundings."""
    return len(a) == len(b) and all(relative_error(x, y) <= WEIGHT_TOLERANCE for x, y in zip(a, b))


def _agree(a: list[torch.Tensor], b: list[torch.Tensor], tol: float) -> bool:
    return len(a) == len(b) and all(relative_error(x, y) <= tol for x, y in zip(a, b))


def _routing(msg: Message, reply: Message) -> Reason:
    if reply.stage != msg.stage:
        return Reason.WRONG_STAGE
    if reply.step < msg.step:
        return Reason.REPLAYED
    return Reason.OUT_OF_ORDER
