"""What a peer checks in a request before it runs it, and how it answers a spot check.

Routing (is this the next step and microbatch of a stage held here?) is checked by the handlers
in :mod:`.server`; here: the tensors (count, shape, dtype, finite values, token ids inside the
vocabulary) and the loss weight. A request that fails is refused with a :class:`~..guard.Rejected`
naming its :class:`~..guard.Reason`, before it touches the stage's state.
"""

from __future__ import annotations

import math

import torch

from ..guard import Reason, Rejected, check_tensors
from ..spot import expected, recompute
from ..wire import Message
from .state import Span


def kind_of(msg: Message) -> str:
    if msg.kind != "check":
        return msg.kind
    what = msg.meta.get("what")
    if what not in ("forward", "backward"):
        raise Rejected(f"spot check of {what!r}: expected forward or backward", Reason.MALFORMED)
    return f"check:{what}"


def weight_of(msg: Message) -> float:
    w = msg.meta.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 < w <= 1:
        raise Rejected(f"{msg.describe()}: loss weight {w!r} is not in (0, 1]", Reason.BAD_VALUE)
    return float(w)


def validate(span: Span, msg: Message) -> None:
    """Refuse a forward, backward or check whose tensors do not fit ``span``."""
    want, _ = expected(span.spec, span.first, span.count, kind_of(msg))
    check_tensors(msg.tensors, want, f"{msg.describe()} for stage {span.stage}")
    weight_of(msg)


def run_check(span: Span, msg: Message) -> list[torch.Tensor]:
    """Recompute what the stage's holder returned for this microbatch, from this span's weights."""
    validate(span, msg)
    what = kind_of(msg).split(":")[1]
    last = span.first + span.count == span.spec.layers
    return recompute(span.layers, is_first=span.first == 0, is_last=last, what=what, tensors=list(msg.tensors),
                     weight=weight_of(msg))  # fmt: skip
