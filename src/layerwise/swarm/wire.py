"""Swarm messages: a fixed routing header, a small JSON meta, then tensors in the runtime's format.

    | magic "LWSW" | version u16 | kind u16 | step i64 | stage i32 | microbatch i32 | epoch i64 |
    | meta length u32 | meta (UTF-8 JSON object) | groups of tensors: runtime wire header + raw bytes |

Every message carries the step, stage, microbatch and kind it belongs to, plus the assignment
epoch, so a receiver drops what is stale (an older step or epoch) or duplicated (a backward it
already ran) instead of applying it twice. The tensors reuse :mod:`layerwise.runtime.wire`
(structure, dtypes and shapes in an int64 header, then one byte payload); nothing is pickled, and
every size is checked against a limit before anything is allocated. A runtime header holds at
most a few dozen tensors, so the tensors travel in groups of :data:`GROUP` (a hand-over of a span
has three tensors per parameter), each group with its own header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime.errors import ProtocolError
from ..runtime.wire import GRADS, HEADER_SLOTS, decode_header, decode_payload, encode
from .errors import WireError

MAGIC = b"LWSW"
VERSION = 1
_HEAD = struct.Struct("<4sHHqiiqI")
MAX_META = 1 << 20  # a spec or an assignment, never tensors
MAX_MESSAGE = 1 << 32  # 4 GiB: larger is a corrupt or hostile message
GROUP = 32  # tensors per runtime wire header
_HBYTES = HEADER_SLOTS * 8

KINDS = (
    "hello", "install", "forward", "backward", "commit", "backup_apply", "promote", "get_state",
    "status", "ok", "error", "reset", "drop", "check", "grads",
)  # fmt: skip
_CODE = {k: i for i, k in enumerate(KINDS)}


@dataclass
class Message:
    kind: str
    step: int = -1
    stage: int = -1
    mb: int = -1
    epoch: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind} (step {self.step}, stage {self.stage}, microbatch {self.mb})"


def encode_message(msg: Message) -> bytes:
    if msg.kind not in _CODE:
        raise WireError(f"unknown message kind {msg.kind!r}")
    meta = json.dumps(msg.meta, separators=(",", ":")).encode()
    if len(meta) > MAX_META:
        raise WireError(f"{msg.describe()}: meta of {len(meta)} bytes exceeds {MAX_META}")
    parts = [_HEAD.pack(MAGIC, VERSION, _CODE[msg.kind], msg.step, msg.stage, msg.mb, msg.epoch, len(meta)), meta]
    tensors = [t.detach().cpu() for t in msg.tensors]
    for i in range(0, len(tensors), GROUP):
        header, payload = encode(tensors[i : i + GROUP], GRADS)
        parts += [header.numpy().tobytes(), payload.numpy().tobytes()]
    return b"".join(parts)


def decode_message(data: bytes | bytearray | memoryview, sender: str, limit: int = MAX_MESSAGE) -> Message:
    """Check and decode; anything malformed, unknown or over ``limit`` raises :class:`WireError`."""
    if len(data) > limit:
        raise WireError(f"{sender} sent {len(data)} bytes, over the limit of {limit}", "oversized")
    if len(data) < _HEAD.size:
        raise WireError(f"{sender} sent a truncated message ({len(data)} bytes)", "truncated")
    magic, version, code, step, stage, mb, epoch, nmeta = _HEAD.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise WireError(f"{sender} sent a message that is not layerwise swarm v{VERSION}: is it the same version?",
                        "garbage")  # fmt: skip
    if code >= len(KINDS) or nmeta > MAX_META or _HEAD.size + nmeta > len(data):
        why = "truncated" if code < len(KINDS) and nmeta <= MAX_META else "garbage"
        raise WireError(f"{sender} sent a malformed message (kind {code}, meta {nmeta} bytes)", why)
    try:
        meta = json.loads(bytes(data[_HEAD.size : _HEAD.size + nmeta]))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested deep enough to exhaust the stack
        raise WireError(f"{sender} sent a message whose meta is not JSON", "garbage") from None
    if not isinstance(meta, dict):
        raise WireError(f"{sender} sent a message whose meta is not a JSON object", "garbage")
    msg = Message(KINDS[code], step, stage, mb, epoch, meta)
    rest = memoryview(data)[_HEAD.size + nmeta :]
    while len(rest):
        if len(rest) < _HBYTES:
            raise WireError(f"{sender} sent {msg.describe()} with a truncated tensor header", "truncated")
        try:
            info = decode_header(torch.frombuffer(bytearray(rest[:_HBYTES]), dtype=torch.int64), sender)
            if info.nbytes > len(rest) - _HBYTES:
                raise WireError(f"{sender} sent {msg.describe()} with {len(rest) - _HBYTES} payload bytes, its header "
                                f"says {info.nbytes}", "truncated")  # fmt: skip
            raw = rest[_HBYTES : _HBYTES + info.nbytes]
            payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
            msg.tensors += decode_payload(info, payload)
        except ProtocolError as e:
            raise WireError(f"{msg.describe()}: {e}") from None
        rest = rest[_HBYTES + info.nbytes :]
    return msg


def error(text: str, like: Message | None = None) -> Message:
    m = Message("error", meta={"error": text})
    if like is not None:
        m.step, m.stage, m.mb, m.epoch = like.step, like.stage, like.mb, like.epoch
    return m
