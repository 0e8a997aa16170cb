"""The wire format of what crosses a stage boundary: a tensor, a tuple or a dict of tensors.

A message is a fixed-size int64 header followed by one uint8 payload holding every tensor's bytes.
The header carries the structure, dtypes and shapes, so stages never declare static shapes and
batch size or sequence length may change from step to step. Nothing is pickled: a peer that sends
garbage gets a :class:`ProtocolError`, never code execution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ProtocolError

HEADER_SLOTS = 256
# The last slots belong to the transport (for shared memory: where the payload waits, and the
# message's tag); the message description never uses them and the decoder ignores them.
TRANSPORT_SLOTS = 4
ROUTE = HEADER_SLOTS - TRANSPORT_SLOTS
MAGIC = 0x4C57  # "LW"
VERSION = 1
MAX_NDIM = 8
MAX_PAYLOAD = 1 << 36  # 64 GiB: anything larger is a corrupt header, not an activation

_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
)  # fmt: skip
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_SINGLE, _TUPLE, _DICT = 0, 1, 2


@dataclass(frozen=True)
class Structure:
    """How a flat list of tensors is put back together: a tensor, a tuple, or a dict."""

    kind: int
    keys: tuple[str, ...] = ()

    def unflatten(self, tensors: list[torch.Tensor]) -> Any:
        if self.kind == _SINGLE:
            return tensors[0]
        if self.kind == _TUPLE:
            return tuple(tensors)
        return dict(zip(self.keys, tensors))


GRADS = Structure(_TUPLE)  # gradients travel as a flat tuple, one per floating input


def flatten(obj: Any, what: str = "stage output") -> tuple[list[torch.Tensor], Structure]:
    """Split a tensor / tuple / dict of tensors into a flat list and its structure."""
    if isinstance(obj, torch.Tensor):
        return [obj], Structure(_SINGLE)
    if isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj):
        return list(obj), Structure(_TUPLE)  # empty: a stage with no floating inputs has no grads
    if isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
        keys = tuple(str(k) for k in obj)
        if any(not k or "\0" in k for k in keys):
            raise TypeError(f"{what}: dict keys crossing a stage boundary must be non-empty and contain no NUL")
        return list(obj.values()), Structure(_DICT, keys)
    raise TypeError(
        f"{what} must be a tensor, a tuple of tensors or a dict of tensors to cross a "
        f"stage boundary, got {_describe(obj)}: return tensors from the layer at the end of the stage"
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of ({', '.join(type(o).__name__ for o in obj)})"
    if isinstance(obj, dict):
        return f"dict with values ({', '.join(type(o).__name__ for o in obj.values())})"
    return type(obj).__name__


def encode(tensors: list[torch.Tensor], structure: Structure) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(header, payload)`` for a flat list of tensors."""
    head: list[int] = [MAGIC, VERSION, structure.kind, len(tensors)]
    nbytes = 0
    for t in tensors:
        if t.dtype not in _CODE:
            raise TypeError(f"dtype {t.dtype} cannot cross a stage boundary; supported: {list(_CODE)}")
        if t.dim() > MAX_NDIM:
            raise TypeError(f"tensors crossing a stage boundary may have at most {MAX_NDIM} dims")
        head += [_CODE[t.dtype], t.dim(), *t.shape]
        nbytes += t.numel() * t.element_size()
    key_bytes = b"\0".join(k.encode() for k in structure.keys)
    head += [len(key_bytes), *key_bytes, nbytes]
    if len(head) > ROUTE:
        raise TypeError(
            f"a stage boundary message needs {len(head)} header slots (max {ROUTE}): "
            "pass fewer tensors or shorter dict keys across the boundary"
        )
    header = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
    header[: len(head)] = torch.tensor(head, dtype=torch.int64)
    if not tensors:
        payload = torch.empty(0, dtype=torch.uint8)
    elif len(tensors) == 1:
        payload = tensors[0].detach().contiguous().reshape(-1).view(torch.uint8)
    else:
        payload = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    return header, payload


@dataclass(frozen=True)
class Meta:
    """A decoded header: what the payload holds."""

    structure: Structure
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int


def decode_header(header: torch.Tensor, peer: str) -> Meta:
    """Check and decode a header; anything malformed raises :class:`ProtocolError`."""
    h = header.tolist()

    def bad(why: str) -> ProtocolError:
        return ProtocolError(f"{peer} sent an invalid message header ({why}); is it running the same "
                             f"layerwise version and schedule?")

    if len(h) != HEADER_SLOTS:
        raise bad(f"truncated: {len(h)} of {HEADER_SLOTS} slots")
    if h[0] != MAGIC:
        raise bad("wrong magic number")
    if h[1] != VERSION:
        raise bad(f"wire version {h[1]}, expected {VERSION}")
    kind, count = h[2], h[3]
    if kind not in (_SINGLE, _TUPLE, _DICT) or not (0 if kind == _TUPLE else 1) <= count <= HEADER_SLOTS:
        raise bad(f"structure {kind} with {count} tensors")
    pos, dtypes, shapes, total = 4, [], [], 0
    try:
        for _ in range(count):
            code, ndim = h[pos], h[pos + 1]
            if not 0 <= code < len(_DTYPES) or not 0 <= ndim <= MAX_NDIM:
                raise bad(f"dtype code {code}, ndim {ndim}")
            shape = tuple(h[pos + 2 : pos + 2 + ndim])
            if len(shape) != ndim or any(d < 0 for d in shape):
                raise bad(f"shape {shape}")
            numel = 1
            for d in shape:
                numel *= d
            total += numel * _DTYPES[code].itemsize
            dtypes.append(_DTYPES[code])
            shapes.append(shape)
            pos += 2 + ndim
        nkey = h[pos]
        if not 0 <= nkey <= HEADER_SLOTS:
            raise bad("key length")
        raw = h[pos + 1 : pos + 1 + nkey]
        if any(not 0 <= b < 256 for b in raw):
            raise bad("key bytes")
        keys = tuple(bytes(raw).decode().split("\0")) if nkey else ()
        nbytes = h[pos + 1 + nkey]
    except IndexError:
        raise bad("truncated") from None
    except UnicodeDecodeError:
        raise bad("dict keys are not UTF-8") from None
    if nbytes != total or nbytes > MAX_PAYLOAD:
        raise bad(f"payload size {nbytes} does not match the shapes ({total})")
    if kind == _DICT and len(keys) != count:
        raise bad("dict keys do not match the tensor count")
    if kind == _SINGLE and count != 1:
        raise bad("single tensor with several entries")
    return Meta(Structure(kind, keys if kind == _DICT else ()), tuple(dtypes), tuple(shapes), nbytes)


def decode_payload(meta: Meta, payload: torch.Tensor) -> list[torch.Tensor]:
    """Views into ``payload`` with the header's dtypes and shapes (no copy)."""
    if payload.dim() != 1 or payload.dtype != torch.uint8 or payload.numel() != meta.nbytes:
        raise ProtocolError(
            f"payload of {payload.numel()} bytes does not match its header ({meta.nbytes} bytes)"
        )
    out, offset = [], 0
    for dtype, shape in zip(meta.dtypes, meta.shapes):
        numel = 1
        for d in shape:
            numel *= d
        size = numel * dtype.itemsize
        chunk = payload[offset : offset + size]
        if offset % dtype.itemsize:  # a view needs an aligned offset: copy the rare unaligned one
            chunk = chunk.clone()
        out.append(chunk.view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype))
        offset += size
    return out
