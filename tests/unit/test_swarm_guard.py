"""Hostile input without processes: the wire decoder under fuzzing, named reasons, the ledger, the
peer's request checks, the spot checks' tolerance and the fault injection."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from layerwise.swarm.errors import WireError
from layerwise.swarm.guard import (Expect, Ledger, Policy, Reason, Rejected, all_finite, check_tensors, reason_of,
                                   relative_error)  # fmt: skip
from layerwise.swarm.spec import SwarmSpec, build_layers
from layerwise.swarm.spot import corrupt, expected, recompute, tolerance
from layerwise.swarm.wire import KINDS, MAX_META, VERSION, Message, _HEAD, decode_message, encode_message

SPEC = SwarmSpec(width=16, heads=2, blocks=2, seq=8, batch_size=4, microbatches=2)


def _good() -> bytes:
    g = torch.Generator().manual_seed(1)
    return encode_message(Message("forward", 3, 1, 0, 2, {"weight": 0.5}, [torch.randn(2, 8, 16, generator=g),
                                                                         torch.arange(6)]))  # fmt: skip


def _reason(data: bytes, limit: int = 1 << 20) -> Reason:
    with pytest.raises(WireError) as e:
        decode_message(data, "peer x", limit)
    return reason_of(e.value)


def test_each_malformed_message_gets_its_named_reason() -> None:
    good = _good()
    assert _reason(good, limit=len(good) - 1) == Reason.OVERSIZED
    assert _reason(good[:10]) == Reason.TRUNCATED
    assert _reason(good[: _HEAD.size + 5]) == Reason.TRUNCATED  # cut inside the meta
    assert _reason(good[:-3]) == Reason.TRUNCATED  # cut inside a tensor payload
    assert _reason(good[:-(len(good) - _HEAD.size - 20)]) == Reason.TRUNCATED  # cut inside a tensor header
    assert _reason(b"PICK" + good[4:]) == Reason.GARBAGE
    bad_kind = bytearray(good)
    struct.pack_into("<H", bad_kind, 6, len(KINDS))
    assert _reason(bytes(bad_kind)) == Reason.GARBAGE
    not_json = _HEAD.pack(b"LWSW", VERSION, 0, 0, 0, 0, 0, 3) + b"{x]"
    assert _reason(not_json) == Reason.GARBAGE
    deep = b"[" * 100_000  # a meta nested deep enough to exhaust the parser's stack
    assert _reason(_HEAD.pack(b"LWSW", VERSION, 0, 0, 0, 0, 0, len(deep)) + deep) == Reason.GARBAGE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_fuzz_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    try:
        msg = decode_message(data, "fuzz", limit=2048)
    except WireError as e:
        assert isinstance(reason_of(e), Reason)
        if len(data) > 2048:
            assert reason_of(e) == Reason.OVERSIZED  # the limit is checked before anything is parsed
        return
    assert len(data) <= 2048 and msg.kind in KINDS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0), flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)),
                                                    max_size=8))  # fmt: skip
def test_fuzz_mutated_real_messages_decode_or_raise_a_named_error(cut: int, flips: list[tuple[int, int]]) -> None:
    raw = bytearray(_good())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    raw = raw[: len(raw) - cut % (len(raw) + 1)]
    try:
        msg = decode_message(bytes(raw), "fuzz", limit=len(_good()))
    except WireError as e:
        assert isinstance(reason_of(e), Reason)
        return
    # a message that still decodes holds no more bytes of tensors than it was sent
    assert sum(t.numel() * t.element_size() for t in msg.tensors) <= len(raw)


def test_limits_hold_for_a_header_that_claims_a_huge_tensor() -> None:
    raw = bytearray(_good())
    meta_len = struct.unpack_from("<I", raw, _HEAD.size - 4)[0]
    first_dim = _HEAD.size + meta_len + 4 + 2  # after the meta: the tensor count, then dtype and rank
    assert struct.unpack_from("<Q", raw, first_dim)[0] == 2
    struct.pack_into("<Q", raw, first_dim, 1 << 30)  # 512 GiB claimed, a few hundred bytes sent
    with pytest.raises(WireError, match="section"):
        decode_message(bytes(raw), "peer x")
    struct.pack_into("<Q", raw, first_dim, 0)  # 0 elements, then a dim too large for any tensor
    struct.pack_into("<Q", raw, first_dim + 8, 1 << 63)
    with pytest.raises(WireError):
        decode_message(bytes(raw), "peer x")
    with pytest.raises(WireError, match="exceeds"):
        encode_message(Message("ok", meta={"x": "y" * MAX_META}))


def test_tensor_checks_name_shape_nan_and_range() -> None:
    hidden, tokens = Expect((2, 3), True), Expect((2, 3), False, 10)
    check_tensors([torch.randn(2, 3), torch.randint(0, 10, (2, 3))], [hidden, tokens], "x")
    cases = [([torch.randn(2, 4), torch.zeros(2, 3, dtype=torch.long)], Reason.BAD_SHAPE),
             ([torch.randn(2, 3)], Reason.BAD_SHAPE),
             ([torch.randint(0, 9, (2, 3)), torch.zeros(2, 3, dtype=torch.long)], Reason.BAD_SHAPE),
             ([torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]]), torch.zeros(2, 3, dtype=torch.long)], Reason.NONFINITE),
             ([torch.full((2, 3), float("inf")), torch.zeros(2, 3, dtype=torch.long)], Reason.NONFINITE),
             ([torch.randn(2, 3), torch.full((2, 3), 10)], Reason.BAD_VALUE),
             ([torch.randn(2, 3), torch.full((2, 3), -1)], Reason.BAD_VALUE)]  # fmt: skip
    for tensors, reason in cases:
        with pytest.raises(Rejected) as e:
            check_tensors(tensors, [hidden, tokens], "x")
        assert e.value.reason == reason


def test_all_finite_finds_one_nan_or_inf_and_a_sum_that_overflows_is_not_one() -> None:
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[617] = bad
        assert not all_finite(u)
    both = t.clone()
    both[3], both[9] = float("inf"), float("-inf")  # their sum is NaN: still caught
    assert not all_finite(both)
    huge = torch.full((4,), 3e38)  # finite values whose fp32 sum overflows: the exact test decides
    assert not bool(torch.isfinite(huge.sum())) and all_finite(huge)
    assert all_finite(torch.full((8,), 60000.0, dtype=torch.float16))  # an fp16 sum past 65504


def test_ledger_probation_then_ban_and_counts() -> None:
    led = Ledger(Policy(probation_after=1, ban_after=3))
    assert led.strike("a", Reason.NONFINITE, 4) == "probation" and led.on_probation("a")
    assert led.strike("a", Reason.MISMATCH, 5) == "probation"
    assert led.strike("a", Reason.MISMATCH, 6) == "ban" and led.banned("a") and not led.on_probation("a")
    assert led.strike("a", Reason.MISMATCH, 7) == "banned"  # counted, not banned twice
    led.count(Reason.GARBAGE)
    snap = led.snapshot()
    assert snap["rejected"] == {"nonfinite": 1, "mismatch": 3, "garbage": 1}
    assert snap["bans"] == [{"peer": "a", "reason": "mismatch", "step": 6, "confirmed": False}]
    assert not led.banned("b")
    with pytest.raises(ValueError):
        Policy(probation_after=3, ban_after=2)
    with pytest.raises(ValueError):
        Policy(probation_checks=-1)


def test_a_confirmed_mismatch_bans_at_once_and_trust_is_earned_by_passed_checks() -> None:
    led = Ledger(Policy(ban_after=2, probation_checks=3))
    assert led.strike("a", Reason.MISMATCH, 1, confirmed=True) == "ban" and led.snapshot()["bans"][0]["confirmed"]
    assert led.strike("b", Reason.MISMATCH, 1) == "probation"  # unconfirmed: a strike as before
    assert Ledger(Policy(ban_on_proof=False)).strike("c", Reason.MISMATCH, 1, confirmed=True) == "probation"
    assert led.unproven("d")
    for _ in range(3):
        led.passes("d")
    assert not led.unproven("d") and led.snapshot()["passed"] == {"d": 3}
    led.forget("d")  # lost, and perhaps back as another process
    assert led.unproven("d") and not led.unproven("a")  # a banned peer gets no work, checked or not


def test_relative_error_treats_nan_and_shape_as_infinite() -> None:
    a = torch.randn(4, 4)
    assert relative_error(a, a.clone()) == 0.0
    assert relative_error(a.unsqueeze(0), a) == float("inf")
    b = a.clone()
    b[0, 0] = float("nan")
    assert relative_error(b, a) == float("inf") and relative_error(a, b) == float("inf")


def _stage(first: int, count: int) -> tuple[list[Any], bool, bool]:
    return build_layers(SPEC)[first : first + count], first == 0, first + count == SPEC.layers


@pytest.mark.parametrize("first,count", [(0, 2), (1, 2), (2, 2)])
@pytest.mark.parametrize("what", ["forward", "backward"])
def test_tolerance_is_ten_times_above_fp32_rounding_and_far_below_a_corruption(first: int, count: int,
                                                                               what: str) -> None:  # fmt: skip
    """fp32 against fp64 is a larger change than any reordering of fp32 sums; a corruption is far larger."""
    torch.manual_seed(0)
    layers, is_first, is_last = _stage(first, count)
    ins, _ = expected(SPEC, first, count, f"check:{what}")
    tensors = [torch.randn(e.shape) if e.floating else torch.randint(0, 256, e.shape) for e in ins]
    if what == "backward" and is_first:
        assert recompute(layers, is_first=True, is_last=is_last, what=what, tensors=tensors, weight=0.5) == []
        return
    f32 = recompute(layers, is_first=is_first, is_last=is_last, what=what, tensors=tensors, weight=0.5)
    again = recompute(layers, is_first=is_first, is_last=is_last, what=what, tensors=tensors, weight=0.5)
    assert torch.equal(f32[0], again[0])  # the same code on the same CPU: bit-identical
    l64 = [m.double() for m in _stage(first, count)[0]]
    t64 = [t.double() if t.is_floating_point() else t for t in tensors]
    f64 = recompute(l64, is_first=is_first, is_last=is_last, what=what, tensors=t64, weight=0.5)
    tol = tolerance(SPEC, count, what)
    assert relative_error(f32[0], f64[0].float()) < tol / 10
    assert relative_error(corrupt(f32[0], torch.Generator().manual_seed(0)), f32[0]) > 10 * tol


def test_a_peer_refuses_requests_that_do_not_fit_its_stage_with_a_named_reason() -> None:
    from layerwise.swarm.peer import Peer, PeerOptions

    peer = Peer(PeerOptions(listen=("tcp/127.0.0.1:1",), name="t", memory_gib=1.0))
    meta = {"spec": SPEC.to_json(), "first": 1, "count": 2, "role": "holder"}
    assert peer.handle(Message("install", stage=1, epoch=1, meta=meta)).kind == "ok"
    x = torch.randn(2, 8, 16)
    nan = x.clone()
    nan[0, 0, 0] = float("nan")
    cases = {
        Reason.WRONG_STAGE: Message("forward", 0, 5, 0, 1, {"weight": 0.5}, [x]),
        Reason.BAD_SHAPE: Message("forward", 0, 1, 0, 1, {"weight": 0.5}, [x[:, :, :8]]),
        Reason.NONFINITE: Message("forward", 0, 1, 0, 1, {"weight": 0.5}, [nan]),
        Reason.BAD_VALUE: Message("forward", 0, 1, 0, 1, {"weight": float("inf")}, [x]),
        Reason.OUT_OF_ORDER: Message("backward", 0, 1, 1, 1, tensors=[x]),
        Reason.REPLAYED: Message("forward", 0, 1, 0, 0, {"weight": 0.5}, [x]),  # an old epoch
    }
    for reason, msg in cases.items():
        with pytest.raises(Rejected) as e:
            peer.handle(msg)
        assert e.value.reason == reason, (reason, str(e.value))
    assert peer.spans[1].fwd_done == set()  # nothing was applied
    assert peer.handle(Message("forward", 0, 1, 0, 1, {"weight": 0.5}, [x])).kind == "ok"
    early = Message("forward", 4, 1, 1, 1, {"weight": 0.5}, [x])
    with pytest.raises(Rejected) as e:
        peer.handle(early)
    assert e.value.reason == Reason.OUT_OF_ORDER
    check = peer.handle(Message("check", 0, 1, 0, 1, {"what": "forward", "weight": 0.5}, [x]))
    direct = peer.handle(Message("forward", 0, 1, 1, 1, {"weight": 0.5}, [x]))
    assert torch.equal(check.tensors[0], direct.tensors[0])  # the spot check recomputes the holder's output


def test_fault_modes_parse_and_tamper_only_outputs() -> None:
    from layerwise.swarm.peer.fault import Tamper, parse_tamper

    assert parse_tamper("corrupt:0.05") == ("corrupt", 0.05, 0) and parse_tamper("") is None
    for bad in ("corrupt", "corrupt:0", "corrupt:2", "flip:0.1", "nan:x"):
        with pytest.raises(ValueError):
            parse_tamper(bad)
    req = Message("forward", 2, 0, 1)
    out = torch.randn(2, 3)
    for mode in ("corrupt", "nan", "shape", "stale"):
        t = Tamper(mode, 1.0)
        got, how = t.apply(req, Message("ok", 2, 0, 1, tensors=[out]))
        assert how == "" and t.tampered == 1
        if mode == "stale":
            assert got.step == 1
        else:
            assert got.tensors[0].shape != out.shape or not torch.equal(got.tensors[0], out)
    assert Tamper("garbage", 1.0).apply(req, Message("ok", tensors=[out]))[1] == "garbage"
    assert Tamper("oversized", 1.0).apply(req, Message("ok", tensors=[out]))[1] == "oversized"
    t = Tamper("corrupt", 1.0)
    assert t.apply(Message("commit"), Message("ok", tensors=[out]))[0].tensors[0] is out and t.tampered == 0
    assert parse_tamper("corrupt:0.05@30") == ("corrupt", 0.05, 30)
    for bad in ("corrupt:0.05@", "corrupt:0.05@-1", "corrupt:0.05@x"):
        with pytest.raises(ValueError):
            parse_tamper(bad)
    late = Tamper("corrupt", 1.0, start=3)  # honest before step 3, a liar from it on
    assert late.apply(req, Message("ok", 2, 0, 1, tensors=[out]))[0].tensors[0] is out and late.tampered == 0
    assert not torch.equal(late.apply(Message("forward", 3, 0, 1), Message("ok", 3, 0, 1, tensors=[out]))[0].tensors[0],
                           out) and late.tampered == 1  # fmt: skip


_DIM = st.one_of(st.integers(0, 8), st.sampled_from([1 << 31, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.lists(st.tuples(st.integers(0, 255), st.lists(_DIM, max_size=10)), max_size=5),
       count=st.integers(0, 8), payload=st.binary(max_size=512))  # fmt: skip
@example(heads=[(1, []), (0, []), (0, []), (0, []), (0, [])], count=1, payload=b"")  # found by CI
def test_fuzz_tensor_headers_decode_exactly_or_raise_a_named_error(heads: list[tuple[int, list[int]]], count: int,
                                                                   payload: bytes) -> None:  # fmt: skip
    """Compact tensor headers built field by field (a lying count, dtype, rank or size): a message
    decodes only when its headers account for every byte, else a named error, never another one."""
    section = struct.pack("<I", count) + b"".join(struct.pack(f"<BB{len(d)}Q", c, len(d), *d) for c, d in heads)
    raw = _HEAD.pack(b"LWSW", VERSION, 2, 0, 0, 0, 0, 2) + b"{}" + section + payload
    try:
        msg = decode_message(raw, "fuzz", limit=1 << 20)
    except WireError as e:
        assert isinstance(reason_of(e), Reason)
        return
    # Decoded: the headers, read here independently, account for every byte. (What was built as
    # further headers may be a tensor's data: count=1 and four 2-byte headers after a scalar float64.)
    rest, pos, shapes = section + payload, struct.calcsize("<I"), []
    for _ in range(count):
        ndim = rest[pos + 1]
        shapes.append(struct.unpack_from(f"<{ndim}Q", rest, pos + 2))
        pos += 2 + 8 * ndim
    assert len(msg.tensors) == count and [tuple(t.shape) for t in msg.tensors] == shapes
    assert pos + sum(t.numel() * t.element_size() for t in msg.tensors) == len(rest)
