"""Hostile input on the wire: every rejected message gets a named reason, a count, and a sender's strike.

Both sides of the swarm check what they receive before using it:

- a peer checks each request from the trainer (:mod:`.peer.checks`): that it decodes within the
  size limit, is for a stage it holds, is for the step and microbatch that come next (not an
  older one replayed, not one from the future), and that its tensors have the shapes and dtypes
  the stage expects, finite values and token ids inside the vocabulary;
- the trainer checks each reply from a peer (:mod:`.trainer.trust`): the same, plus the spot
  checks that recompute a sample of the peer's outputs on another holder of the same layers.

A rejected request or reply is never applied. The trainer treats a peer's rejected reply like a
failure of that peer: the work is redone elsewhere (the stage's copy or a spare takes over and
the step's completed work is replayed), so no step is lost and the result stays equal to a
failure-free run. Each rejection is a strike against the sender: the first puts it on
*probation* (every output it sends is spot-checked), repeated ones ban it (it gets no work for the
rest of the run and its stages move as after a failure). A spot-check mismatch that the trainer
*confirmed* (it recomputed the output itself from weights that the holder and the copy agree on)
is proof rather than suspicion and bans at once. With spot checks on, trust is also earned: a peer
new to the run (or back after a failure) is on probation until it has passed
``Policy.probation_checks`` checks.

A peer cannot tell who sent a request (zenoh queries carry no sender identity unless the sender
sets it, which a hostile sender would forge), so it counts what it refuses but blames no one;
with mutual TLS and access control, only an authenticated trainer reaches a peer at all.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .errors import WireError


class Reason(str, Enum):
    """Why a message was rejected; the value is what ``status()["rejected"]`` counts."""

    GARBAGE = "garbage"  # not a layerwise swarm message: magic, version, kind or meta
    TRUNCATED = "truncated"  # shorter than its own headers say
    OVERSIZED = "oversized"  # over the receiver's size limit
    MALFORMED = "malformed"  # decodes, but its fields do not fit together or miss a key
    REPLAYED = "replayed"  # an older step or epoch, or a duplicate of work already done
    OUT_OF_ORDER = "out_of_order"  # a later step, or a backward before its forward
    WRONG_STAGE = "wrong_stage"  # for (or from) a stage the other side does not hold
    NONFINITE = "nonfinite"  # a tensor with NaN or Inf
    BAD_SHAPE = "bad_shape"  # a tensor whose count, shape or dtype does not fit the stage
    BAD_VALUE = "bad_value"  # a token id outside the vocabulary
    REFUSED = "refused"  # a peer answered a valid request with an error
    MISMATCH = "mismatch"  # a spot check recomputed the output and got another result

    def __str__(self) -> str:
        return self.value


class Rejected(WireError):
    """A message that is refused, with its :class:`Reason` (and the sender, where it is known)."""

    def __init__(self, text: str, reason: Reason, sender: str | None = None) -> None:
        super().__init__(text, reason=reason)
        self.sender = sender


def reason_of(err: BaseException) -> Reason:
    """The named reason of a wire error (a plain decoding error is ``malformed``)."""
    r = getattr(err, "reason", None)
    try:
        return Reason(str(r))
    except ValueError:
        return Reason.MALFORMED


# -- tensor checks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """A tensor a stage expects: its shape, whether it is floating point, and (for token ids) a bound."""

    shape: tuple[int, ...]
    floating: bool
    below: int | None = None  # integer values must lie in [0, below)


def check_tensors(tensors: list[torch.Tensor], expect: list[Expect], what: str) -> None:
    """Raise :class:`Rejected` unless ``tensors`` match ``expect``: count, shape, dtype, finite, range."""
    if len(tensors) != len(expect):
        raise Rejected(f"{what}: {len(tensors)} tensors, expected {len(expect)}", Reason.BAD_SHAPE)
    for i, (t, e) in enumerate(zip(tensors, expect)):
        if tuple(t.shape) != e.shape or t.is_floating_point() != e.floating or t.is_complex():
            kind = "floating" if e.floating else "integer"
            raise Rejected(f"{what}: tensor {i} is {t.dtype} {tuple(t.shape)}, expected {kind} {e.shape}",
                           Reason.BAD_SHAPE)  # fmt: skip
        if e.floating:
            if t.numel() and not all_finite(t):
                raise Rejected(f"{what}: tensor {i} holds NaN or Inf", Reason.NONFINITE)
        elif e.below is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= e.below):
            raise Rejected(f"{what}: tensor {i} holds ids outside [0, {e.below})", Reason.BAD_VALUE)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A NaN or an Inf anywhere makes the sum NaN or Inf (Inf - Inf is NaN),
    so a finite sum proves every element finite without ``isfinite``'s bool copy of the tensor
    (11-13 ms for the 16 MB of gradients in a commit reply, against about 1 ms); a sum that
    overflowed from finite values falls back to the exact test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def finite(tensors: list[torch.Tensor], what: str) -> None:
    for i, t in enumerate(tensors):
        if t.is_floating_point() and t.numel() and not all_finite(t):
            raise Rejected(f"{what}: tensor {i} holds NaN or Inf", Reason.NONFINITE)


# -- the ledger: counts, strikes, probation, bans ---------------------------------------------
# A peer that lies in a fraction q of its outputs passes n checks in a row with probability
# (1 - q)^n: 90 checks catch one lying in 5% of its outputs with probability 1 - 0.95^90 = 0.99.
PROBATION_CHECKS = 90


@dataclass(frozen=True, kw_only=True)
class Policy:
    probation_after: int = 1  # strikes that put a peer on probation (every output spot-checked)
    ban_after: int = 2  # strikes that ban it for the rest of the run
    ban_on_proof: bool = True  # a confirmed mismatch (recomputed by the trainer itself) bans at once
    probation_checks: int = PROBATION_CHECKS  # checks a new peer passes before it leaves probation

    def __post_init__(self) -> None:
        if not 1 <= self.probation_after <= self.ban_after:
            raise ValueError(f"need 1 <= probation_after <= ban_after, got {self.probation_after}, {self.ban_after}")
        if self.probation_checks < 0:
            raise ValueError(f"--probation-checks must be >= 0, got {self.probation_checks}")


@dataclass
class Ledger:
    """What was rejected and who is to blame; thread-safe (every stage's thread reports here)."""

    policy: Policy = field(default_factory=Policy)
    rejected: Counter[str] = field(default_factory=Counter)
    strikes: dict[str, int] = field(default_factory=dict)
    probation: dict[str, int] = field(default_factory=dict)  # peer -> step it went on probation (kept after a ban)
    bans: list[dict[str, Any]] = field(default_factory=list)
    passed: Counter[str] = field(default_factory=Counter)  # spot checks each peer passed (reset on a return)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, reason: Reason) -> None:
        with self._lock:
            self.rejected[str(reason)] += 1

    def strike(self, peer: str, reason: Reason, step: int, confirmed: bool = False) -> str:
        """Count a rejection from ``peer``; returns ``"ban"`` (banned now), ``"banned"`` (already),
        ``"probation"`` or ``"counted"``.

        ``confirmed``: the trainer itself recomputed the output and ``peer``'s differs (proof, not suspicion)."""
        with self._lock:
            self.rejected[str(reason)] += 1
            if self._banned(peer):
                return "banned"  # two stages' threads may reject one peer at once: it is banned once
            n = self.strikes[peer] = self.strikes.get(peer, 0) + 1
            if n >= self.policy.ban_after or (confirmed and self.policy.ban_on_proof):
                self.bans.append({"peer": peer, "reason": str(reason), "step": step, "confirmed": confirmed})
                self.probation.setdefault(peer, step)
                return "ban"
            if n >= self.policy.probation_after:
                self.probation.setdefault(peer, step)
                return "probation"
            return "counted"

    def _banned(self, peer: str) -> bool:
        return any(b["peer"] == peer for b in self.bans)

    def banned(self, peer: str) -> bool:
        with self._lock:
            return self._banned(peer)

    def banned_peers(self) -> set[str]:
        with self._lock:
            return {b["peer"] for b in self.bans}

    def on_probation(self, peer: str) -> bool:
        """On probation after a strike (a banned peer is not: it gets no work at all)."""
        with self._lock:
            return peer in self.probation and not self._banned(peer)

    def unproven(self, peer: str) -> bool:
        """Has not passed ``probation_checks`` spot checks yet (new, or back after a failure)."""
        with self._lock:
            return self.passed[peer] < self.policy.probation_checks and not self._banned(peer)

    def passes(self, peer: str) -> None:
        with self._lock:
            self.passed[peer] += 1

    def forget(self, peer: str) -> None:
        """``peer`` failed and may come back as another process: its trust is to be earned again."""
        with self._lock:
            self.passed.pop(peer, None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            banned = {b["peer"] for b in self.bans}
            return {"rejected": dict(self.rejected), "bans": [dict(b) for b in self.bans], "passed": dict(self.passed),
                    "probation": {p: s for p, s in self.probation.items() if p not in banned}}  # fmt: skip


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the norm-wise error the spot checks compare to their tolerance."""
    if got.shape != want.shape:
        return math.inf
    if not got.numel():
        return 0.0
    diff = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    if not (math.isfinite(diff) and math.isfinite(scale)):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
