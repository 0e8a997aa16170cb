"""Compression of activations and activation gradients between stages, for slow links.

Modes (``--compress``), each a lossy codec applied by the peer that *produces* a tensor (a stage's
output on the way forward, the gradient of its input on the way back); the trainer, the hub every
message passes through, forwards the compressed tensors untouched, so each crosses both links
(producer -> trainer -> consumer) compressed and is decoded once, by the consumer:

- ``none`` (default): the tensors as they are. The swarm is then exact (equal to one process).
  **Every other mode changes the training math**: results are no longer equal to one process.
- ``bf16``: round to bfloat16 (2 bytes per element, relative error at most 2**-8).
- ``int8``: blockwise 8-bit quantization with an absmax scale per block of ``block`` elements
  (the scheme of SWARM/Petals and bitsandbytes: ``q = round(127 x / absmax)``, error at most
  ``absmax / 254`` per element), with **error feedback** (Seide et al. 2014; Karimireddy et al.
  2019, "EF-SGD"): the sender keeps what quantization lost and adds it to the next tensor of the
  same stream, so errors do not accumulate along a stream (their sum stays bounded by one
  residual instead of growing with the number of messages). 1 byte per element plus 4 per block:
  at most 4x fewer bytes than fp32 by construction (3.76x at ``block`` 64, before headers).
- ``int6``: the same with 6 bits (levels -31..31, four codes in three bytes, error at most
  ``absmax / 62``): 4.9x fewer payload bytes at ``block`` 64, the finest step that gets past 4x
  (int8 cannot: its scales alone keep it under). A b-bit code is sent as ``code + levels + 1``,
  its bits packed least significant first.
- ``int4``: the same with 4 bits (levels -7..7, two codes a byte, error at most ``absmax / 14``):
  7.1x fewer payload bytes at ``block`` 64.
- ``lowrank``: a fixed orthonormal projection of the hidden (last) dimension onto ``rank``
  directions, ``c = x P`` with ``P`` (hidden x rank) drawn from ``seed`` by both sides, decoded as
  ``c P^T`` (hidden/rank fewer bytes). In the spirit of Pluralis' Protocol Models (arXiv
  2506.01260), which send activations through a fixed subspace; the caveat: Protocol Models
  also *constrain the model's weights* so that what stages exchange lies in that subspace, while
  here the model is unchanged, so the part of each tensor outside the subspace is simply lost
  (a rank/hidden fraction of a random tensor's energy survives). No error feedback here: a fixed
  projection never sends the complement, so a residual would only grow.

Error feedback is on by default for the int codecs (``error_feedback``; the SWARM recipe the issue
asked for), but it was designed for quantities that are *summed* over steps (gradients of one
parameter vector); an activation's residual is added to the next step's activation of *another*
sample, which doubles the per-message error. On the demo model it did not help: in
bench/README.md (``compress_loss``) int6 and int4 without it had lower mean loss changes (by about
one standard error), so ``--compress-no-ef`` turns it off.

What "the same stream" is, for error feedback: one stage's output towards the next stage
(forward) or the gradient of its input towards the previous one (backward), for one microbatch
slot: microbatch ``m`` of step ``k + 1`` continues the stream of microbatch ``m`` of step ``k``
(same shape every step; a residual of another shape is dropped). The residual is kept by the
sending stage's holder (:class:`Streams`) and is *committed with the step*: encoding a message
of step ``k`` always starts from the residual committed at the end of step ``k - 1``, and the new
residual waits as pending until the stage commits step ``k``. A message sent again (a retry, a
replay) is therefore encoded bit for bit as before, never advancing the stream twice.
Not kept: a stage's copy has no residuals (they are as large as the activations; relaying them at
each commit would cost more than the compression saves), so a stage that moves to another peer
(a failure, a rebalance) restarts its streams from zero residual; after a replay on the new
holder, the residuals of the replayed messages are its own re-encodings' (the trainer forwards
the original holder's bytes, which it already has), so error feedback is approximate for one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .errors import WireError

MODES = ("none", "bf16", "int8", "int6", "int4", "lowrank")
_BITS = {"int8": 8, "int6": 6, "int4": 4}
_LEVELS = {mode: (1 << (bits - 1)) - 1 for mode, bits in _BITS.items()}  # symmetric: -127..127, -31..31, -7..7
MAX_BLOCK = 1 << 20
MAX_RANK = 8192  # SwarmSpec's widest hidden size
MAX_ELEMENTS = 1 << 31
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True, kw_only=True)
class Compression:
    """How stages compress what they send each other (the trainer sends it with every request)."""

    mode: str = "none"  # one of MODES
    block: int = 64  # int8 / int4: elements per absmax scale
    error_feedback: bool = True  # int8 / int4: carry the quantization residual to the stream's next message
    rank: int = 8  # lowrank: directions kept of the hidden dimension
    seed: int = 0  # lowrank: the projection's seed, shared by both sides

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--compress must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, hi in (("block", MAX_BLOCK), ("rank", MAX_RANK)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ValueError(f"compression {name} must be a whole number in [1, {hi}], got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 62:
            raise ValueError(f"compression seed must be a whole number in [0, 2**62), got {self.seed!r}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"compression error_feedback must be true or false, got {self.error_feedback!r}")

    @property
    def exact(self) -> bool:
        return self.mode == "none"

    def to_meta(self) -> dict[str, Any]:
        """Only the settings the mode uses (it travels with every request; the rest keep their defaults)."""
        if self.mode in _BITS:
            return {"mode": self.mode, "block": self.block, "ef": self.error_feedback}
        if self.mode == "lowrank":
            return {"mode": self.mode, "rank": self.rank, "seed": self.seed}
        return {"mode": self.mode}

    @classmethod
    def from_meta(cls, d: Any) -> Compression:
        """From a request's meta; anything malformed raises :class:`WireError` (a hostile sender)."""
        if not isinstance(d, dict) or set(d) - {"mode", "block", "ef", "rank", "seed"}:
            raise WireError(f"bad compression settings {d!r}"[:200])
        try:
            return cls(mode=d.get("mode", "none"), block=d.get("block", 64), error_feedback=d.get("ef", True),
                       rank=d.get("rank", 8), seed=d.get("seed", 0))  # fmt: skip
        except ValueError as e:
            raise WireError(str(e)) from None


@dataclass
class Packed:
    """Tensors as they travel: one entry per original tensor, and the wire tensors of all entries."""

    entries: list[dict[str, Any]]
    wire: list[torch.Tensor]

    @classmethod
    def raw(cls, tensors: list[torch.Tensor]) -> Packed:
        return cls([{"c": "raw"} for _ in tensors], list(tensors))

    @property
    def is_raw(self) -> bool:
        return all(e["c"] == "raw" for e in self.entries)

    def __add__(self, other: Packed) -> Packed:
        return Packed(self.entries + other.entries, self.wire + other.wire)


# -- one tensor ------------------------------------------------------------------------------------
def _compressible(x: torch.Tensor, cfg: Compression) -> bool:
    # token ids, targets and the scalar loss travel as they are; so does a tensor too small to gain
    return x.dtype in _FLOATS and x.dim() >= 2 and x.numel() >= 16 and not cfg.exact


@lru_cache(maxsize=16)
def projection(hidden: int, rank: int, seed: int) -> torch.Tensor:
    """An orthonormal (hidden, rank) basis from ``seed``: QR of a Gaussian matrix, the same on every peer."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=g, dtype=torch.float64))
    return q.to(torch.float32)


def encode_tensor(x: torch.Tensor, cfg: Compression, residual: torch.Tensor | None = None,
                  ) -> tuple[dict[str, Any], list[torch.Tensor], torch.Tensor | None]:  # fmt: skip
    """One tensor -> (entry, wire tensors, new residual or None). ``residual`` is error feedback's."""
    x = x.detach()
    if not _compressible(x, cfg):
        return {"c": "raw"}, [x], None
    shape = list(x.shape)
    if cfg.mode == "bf16":
        return {"c": "bf16", "dtype": str(x.dtype)[6:]}, [x.to(torch.bfloat16)], None
    if cfg.mode == "lowrank":
        if cfg.rank >= shape[-1]:  # no gain: send as it is
            return {"c": "raw"}, [x], None
        p = projection(shape[-1], cfg.rank, cfg.seed)
        coef = x.float() @ p  # (..., rank)
        entry = {"c": "lowrank", "rank": cfg.rank, "seed": cfg.seed, "hidden": shape[-1], "dtype": str(x.dtype)[6:]}
        return entry, [coef], None
    # int8 / int4, blockwise absmax (bitsandbytes' blockwise quantization, as in SWARM)
    levels = _LEVELS[cfg.mode]
    flat = x.float().reshape(-1)
    if cfg.error_feedback and residual is not None and residual.shape == flat.shape:
        flat = flat + residual
    n, b = flat.numel(), cfg.block
    pad = (-n) % b
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, b)
    absmax = blocks.abs().amax(dim=1)
    scale = absmax / levels
    codes = torch.where(scale[:, None] > 0, torch.round(blocks / scale.clamp_min(1e-38)[:, None]), 0.0)
    codes = codes.clamp_(-levels, levels).to(torch.int8)
    entry = {"c": cfg.mode, "shape": shape, "block": b, "dtype": str(x.dtype)[6:]}
    new_residual = None
    if cfg.error_feedback:
        new_residual = flat - (codes.float() * scale[:, None]).reshape(-1)[:n]
    flat_codes = codes.reshape(-1)[:n]
    if cfg.mode != "int8":  # code + levels + 1 in [1, 2**bits), packed into consecutive bits
        return entry, [_pack_bits(flat_codes + (levels + 1), _BITS[cfg.mode]), scale], new_residual
    return entry, [flat_codes.clone(), scale], new_residual


def _pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Values in [0, 2**bits) -> ceil(n bits / 8) bytes, least significant bit first."""
    n = u.numel()
    flat = ((u.to(torch.int32)[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, (-n * bits) % 8)).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def _unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    flat = ((data.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)[: n * bits]
    return (flat.view(n, bits) << torch.arange(bits, dtype=torch.int32)).sum(dim=1)


_OUT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
               "bfloat16": torch.bfloat16}  # fmt: skip
_WIRE_COUNT = {"raw": 1, "bf16": 1, "int8": 2, "int6": 2, "int4": 2, "lowrank": 1}


def decode_tensor(entry: dict[str, Any], wire: list[torch.Tensor], what: str = "a tensor") -> torch.Tensor:
    """Entry + wire tensors -> the tensor. Anything inconsistent raises :class:`WireError`."""

    def bad(why: str) -> WireError:
        return WireError(f"compressed {what} ({entry.get('c')!r}) is malformed: {why}")

    codec = entry.get("c")
    if codec not in _WIRE_COUNT or len(wire) != _WIRE_COUNT[codec]:
        raise WireError(f"compressed {what}: unknown codec {codec!r} or {len(wire)} wire tensors")
    if codec == "raw":
        return wire[0]
    out = _OUT_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if out is None:
        raise bad(f"dtype {entry.get('dtype')!r}")
    if codec == "bf16":
        if wire[0].dtype != torch.bfloat16:
            raise bad(f"payload dtype {wire[0].dtype}, expected bfloat16")
        return wire[0].to(out)
    if codec == "lowrank":
        coef, rank, seed = wire[0], entry.get("rank"), entry.get("seed")
        if not (isinstance(rank, int) and isinstance(seed, int) and 1 <= rank <= MAX_RANK and 0 <= seed < 1 << 62):
            raise bad(f"rank {rank!r}, seed {seed!r}")
        if coef.dtype != torch.float32 or coef.dim() < 2 or coef.shape[-1] != rank:
            raise bad(f"coefficients {coef.dtype} {tuple(coef.shape)} for rank {rank}")
        hidden = entry.get("hidden")
        if not isinstance(hidden, int) or not rank < hidden <= MAX_RANK:
            raise bad(f"hidden size {hidden!r} for rank {rank}")
        return (coef @ projection(hidden, rank, seed).T).to(out)
    codes, scale = wire
    shape, b = entry.get("shape"), entry.get("block")
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r}")
    if not isinstance(b, int) or not 1 <= b <= MAX_BLOCK:
        raise bad(f"block {b!r}")
    n = math.prod(shape)
    want = (torch.int8, n) if codec == "int8" else (torch.uint8, -(-n * _BITS[codec] // 8))
    if n > MAX_ELEMENTS or (codes.dtype, codes.numel()) != want or codes.dim() != 1:
        raise bad(f"{codes.numel()} {codes.dtype} codes for shape {shape}")
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.numel() != -(-n // b):
        raise bad(f"{scale.numel()} {scale.dtype} scales for {n} elements in blocks of {b}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise bad("scales that are negative, NaN or Inf")
    if codec != "int8":  # a code of 0 (never sent) decodes to -levels - 1: still bounded by the scale
        codes = _unpack_bits(codes, _BITS[codec], n) - (_LEVELS[codec] + 1)
    pad = (-n) % b
    vals = torch.nn.functional.pad(codes.float(), (0, pad)).view(-1, b) * scale[:, None]
    return vals.reshape(-1)[:n].reshape(shape).to(out)


# -- a message's tensors ---------------------------------------------------------------------------
class Streams:
    """A sending stage's error-feedback residuals: committed (end of the last step) and pending.

    Keys are ``(direction, microbatch, index)``: the stage is implied (one object per held stage).
    """

    def __init__(self) -> None:
        self.committed: dict[tuple[str, int, int], torch.Tensor] = {}
        self.pending: dict[tuple[int, tuple[str, int, int]], torch.Tensor] = {}

    def encode(self, cfg: Compression, step: int, direction: str, mb: int, tensors: list[torch.Tensor]) -> Packed:
        out = Packed([], [])
        for i, t in enumerate(tensors):
            key = (direction, mb, i)
            entry, wire, residual = encode_tensor(t, cfg, self.committed.get(key))
            if residual is not None:
                self.pending[(step, key)] = residual  # a resend of this message overwrites it with the same
            out = out + Packed([entry], wire)
        return out

    def commit(self, step: int) -> None:
        """The stage committed ``step``: its streams continue from this step's residuals."""
        for (s, key), r in list(self.pending.items()):
            if s == step:
                self.committed[key] = r
        self.pending = {k: v for k, v in self.pending.items() if k[0] > step}


def pack_reply(cfg_meta: Any, streams: Streams | None, step: int, direction: str, mb: int,
               tensors: list[torch.Tensor]) -> tuple[dict[str, Any], list[torch.Tensor]]:  # fmt: skip
    """A peer's reply tensors, compressed as the request's meta asks: (meta to merge, wire tensors)."""
    if cfg_meta is None:
        return {}, tensors
    cfg = Compression.from_meta(cfg_meta)
    packed = (streams or Streams()).encode(cfg, step, direction, mb, tensors)
    return ({}, packed.wire) if packed.is_raw else ({"packed": packed.entries}, packed.wire)


def unpack(meta: dict[str, Any], tensors: list[torch.Tensor], what: str = "message") -> list[torch.Tensor]:
    """A received message's tensors, decoded (as they are when the message says nothing is packed)."""
    entries = meta.get("packed")
    if entries is None:
        return tensors
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or len(entries) > 4096:
        raise WireError(f"{what}: 'packed' is not a list of entries")
    out, pos = [], 0
    for i, e in enumerate(entries):
        n = _WIRE_COUNT.get(e.get("c"), 0)
        if n == 0 or pos + n > len(tensors):
            raise WireError(f"{what}: packed entry {i} ({e.get('c')!r}) does not match the {len(tensors)} tensors sent")
        out.append(decode_tensor(e, tensors[pos : pos + n], f"tensor {i} of {what}"))
        pos += n
    if pos != len(tensors):
        raise WireError(f"{what}: {len(tensors) - pos} tensors beyond its packed entries")
    return out


def kept(meta: dict[str, Any], tensors: list[torch.Tensor], single: bool) -> Any:
    """What the trainer keeps of a reply to forward on: the tensor (``single``) or the tensors as
    they came when nothing is compressed (so an exact run's cache is as before), else the
    :class:`Packed` wire tensors, not decoded (the consumer decodes them)."""
    entries = meta.get("packed")
    if entries is None:
        return tensors[0] if single else list(tensors)
    return Packed(list(entries), list(tensors))


def attach(meta: dict[str, Any], items: list[Any]) -> list[torch.Tensor]:
    """A request's tensors from kept items (tensors, lists of them, :class:`Packed`); sets
    ``meta['packed']`` when any item is compressed."""
    whole = Packed([], [])
    for item in items:
        if isinstance(item, Packed):
            whole = whole + item
        else:
            whole = whole + Packed.raw([item] if isinstance(item, torch.Tensor) else list(item))
    if not whole.is_raw:
        meta["packed"] = whole.entries
    return whole.wire


def decoded(item: Any) -> Any:
    """A kept item as plain tensors (for whoever on the trainer needs the values)."""
    if isinstance(item, Packed):
        out = unpack({"packed": item.entries}, item.wire, "a kept reply")
        return out[0] if len(out) == 1 else out
    return item
