"""The wire decoder against garbage: every malformed header a peer can send ends in ProtocolError.

The receiver decodes whatever a peer sends, so every malformed header must raise
:class:`ProtocolError` and nothing else (hand-picked cases, then hypothesis over random and mutated
headers).
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise.runtime.errors import ProtocolError
from layerwise.runtime.wire import HEADER_SLOTS, MAGIC, MAX_NDIM, MAX_PAYLOAD, VERSION, Meta, decode_header, decode_payload, encode, flatten

from .wire_helpers import INT64, PEER, PROPERTY, decode_meta, header_of, rand_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- garbage in -> ProtocolError ------------------------------------------------------------

# a valid single-tensor header: [MAGIC, VERSION, kind=0, count=1, code, ndim=2, 3, 4, nkey=0, nbytes]
_CODE, _NDIM, _DIM0, _DIM1, _NKEY, _NBYTES = 4, 5, 6, 7, 8, 9


def _valid() -> list[int]:
    h = header_of(rand_tensor((3, 4), torch.float32))
    assert h[:10] == [MAGIC, VERSION, 0, 1, 0, 2, 3, 4, 0, 48]
    return h


def _with(h: list[int], **slots: int) -> list[int]:
    h = list(h)
    for k, v in slots.items():
        h[int(k.lstrip("s"))] = v
    return h


@pytest.mark.parametrize(("header", "why"), [
    (_with(_valid(), s0=0x4C58), "wrong magic"),
    (_with(_valid(), s0=0), "wrong magic"),
    (_with(_valid(), s1=VERSION + 1), f"wire version {VERSION + 1}"),
    (_with(_valid(), s1=0), "wire version 0"),
    (_with(_valid(), s2=3), "structure 3"),
    (_with(_valid(), s2=-1), "structure -1"),
    (_with(_valid(), s3=-1), "with -1 tensors"),
    (_with(_valid(), s3=0), "with 0 tensors"),  # a single tensor or a dict needs at least one
    (_with(_valid(), s3=HEADER_SLOTS + 1), "tensors"),
    (_with(_valid(), s6=-3), "shape"),  # negative dim
    (_with(_valid(), s7=-(2**63)), "shape"),
    (_with(_valid(), s4=11), "dtype code 11"),  # one past the last dtype
    (_with(_valid(), s4=-1), "dtype code -1"),
    (_with(_valid(), s5=MAX_NDIM + 1), f"ndim {MAX_NDIM + 1}"),
    (_with(_valid(), s5=-1), "ndim -1"),
    (_with(_valid(), s9=49), "payload size 49"),  # payload size mismatch
    (_with(_valid(), s9=47), "payload size 47"),
    (_with(_valid(), s9=-48), "payload size"),
    (_with(_valid(), s6=2**40, s7=2**20, s9=2**62), "payload size"),  # larger than MAX_PAYLOAD
    (_with(_valid(), s8=-1), "key length"),
    (_with(_valid(), s8=HEADER_SLOTS + 1), "key length"),
    (_with(_valid(), s8=250), "truncated"),  # key bytes run past the end of the header
])  # fmt: skip
def test_malformed_header_raises_protocol_error(header: list[int], why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_meta(header)
    msg = str(info.value)
    assert PEER in msg and why in msg
    assert "same layerwise version" in msg


def test_oversized_payload_is_rejected_even_when_consistent() -> None:
    # nbytes equal to the shapes' product but above MAX_PAYLOAD: a corrupt header, not a message
    big = MAX_PAYLOAD // 4 + 1
    with pytest.raises(ProtocolError, match="payload size"):
        decode_meta(_with(_valid(), s5=1, s6=big, s7=0, s8=big * 4))


def test_dict_key_bytes_invalid_raise_protocol_error() -> None:
    h = header_of({"ab": rand_tensor((2,), torch.float32), "c": rand_tensor((1,), torch.int64)})
    # [MAGIC, VERSION, 2, 2, 0, 1, 2, 4, 1, 1, nkey=4, a, b, \0, c, nbytes]
    assert h[10:16] == [4, ord("a"), ord("b"), 0, ord("c"), 16]
    for byte, why in ((256, "key bytes"), (-1, "key bytes"), (0xFF, "not UTF-8"), (0x80, "not UTF-8")):
        with pytest.raises(ProtocolError, match=why):
            decode_meta(_with(h, s11=byte))
    with pytest.raises(ProtocolError, match="dict keys do not match the tensor count"):
        decode_meta(_with(h, s13=ord("x")))  # "abxc": one key for two tensors
    with pytest.raises(ProtocolError, match="dict keys do not match"):
        decode_meta(_with(h, s10=0, s11=16))  # no keys at all


@pytest.mark.parametrize("slots", [0, 1, 9, 100, HEADER_SLOTS - 1, HEADER_SLOTS + 1])
def test_header_of_the_wrong_length_raises_protocol_error(slots: int) -> None:
    h = (_valid() + [0] * 2)[:slots]
    with pytest.raises(ProtocolError):
        decode_meta(h)


def test_single_kind_with_several_tensors_raises_protocol_error() -> None:
    h = header_of((rand_tensor((2,), torch.float32), rand_tensor((3,), torch.float32)))
    with pytest.raises(ProtocolError, match="single tensor with several entries"):
        decode_meta(_with(h, s2=0))


def test_counts_that_run_past_the_header_are_truncated() -> None:
    # 4 + 28 tensors * (2 + 7) = 256: the 29th tensor's dtype code is past the end
    h = [MAGIC, VERSION, 1, HEADER_SLOTS] + [0, MAX_NDIM - 1, *([1] * (MAX_NDIM - 1))] * 40
    h = (h + [0] * HEADER_SLOTS)[:HEADER_SLOTS]
    with pytest.raises(ProtocolError, match="truncated"):
        decode_meta(h)


@pytest.mark.parametrize("delta", [-1, -4, 4])
def test_payload_of_the_wrong_length_raises_protocol_error(delta: int) -> None:
    header, payload = encode(*flatten(rand_tensor((3, 4), torch.float32)))
    meta = decode_header(header, PEER)
    wrong = torch.randint(0, 256, (payload.numel() + delta,), dtype=torch.uint8)
    with pytest.raises(ProtocolError):
        decode_payload(meta, wrong)


def test_decode_payload_returns_views_of_the_payload() -> None:
    x = rand_tensor((4, 2), torch.float32)
    header, payload = encode(*flatten((x, rand_tensor((3,), torch.float64))))
    meta = decode_header(header, PEER)
    out = decode_payload(meta, payload)
    base = payload.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in out)


# -- property: any int64 header decodes to a consistent Meta or raises ProtocolError ---------


def _check_consistent(meta: Meta) -> None:
    s = meta.structure
    n = len(meta.dtypes)
    assert len(meta.shapes) == n
    assert s.kind in (0, 1, 2)
    if s.kind == 0:
        assert n == 1 and s.keys == ()
    elif s.kind == 1:
        assert s.keys == ()
    else:
        assert n >= 1 and len(s.keys) == n
    total = 0
    for dtype, shape in zip(meta.dtypes, meta.shapes):
        assert isinstance(dtype, torch.dtype)
        assert len(shape) <= MAX_NDIM and all(isinstance(d, int) and d >= 0 for d in shape)
        total += math.prod(shape) * dtype.itemsize
    assert meta.nbytes == total and 0 <= meta.nbytes <= MAX_PAYLOAD
    if meta.nbytes <= 4096:  # unaligned mixes included: decode_payload copies those slices
        out = decode_payload(meta, torch.randint(0, 256, (meta.nbytes,), dtype=torch.uint8))
        assert [t.dtype for t in out] == list(meta.dtypes)
        assert [tuple(t.shape) for t in out] == list(meta.shapes)


def _decode_or_protocol_error(h: list[int]) -> None:
    try:
        meta = decode_meta(h)
    except ProtocolError:
        return
    _check_consistent(meta)


_small = st.integers(-3, 12)
_wide = st.integers(*INT64)
_value = st.one_of(_small, _small, _wide)


@st.composite
def _random_headers(draw: st.DrawFn) -> list[int]:
    # hypothesis draws the slots the decoder reads first; a seeded generator fills the rest
    # (drawing all 256 slots through hypothesis is ten times slower and finds nothing more)
    prefix = draw(st.lists(_value, min_size=4, max_size=40))
    rng = random.Random(draw(st.integers(0, 2**32)))
    h = prefix + [rng.choice((rng.randint(-3, 12), rng.randint(*INT64))) for _ in range(HEADER_SLOTS - len(prefix))]
    # a valid prefix most of the time, so the fuzzing reaches past the magic and version checks
    if draw(st.integers(0, 9)):
        h[0], h[1] = MAGIC, VERSION
        h[2] = draw(st.one_of(st.sampled_from([0, 1, 2]), _wide))
        h[3] = draw(st.one_of(st.integers(0, 4), _wide))
    return h


@PROPERTY
@given(_random_headers())
def test_random_headers_decode_consistently_or_raise_protocol_error(h: list[int]) -> None:
    _decode_or_protocol_error(h)


_DT = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.uint8]


@st.composite
def _mutated_headers(draw: st.DrawFn) -> list[int]:
    kind = draw(st.sampled_from(["single", "tuple", "dict"]))
    count = 1 if kind == "single" else draw(st.integers(0 if kind == "tuple" else 1, 4))
    tensors = []
    for _ in range(count):
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        tensors.append(rand_tensor(shape, draw(st.sampled_from(_DT))))
    if kind == "single":
        obj: Any = tensors[0]
    elif kind == "tuple":
        obj = tuple(tensors)
    else:
        keys = draw(st.lists(st.text("abc/_é", min_size=1, max_size=3), min_size=count, max_size=count, unique=True))
        obj = dict(zip(keys, tensors))
    h = header_of(obj)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.one_of(st.integers(0, 24), st.integers(0, HEADER_SLOTS - 1)))  # mostly the used slots
        near = st.integers(max(h[pos] - 2, INT64[0]), min(h[pos] + 2, INT64[1]))  # off by a little
        h[pos] = draw(st.one_of(_small, _wide, near))
    return h


@PROPERTY
@given(_mutated_headers())
def test_mutated_valid_headers_decode_consistently_or_raise_protocol_error(h: list[int]) -> None:
    _decode_or_protocol_error(h)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(_DT), min_size=1, max_size=4), st.data())
def test_headers_of_real_messages_decode_to_their_dtypes_and_shapes(
    dtypes: list[torch.dtype], data: st.DataObject
) -> None:
    tensors = [rand_tensor(tuple(data.draw(st.lists(st.integers(0, 4), max_size=4))), d) for d in dtypes]
    header, payload = encode(tensors, flatten(tuple(tensors))[1])
    meta = decode_header(header, PEER)
    assert meta.dtypes == tuple(dtypes)
    assert meta.shapes == tuple(tuple(t.shape) for t in tensors)
    assert meta.nbytes == payload.numel()
