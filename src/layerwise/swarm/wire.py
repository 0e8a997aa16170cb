"""Swarm messages: a fixed routing header, a small JSON meta, then tensors with compact headers.

    | magic "LWSW" | version u16 | kind u16 | step i64 | stage i32 | microbatch i32 | epoch i64 |
    | meta length u32 | meta (UTF-8 JSON object) |
    | tensor count u32 | per tensor: dtype u8, ndim u8, ndim x dim u64 | the tensors' raw bytes, in order |

Every message carries the step, stage, microbatch and kind it belongs to, plus the assignment
epoch, so a receiver drops what is stale (an older step or epoch) or duplicated (a backward it
already ran) instead of applying it twice. Each tensor costs only what describes it (2 + 8 x ndim
bytes: 26 for an activation) instead of the runtime's fixed 2 KiB header, which capped what
compression (``--compress``) could save on messages of a few KiB. Nothing is pickled; counts,
dtypes, ranks and sizes are checked against the bytes actually received (and the receiver's
limit) before anything is allocated.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import WireError

MAGIC = b"LWSW"
VERSION = 2  # 2: compact tensor headers (1 used the runtime's 2 KiB header per group of 32 tensors)
_HEAD = struct.Struct("<4sHHqiiqI")
_COUNT = struct.Struct("<I")
_TENSOR = struct.Struct("<BB")
MAX_META = 1 << 20  # a spec or an assignment, never tensors
MAX_MESSAGE = 1 << 32  # 4 GiB: larger is a corrupt or hostile message
MAX_NDIM = 8
# the dtypes that cross the swarm (activations, gradients, parameters, token ids, compressed codes)
_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
)  # fmt: skip
_DCODE = {d: i for i, d in enumerate(_DTYPES)}

KINDS = (
    "hello", "install", "forward", "backward", "commit", "backup_apply", "promote", "get_state",
    "status", "ok", "error", "reset", "drop", "check", "grads",
)  # fmt: skip
_CODE = {k: i for i, k in enumerate(KINDS)}


def header_bytes(ndims: list[int]) -> int:
    """Bytes of the tensor section's headers for tensors of these ranks (for size limits)."""
    return _COUNT.size + sum(_TENSOR.size + 8 * n for n in ndims)


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
    tensors = [t.detach().cpu().contiguous() for t in msg.tensors]
    heads = [_HEAD.pack(MAGIC, VERSION, _CODE[msg.kind], msg.step, msg.stage, msg.mb, msg.epoch, len(meta)), meta,
             _COUNT.pack(len(tensors))]  # fmt: skip
    for i, t in enumerate(tensors):
        if t.dtype not in _DCODE or t.dim() > MAX_NDIM:
            raise WireError(f"{msg.describe()}: tensor {i} ({t.dtype}, {t.dim()} dims) cannot cross the swarm wire; "
                            f"dtypes {[str(d)[6:] for d in _DTYPES]}, at most {MAX_NDIM} dims")  # fmt: skip
        heads.append(_TENSOR.pack(_DCODE[t.dtype], t.dim()) + struct.pack(f"<{t.dim()}Q", *t.shape))
    # the tensors' own memory, joined in one copy (``tobytes`` first would copy every tensor twice:
    # 7 ms against 3.5 ms for the 16 MB of gradients a commit of bench/swarm.py (c) sends back)
    payloads = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors if t.numel()]
    return b"".join(heads + payloads)


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
    msg.tensors = _tensors(memoryview(data)[_HEAD.size + nmeta :], f"{sender} sent {msg.describe()} with")
    return msg


def _tensors(rest: memoryview, what: str) -> list[torch.Tensor]:
    """The tensor section: every header is read and every size added up (Python ints, no overflow)
    and matched against the bytes present before a single tensor is allocated."""
    if len(rest) < _COUNT.size:
        raise WireError(f"{what} no tensor count", "truncated")
    (count,) = _COUNT.unpack_from(rest, 0)
    if count > (len(rest) - _COUNT.size) // _TENSOR.size:  # each tensor has at least its 2-byte header
        raise WireError(f"{what} {count} tensors in {len(rest)} bytes", "truncated")
    pos, specs, total = _COUNT.size, [], 0
    for i in range(count):
        if pos + _TENSOR.size > len(rest):
            raise WireError(f"{what} a truncated header for tensor {i}", "truncated")
        dcode, ndim = _TENSOR.unpack_from(rest, pos)
        if dcode >= len(_DTYPES) or ndim > MAX_NDIM:
            raise WireError(f"{what} tensor {i} of dtype code {dcode} and {ndim} dims")
        pos += _TENSOR.size
        if pos + 8 * ndim > len(rest):
            raise WireError(f"{what} a truncated shape for tensor {i}", "truncated")
        shape = struct.unpack_from(f"<{ndim}Q", rest, pos)
        pos += 8 * ndim
        if any(d > MAX_MESSAGE for d in shape):  # even beside a zero dim: torch could not make it
            raise WireError(f"{what} tensor {i} of shape {shape}")
        nbytes = math.prod(shape) * _DTYPES[dcode].itemsize
        total += nbytes
        if total > len(rest):  # checked as it grows: a lying shape never reaches an allocation
            raise WireError(f"{what} tensors of {total}+ bytes in a {len(rest)}-byte section", "truncated")
        specs.append((_DTYPES[dcode], shape, nbytes))
    if pos + total != len(rest):
        why = "truncated" if pos + total > len(rest) else "malformed"
        raise WireError(f"{what} {len(rest) - pos} bytes of tensors, its headers say {total}", why)
    out = []
    for dtype, shape, nbytes in specs:
        if nbytes:  # a fresh bytearray per tensor: writable and aligned for its dtype
            out.append(torch.frombuffer(bytearray(rest[pos : pos + nbytes]), dtype=dtype).reshape(shape))
        else:
            out.append(torch.empty(shape, dtype=dtype))
        pos += nbytes
    return out


def error(text: str, like: Message | None = None) -> Message:
    m = Message("error", meta={"error": text})
    if like is not None:
        m.step, m.stage, m.mb, m.epoch = like.step, like.stage, like.mb, like.epoch
    return m
