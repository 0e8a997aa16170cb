"""The stage-boundary wire format: exact round trips of every structure and dtype it carries.

A header is ``[MAGIC, VERSION, kind, count, (dtype_code, ndim, *shape) * count, nkey, *key_bytes,
nbytes]`` padded with zeros to HEADER_SLOTS int64 slots (garbage headers: test_wire_garbage.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from layerwise.runtime.wire import GRADS, HEADER_SLOTS, MAX_NDIM, ROUTE, decode_header, decode_payload, encode, flatten

from .wire_helpers import PEER, rand_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.bool, torch.complex64])  # fmt: skip
def test_single_tensor_round_trip_every_dtype(dtype: torch.dtype) -> None:
    x = rand_tensor((3, 5, 2), dtype)
    got = _send(x)
    assert isinstance(got, torch.Tensor)
    _assert_same(got, x)


def test_tuple_of_mixed_dtypes_round_trip() -> None:
    # Each tensor's byte size is a multiple of 8, so every slice of the payload is aligned for
    # every dtype; misaligned sizes are test_mixed_dtypes_with_unaligned_sizes_round_trip.
    xs = (
        rand_tensor((2, 4), torch.float32),  # 32 bytes
        rand_tensor((3,), torch.int64),  # 24
        rand_tensor((2, 8), torch.bool),  # 16
        rand_tensor((4, 3), torch.bfloat16),  # 24
        rand_tensor((2,), torch.float64),  # 16
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
    xs = (rand_tensor(shapes[0], torch.float32), rand_tensor(shapes[1], torch.int64))
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)


def test_bool_mask_then_float_round_trip() -> None:
    xs = (rand_tensor((3,), torch.bool), rand_tensor((2, 2), torch.bfloat16), rand_tensor((5,), torch.float32),
          rand_tensor((1,), torch.float64))
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)


def test_dict_of_tensors_round_trip_keeps_keys_and_order() -> None:
    d = {"hidden": rand_tensor((2, 3, 4), torch.float32), "mask/attn": rand_tensor((2, 8), torch.bool),
         "pos_é": rand_tensor((2, 4), torch.int64)}  # fmt: skip
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
    xs = (rand_tensor(shape, torch.float32), rand_tensor((2, 3), torch.float32), rand_tensor(shape, torch.int64))
    got = _send(xs)
    for g, x in zip(got, xs):
        _assert_same(g, x)
    _assert_same(_send(rand_tensor(shape, torch.bfloat16)), rand_tensor(shape, torch.bfloat16))


def test_non_contiguous_inputs_round_trip() -> None:
    base = rand_tensor((4, 6), torch.float32)
    views = (base.t(), base[:, ::2], base[1:3].t(), rand_tensor((3, 1), torch.float64).expand(3, 5))
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
    x = rand_tensor((3, 4), torch.float32).requires_grad_(True)
    y = x * 2
    got = _send((x, y))
    assert not any(g.requires_grad for g in got)
    _assert_same(got[0], x)
    _assert_same(got[1], y)


def test_list_crosses_as_a_tuple() -> None:
    xs = [rand_tensor((2,), torch.float32), rand_tensor((2,), torch.float32)]
    got = _send(xs)
    assert isinstance(got, tuple) and len(got) == 2
    for g, x in zip(got, xs):
        _assert_same(g, x)


def test_dict_with_empty_key_round_trips_or_is_rejected_by_the_sender() -> None:
    d = {"": rand_tensor((2,), torch.float32)}
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
    tensors = [rand_tensor((2,), torch.float32) for _ in range(100)]  # 4 + 100 * 3 + 2 slots > 256
    with pytest.raises(TypeError) as info:
        encode(tensors, flatten(tuple(tensors))[1])
    msg = str(info.value)
    assert f"max {ROUTE}" in msg and "header slots" in msg
    assert "fewer tensors" in msg


def test_encode_rejects_long_dict_keys_with_a_clear_message() -> None:
    d = {"k" * 300: rand_tensor((2,), torch.float32)}
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
    tensors = tuple(rand_tensor((i % 3 + 2,), torch.float32) for i in range(82))
    with pytest.raises(TypeError, match="header slots"):
        encode([*tensors, rand_tensor((2,), torch.float32)], flatten((*tensors, tensors[0]))[1])
    got = _send(tensors)
    for g, x in zip(got, tensors):
        _assert_same(g, x)
