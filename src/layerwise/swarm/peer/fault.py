"""``--fault MODE:P[@STEP]``: a peer that lies in a fraction P of its outputs, to test and measure the defenses.

``@STEP``: it is honest until the trainer's step STEP (a peer that first earns trust, then lies).

Modes (each applies to the replies that carry a stage's outputs: forward, backward and spot checks):

- ``corrupt``: adds noise of 5% of the output's largest value (:func:`..spot.corrupt`); the reply
  is well-formed and finite, so only a spot check can find it;
- ``nan``: one value becomes NaN; ``shape``: the output gets an extra leading dimension;
- ``stale``: the reply claims the previous step; ``garbage``: the reply's bytes are random;
  ``oversized``: 4 MiB of zeros follow the reply.

The peer counts what it tampered with (``tampered`` in its status), which is how the benchmark
measures the detection rate. The choice of outputs is seeded (``seed``), so runs repeat.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field

import torch

from ..spot import corrupt
from ..wire import Message

MODES = ("corrupt", "nan", "shape", "stale", "garbage", "oversized")
_OUTPUTS = ("forward", "backward", "check")


def parse_tamper(text: str) -> tuple[str, float, int] | None:
    """``corrupt:0.05`` -> ("corrupt", 0.05, 0); ``corrupt:0.05@30`` -> (..., 30); empty -> None; else ValueError."""
    if not text:
        return None
    mode, _, rest = text.partition(":")
    p, at, start = rest.partition("@")
    try:
        prob = float(p)
        first = int(start) if at else 0
    except ValueError:
        prob, first = -1.0, 0
    if mode not in MODES or not 0.0 < prob <= 1.0 or first < 0:
        raise ValueError(f"--fault {text!r}: expected MODE:P[@STEP] with MODE one of {', '.join(MODES)}, "
                         f"0 < P <= 1 and STEP >= 0 (the first step it lies in)")  # fmt: skip
    return mode, prob, first


@dataclass
class Tamper:
    mode: str
    p: float
    seed: int = 0
    start: int = 0  # the first step it lies in
    tampered: int = 0  # outputs this peer lied in
    _rng: random.Random = field(init=False, repr=False)
    _gen: torch.Generator = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def apply(self, request: Message, reply: Message) -> tuple[Message, str]:
        """The reply to send instead, and what to do to its bytes: "" (nothing), "garbage" or "oversized"."""
        if request.kind not in _OUTPUTS or reply.kind != "ok" or not reply.tensors or request.step < self.start:
            return reply, ""
        with self._lock:
            if self._rng.random() >= self.p:
                return reply, ""
            self.tampered += 1
            if self.mode in ("garbage", "oversized"):
                return reply, self.mode
            if self.mode == "stale":
                reply.step -= 1
                return reply, ""
            t = reply.tensors[0].detach().clone()
            if self.mode == "corrupt":
                t = corrupt(t, self._gen)
            elif self.mode == "nan":
                t.view(-1)[0] = float("nan")
            else:  # shape
                t = t.unsqueeze(0)
            reply.tensors = [t, *reply.tensors[1:]]
            return reply, ""


def spoil(data: bytes, how: str) -> bytes:
    if how == "garbage":
        return os.urandom(len(data))
    if how == "oversized":
        return data + bytes(4 << 20)
    return data
