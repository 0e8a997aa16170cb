"""The stage-boundary wire format: exact round trips, and garbage that always ends in ProtocolError.

A header is ``[MAGIC, VERSION, kind, count, (dtype_code, ndim, *shape) * count, nkey, *key_bytes,
nbytes]`` padded with zeros to HEADER_SLOTS int64 slots. The receiver decodes whatever a peer
sends, so every malformed header must raise :class:`ProtocolError` and nothing else.
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
from layerwise.runtime.wire import (
    GRADS,
    HEADER_SLOTS,
    MAGIC,
    MAX_NDIM,
    MAX_PAYLOAD,
    ROUTE,
    VERSION,
    Meta,
    decode_header,
    decode_payload,
    encode,
    flatten,
)

PEER = "rank 1 (stage 1)"
INT64 = (-(2**63), 2**63 - 1)
PROPERTY = settings(max_examples=300, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random values of any dtype the wire carries (never all zeros when non-empty)."""
    if dtype == torch.bool:
        t = torch.rand(shape, generator=gen) > 0.5
        if t.numel():
            t.view(-1)[0] = True
        return t
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randint(1, 100, shape, generator=gen).to(dtype)


def _send(obj: Any) -> Any:
    """What the receiver gets: flatten, encode, decode the header, decode the payload."""
    tensors, structure = flatten(obj)
    header, payload = encode(tensors, structure)
    assert header.shape == (HEADER_SLOTS,) and header.dtype == torch.int64
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    meta = decode_header(header.clone(), PEER)
    assert meta.nbytes == payload.numel() == sum(t.numel() * t.element_size() for t in tensors)
    return meta.structure.unflatten(decode_payload(meta, payload.clone()))


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got, want.detach())


def _header(obj: Any) -> list[int]:
    return encode(*flatten(obj))[0].tolist()


def _decode(h: list[int] | torch.Tensor) -> Meta:
    return decode_header(torch.as_tensor(h, dtype=torch.int64), PEER)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.bool, torch.complex64])  # fmt: skip
def test_single_tensor_round_trip_every_dtype(dtype: torch.dtype) -> None:
    x = _rand((3, 5, 2), dtype)
    got = _send(x)
    assert isinstance(got, torch.Tensor)
    _assert_same(got, x)


def test_tuple_of_mixed_dtypes_round_trip() -> None:
    # Each tensor's byte size is a multiple of 8, so every slice of the payload is aligned for
    # every dtype; misaligned sizes are test_mixed_dtypes_with_unaligned_sizes_round_trip.
    xs = (
        _rand((2, 4), torch.float32),  # 32 bytes
        _rand((3,), torch.int64),  # 24
        _rand((2, 8), torch.bool),  # 16
        _rand((4, 3), torch.bfloat16),  # 24
        _rand((2,), torch.float64),  # 16
    )
    got = _send(xs)
    assert isinstance(got, tuple) and len(got) == len(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)


@pytest.mark.parametrize("shapes", [
    ((3,), (2,)),  # float32 12 bytes, then int64 at offset 12
    ((1,), (1,)),
])  # fmt: skip
def test_mixed_dtypes_with_unaligned_sizes_round_trip(shapes: tuple[tuple[int, ...], ...]) -> None:
    """A stage that returns (hidden float32, token ids int64) with an odd element count."""
    xs = (_rand(shapes[0], torch.float32), _rand(shapes[1], torch.int64))
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)


def test_bool_mask_then_float_round_trip() -> None:
    xs = (_rand((3,), torch.bool), _rand((2, 2), torch.bfloat16), _rand((5,), torch.float32),
          _rand((1,), torch.float64))
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)


def test_dict_of_tensors_round_trip_keeps_keys_and_order() -> None:
    d = {"hidden": _rand((2, 3, 4), torch.float32), "mask/attn": _rand((2, 8), torch.bool),
         "pos_é": _rand((2, 4), torch.int64)}  # fmt: skip
    got = _send(d)
    assert isinstance(got, dict)
    assert list(got) == list(d)
    for k in d:
        _assert_same(got[k], d[k])


def test_empty_tuple_is_the_gradient_message_of_a_stage_without_floating_inputs() -> None:
    tensors, structure = flatten(())
    assert tensors == []
    header, payload = encode([], GRADS)
    assert payload.numel() == 0
    meta = decode_header(header, PEER)
    assert meta.dtypes == () and meta.shapes == () and meta.nbytes == 0
    assert meta.structure == GRADS == structure
    assert meta.structure.unflatten(decode_payload(meta, payload)) == ()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4), (3, 0)])
def test_zero_size_tensors_round_trip(shape: tuple[int, ...]) -> None:
    xs = (_rand(shape, torch.float32), _rand((2, 3), torch.float32), _rand(shape, torch.int64))
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)
    _assert_same(_send(_rand(shape, torch.bfloat16)), _rand(shape, torch.bfloat16))


def test_non_contiguous_inputs_round_trip() -> None:
    base = _rand((4, 6), torch.float32)
    views = (base.t(), base[:, ::2], base[1:3].t(), _rand((3, 1), torch.float64).expand(3, 5))
    assert not any(v.is_contiguous() for v in views)
    got = _send(views)
    for g, v in zip(got, views):
        _assert_same(g, v)
    _assert_same(_send(base.t()), base.t())  # the single-tensor path does not cat


def test_zero_dim_tensors_round_trip() -> None:
    xs = (torch.tensor(-1.5, dtype=torch.float64), torch.tensor(7, dtype=torch.int64), torch.tensor(3.25),
          torch.tensor(True))  # sizes 8, 8, 4, 1: every offset aligned
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)
    _assert_same(_send(torch.tensor(2.5)), torch.tensor(2.5))


def test_tensors_that_require_grad_are_sent_as_values() -> None:
    x = _rand((3, 4), torch.float32).requires_grad_(True)
    y = x * 2
    got = _send((x, y))
    assert not any(g.requires_grad for g in got)
    _assert_same(got[0], x)
    _assert_same(got[1], y)


def test_list_crosses_as_a_tuple() -> None:
    xs = [_rand((2,), torch.float32), _rand((2,), torch.float32)]
    got = _send(xs)
    assert isinstance(got, tuple) and len(got) == 2
    for g, x in zip(got, xs):
        _assert_same(g, x)


def test_dict_with_empty_key_round_trips_or_is_rejected_by_the_sender() -> None:
    d = {"": _rand((2,), torch.float32)}
    try:
        tensors, structure = flatten(d)
        header, payload = encode(tensors, structure)
    except TypeError:
        return  # rejected on the sending side with a clear error: fine
    meta = decode_header(header, PEER)
    assert list(meta.structure.unflatten(decode_payload(meta, payload))) == [""]


# -- what may cross a boundary -------------------------------------------------------------


@pytest.mark.parametrize("obj", [
    (torch.ones(2), (torch.ones(2),)),  # nested tuple
    [torch.ones(2), [torch.ones(1)]],
    {"a": {"b": torch.ones(1)}},  # nested dict
    {"a": torch.ones(1), "n": 3},
    (torch.ones(2), None),
    [1, 2, 3],
    None,
    3.0,
    "text",
    {},  # an empty dict has no tensors and no way to tell it from an empty tuple
])  # fmt: skip
def test_flatten_rejects_what_cannot_cross_a_boundary(obj: Any) -> None:
    with pytest.raises(TypeError) as info:
        flatten(obj, "stage 2 output")
    msg = str(info.value)
    assert "stage 2 output" in msg
    assert "a tensor, a tuple of tensors or a dict of tensors" in msg
    assert "stage boundary" in msg
    assert "got " + type(obj).__name__ in msg


def test_flatten_error_describes_the_nested_element_types() -> None:
    with pytest.raises(TypeError, match=r"tuple of \(Tensor, tuple\)"):
        flatten((torch.ones(1), (torch.ones(1),)))
    with pytest.raises(TypeError, match=r"dict with values \(Tensor, int\)"):
        flatten({"a": torch.ones(1), "b": 1})


def test_encode_rejects_too_many_tensors_with_a_clear_message() -> None:
    tensors = [_rand((2,), torch.float32) for _ in range(100)]  # 4 + 100 * 3 + 2 slots > 256
    with pytest.raises(TypeError) as info:
        encode(tensors, flatten(tuple(tensors))[1])
    msg = str(info.value)
    assert f"max {ROUTE}" in msg and "header slots" in msg
    assert "fewer tensors" in msg


def test_encode_rejects_long_dict_keys_with_a_clear_message() -> None:
    d = {"k" * 300: _rand((2,), torch.float32)}
    with pytest.raises(TypeError, match="shorter dict keys"):
        encode(*flatten(d))


def test_encode_rejects_unsupported_dtype_and_too_many_dims() -> None:
    with pytest.raises(TypeError, match="cannot cross a stage boundary"):
        encode(*flatten(torch.randn(2, dtype=torch.complex128)))
    with pytest.raises(TypeError, match=f"at most {MAX_NDIM} dims"):
        encode(*flatten(torch.randn((1,) * (MAX_NDIM + 1))))


def test_the_largest_message_that_fits_round_trips() -> None:
    # The last TRANSPORT_SLOTS belong to the transport: 4 + 82 * 3 + 2 = 252 <= ROUTE = 253 fits,
    # and one tensor more does not.
    tensors = tuple(_rand((i % 3 + 2,), torch.float32) for i in range(82))
    with pytest.raises(TypeError, match="header slots"):
        encode([*tensors, _rand((2,), torch.float32)], flatten((*tensors, tensors[0]))[1])
    got = _send(tensors)
    for g, x in zip(got, tensors):
        _assert_same(g, x)


# -- garbage in -> ProtocolError ------------------------------------------------------------

# a valid single-tensor header: [MAGIC, VERSION, kind=0, count=1, code, ndim=2, 3, 4, nkey=0, nbytes]
_CODE, _NDIM, _DIM0, _DIM1, _NKEY, _NBYTES = 4, 5, 6, 7, 8, 9


def _valid() -> list[int]:
    h = _header(_rand((3, 4), torch.float32))
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
        _decode(header)
    msg = str(info.value)
    assert PEER in msg and why in msg
    assert "same layerwise version" in msg


def test_oversized_payload_is_rejected_even_when_consistent() -> None:
    # nbytes equal to the shapes' product but above MAX_PAYLOAD: a corrupt header, not a message
    big = MAX_PAYLOAD // 4 + 1
    with pytest.raises(ProtocolError, match="payload size"):
        _decode(_with(_valid(), s5=1, s6=big, s7=0, s8=big * 4))


def test_dict_key_bytes_invalid_raise_protocol_error() -> None:
    h = _header({"ab": _rand((2,), torch.float32), "c": _rand((1,), torch.int64)})
    # [MAGIC, VERSION, 2, 2, 0, 1, 2, 4, 1, 1, nkey=4, a, b, \0, c, nbytes]
    assert h[10:16] == [4, ord("a"), ord("b"), 0, ord("c"), 16]
    for byte, why in ((256, "key bytes"), (-1, "key bytes"), (0xFF, "not UTF-8"), (0x80, "not UTF-8")):
        with pytest.raises(ProtocolError, match=why):
            _decode(_with(h, s11=byte))
    with pytest.raises(ProtocolError, match="dict keys do not match the tensor count"):
        _decode(_with(h, s13=ord("x")))  # "abxc": one key for two tensors
    with pytest.raises(ProtocolError, match="dict keys do not match"):
        _decode(_with(h, s10=0, s11=16))  # no keys at all


@pytest.mark.parametrize("slots", [0, 1, 9, 100, HEADER_SLOTS - 1, HEADER_SLOTS + 1])
def test_header_of_the_wrong_length_raises_protocol_error(slots: int) -> None:
    h = (_valid() + [0] * 2)[:slots]
    with pytest.raises(ProtocolError):
        _decode(h)


def test_single_kind_with_several_tensors_raises_protocol_error() -> None:
    h = _header((_rand((2,), torch.float32), _rand((3,), torch.float32)))
    with pytest.raises(ProtocolError, match="single tensor with several entries"):
        _decode(_with(h, s2=0))


def test_counts_that_run_past_the_header_are_truncated() -> None:
    # 4 + 28 tensors * (2 + 7) = 256: the 29th tensor's dtype code is past the end
    h = [MAGIC, VERSION, 1, HEADER_SLOTS] + [0, MAX_NDIM - 1, *([1] * (MAX_NDIM - 1))] * 40
    h = (h + [0] * HEADER_SLOTS)[:HEADER_SLOTS]
    with pytest.raises(ProtocolError, match="truncated"):
        _decode(h)


@pytest.mark.parametrize("delta", [-1, -4, 4])
def test_payload_of_the_wrong_length_raises_protocol_error(delta: int) -> None:
    header, payload = encode(*flatten(_rand((3, 4), torch.float32)))
    meta = decode_header(header, PEER)
    wrong = torch.randint(0, 256, (payload.numel() + delta,), dtype=torch.uint8)
    with pytest.raises(ProtocolError):
        decode_payload(meta, wrong)


def test_decode_payload_returns_views_of_the_payload() -> None:
    x = _rand((4, 2), torch.float32)
    header, payload = encode(*flatten((x, _rand((3,), torch.float64))))
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
        meta = _decode(h)
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
        tensors.append(_rand(shape, draw(st.sampled_from(_DT))))
    if kind == "single":
        obj: Any = tensors[0]
    elif kind == "tuple":
        obj = tuple(tensors)
    else:
        keys = draw(st.lists(st.text("abc/_é", min_size=1, max_size=3), min_size=count, max_size=count, unique=True))
        obj = dict(zip(keys, tensors))
    h = _header(obj)
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
    tensors = [_rand(tuple(data.draw(st.lists(st.integers(0, 4), max_size=4))), d) for d in dtypes]
    header, payload = encode(tensors, flatten(tuple(tensors))[1])
    meta = decode_header(header, PEER)
    assert meta.dtypes == tuple(dtypes)
    assert meta.shapes == tuple(tuple(t.shape) for t in tensors)
    assert meta.nbytes == payload.numel()
