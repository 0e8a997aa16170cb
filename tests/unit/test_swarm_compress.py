"""The swarm's activation codecs (swarm/compress.py): error bounds, error feedback, replay, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from layerwise.swarm.compress import (
    Compression, Packed, Streams, attach, decode_tensor, decoded, encode_tensor, kept, pack_reply, projection, unpack,
)  # fmt: skip
from layerwise.swarm.errors import WireError
from layerwise.swarm.wire import Message, decode_message, encode_message

pytestmark = pytest.mark.timeout(60)


def _x(seed: int = 0, shape: tuple[int, ...] = (2, 32, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.01, 10, shape[-1])  # blocks of very different scale


def _roundtrip(x: torch.Tensor, cfg: Compression, residual: torch.Tensor | None = None) -> torch.Tensor:
    entry, wire, _ = encode_tensor(x, cfg, residual)
    # through the real wire format: header + raw bytes, nothing pickled
    msg = decode_message(encode_message(Message("ok", meta={"packed": [entry]}, tensors=wire)), "test")
    return unpack(msg.meta, msg.tensors)[0]


def test_bf16_roundtrip_error_bound() -> None:
    x = _x()
    y = _roundtrip(x, Compression(mode="bf16"))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert float(((y - x).abs() / x.abs().clamp_min(1e-30)).max()) <= 2**-8


@pytest.mark.parametrize("mode, levels", [("int8", 127), ("int6", 31), ("int4", 7)])
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("shape", [(2, 32, 64), (3, 5, 7)])  # 7 * 15 = 105: odd, and not a multiple of a block
def test_blockwise_roundtrip_error_bound_per_block(mode: str, levels: int, block: int, shape: tuple[int, ...]) -> None:
    x = _x(1, shape)
    y = _roundtrip(x, Compression(mode=mode, block=block))
    err = (y - x).reshape(-1)
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), block):  # |error| <= absmax / (2 levels) within each block (plus fp32 rounding)
        bound = float(flat[i : i + block].abs().max()) / (2 * levels) * (1 + 1e-5) + 1e-12
        assert float(err[i : i + block].abs().max()) <= bound
    assert block == 1 or not torch.equal(y, x)  # a block of one element is its own scale: exact


@pytest.mark.parametrize("mode", ["int8", "int6", "int4"])
def test_blockwise_zero_and_constant_blocks(mode: str) -> None:
    x = torch.zeros(4, 64)
    x[1] = 3.0
    x[2] = -0.5
    y = _roundtrip(x, Compression(mode=mode))
    assert torch.equal(y, x)


def test_wire_bytes_per_element() -> None:
    x = _x(0, (2, 32, 64))  # 4096 elements, 64 blocks of 64
    sizes = {}
    for mode in ("bf16", "int8", "int6", "int4", "lowrank"):
        _, wire, _ = encode_tensor(x, Compression(mode=mode, rank=8))
        sizes[mode] = sum(t.numel() * t.element_size() for t in wire)
    assert sizes == {"bf16": 8192, "int8": 4096 + 256, "int6": 3072 + 256, "int4": 2048 + 256,
                     "lowrank": 2 * 32 * 8 * 4}


def test_whole_messages_on_the_wire_shrink_close_to_their_payloads() -> None:
    """A swarm message costs its payload plus a few hundred bytes (routing header, JSON meta, 26 bytes
    of tensor header), not the runtime's 2 KiB: int6 crosses with over 4x fewer bytes than none."""
    x = _x(0, (2, 32, 64))
    sizes = {}
    for mode in ("none", "bf16", "int8", "int6", "int4", "lowrank"):
        cfg = Compression(mode=mode)
        req = {"weight": 0.25} | ({} if cfg.exact else {"compress": cfg.to_meta()})
        meta, wire = pack_reply(req.get("compress"), Streams(), 0, "fwd", 0, [x])
        tensors = attach(req, [kept(meta, wire, single=True)])
        sizes[mode] = len(encode_message(Message("forward", 0, 1, 0, 1, req, tensors)))
        payload = sum(t.numel() * t.element_size() for t in tensors)
        assert payload < sizes[mode] <= payload + 250
    assert sizes["none"] / sizes["int6"] > 4.5 and sizes["none"] / sizes["int4"] > 6
    assert sizes["none"] / sizes["int8"] > 3.5


def test_lowrank_is_the_orthogonal_projection() -> None:
    cfg = Compression(mode="lowrank", rank=8, seed=3)
    p = projection(64, 8, 3)
    assert torch.allclose(p.T @ p, torch.eye(8), atol=1e-5)  # orthonormal
    x = _x(2)
    y = _roundtrip(x, cfg)
    assert torch.allclose(y, x @ p @ p.T, atol=1e-4)
    inside = torch.randn(2, 32, 8) @ p.T  # a tensor in the subspace crosses unchanged
    assert torch.allclose(_roundtrip(inside, cfg), inside, atol=1e-5)


def test_token_ids_targets_and_scalars_are_never_compressed() -> None:
    for cfg in (Compression(mode="int8"), Compression(mode="bf16"), Compression(mode="lowrank")):
        ids = torch.randint(0, 256, (2, 32))
        loss = torch.tensor(2.5)
        for t in (ids, loss):
            entry, wire, _ = encode_tensor(t, cfg)
            assert entry == {"c": "raw"} and wire[0] is not None and torch.equal(wire[0], t)


@pytest.mark.parametrize("mode, levels", [("int8", 127), ("int6", 31), ("int4", 7)])
def test_error_feedback_bounds_the_accumulated_error(mode: str, levels: int) -> None:
    """Along one stream, the sum of errors stays one residual with error feedback, and grows without."""
    n = 200
    xs = [_x(10 + i, (2, 8, 64)) * 0.1 + 0.05 for i in range(n)]  # a bias, as activations have
    totals = {}
    for ef in (True, False):
        cfg = Compression(mode=mode, block=64, error_feedback=ef)
        streams = Streams()
        total = torch.zeros(2, 8, 64)
        for k, x in enumerate(xs):
            p = streams.encode(cfg, k, "fwd", 0, [x])
            total += unpack({"packed": p.entries}, p.wire)[0] - x
            streams.commit(k)
        totals[ef] = float(total.abs().max())
    one_error = max(float(x.abs().max()) for x in xs) / (2 * levels)
    assert totals[True] <= 2 * one_error  # telescoping: the sum of errors is minus the last residual
    assert totals[False] > 5 * totals[True]


def test_replay_encodes_identically_and_does_not_advance_the_stream() -> None:
    cfg = Compression(mode="int8", block=32)
    a, b = Streams(), Streams()
    xs = [_x(20 + i, (2, 4, 64)) for i in range(3)]
    for k, x in enumerate(xs):
        first = a.encode(cfg, k, "bwd", 1, [x])
        again = a.encode(cfg, k, "bwd", 1, [x])  # a retry or replay of the same message, same step
        again2 = a.encode(cfg, k, "bwd", 1, [x])
        once = b.encode(cfg, k, "bwd", 1, [x])  # a sender that sent it once
        for p in (again, again2, once):
            assert p.entries == first.entries and all(torch.equal(u, v) for u, v in zip(p.wire, first.wire))
        a.commit(k)
        b.commit(k)
        assert all(torch.equal(a.committed[key], b.committed[key]) for key in a.committed)
    assert a.pending == {} and len(a.committed) == 1
    # other microbatch slots and directions are other streams
    c = Streams()
    c.encode(cfg, 0, "fwd", 0, [xs[0]])
    c.encode(cfg, 0, "fwd", 1, [xs[1]])
    c.encode(cfg, 0, "bwd", 0, [xs[2]])
    c.commit(0)
    assert set(c.committed) == {("fwd", 0, 0), ("fwd", 1, 0), ("bwd", 0, 0)}


def test_uncommitted_step_leaves_the_stream_unchanged() -> None:
    cfg = Compression(mode="int8")
    s = Streams()
    x = _x(5)
    first = s.encode(cfg, 0, "fwd", 0, [x])
    s.commit(0)
    second = s.encode(cfg, 1, "fwd", 0, [x])  # uses step 0's residual
    again = s.encode(cfg, 1, "fwd", 0, [x])  # step 1 not committed: still step 0's residual
    assert all(torch.equal(u, v) for u, v in zip(second.wire, again.wire))
    assert not all(torch.equal(u, v) for u, v in zip(first.wire, second.wire))


def test_a_residual_of_another_shape_is_dropped() -> None:
    cfg = Compression(mode="int8")
    s = Streams()
    s.encode(cfg, 0, "fwd", 0, [_x(1, (2, 8, 64))])
    s.commit(0)
    x = _x(2, (1, 8, 64))
    p = s.encode(cfg, 1, "fwd", 0, [x])
    fresh = Streams().encode(cfg, 1, "fwd", 0, [x])
    assert all(torch.equal(u, v) for u, v in zip(p.wire, fresh.wire))


def test_trainer_side_pass_through() -> None:
    """The trainer keeps replies as they came and forwards them; exact runs keep plain tensors."""
    x, t = _x(3), torch.randint(0, 256, (2, 32))
    meta, wire = pack_reply(None, None, 0, "fwd", 0, [x])
    assert meta == {} and kept(meta, wire, single=True) is x
    req: dict = {}
    assert attach(req, [x, t]) == [x, t] and "packed" not in req  # exactly as without compression
    meta, wire = pack_reply(Compression(mode="int8").to_meta(), Streams(), 0, "fwd", 0, [x])
    item = kept(meta, wire, single=True)
    assert isinstance(item, Packed)
    req = {}
    out = unpack(req, attach(req, [item, t]))
    assert torch.equal(out[1], t) and float((out[0] - x).abs().max()) <= float(x.abs().max()) / 254 * 1.001
    assert torch.equal(decoded(item), out[0])


_I8 = {"c": "int8", "shape": [2, 64], "block": 64, "dtype": "float32"}
_I4 = dict(_I8, c="int4")
_I6 = dict(_I8, c="int6")
_LR = {"c": "lowrank", "rank": 8, "seed": 0, "hidden": 64, "dtype": "float32"}
_CODES = torch.zeros(128, dtype=torch.int8)


@pytest.mark.parametrize(
    "entries, wire",
    [
        ([_I8], [torch.zeros(100, dtype=torch.int8), torch.ones(2)]),
        ([_I8], [_CODES, torch.ones(3)]),
        ([_I8], [torch.zeros(128), torch.ones(2)]),
        ([_I8], [_CODES, torch.tensor([1.0, float("nan")])]),
        ([_I8], [_CODES, torch.tensor([1.0, -1.0])]),
        ([dict(_I8, shape=[2, -64])], [_CODES, torch.ones(2)]),
        ([dict(_I8, block=0)], [_CODES, torch.ones(2)]),
        ([dict(_I8, shape="2x64")], [_CODES, torch.ones(2)]),
        ([dict(_I8, dtype="object")], [_CODES, torch.ones(2)]),
        ([_I8], [torch.zeros(128, dtype=torch.int8)]),
        ([_I4], [torch.zeros(128, dtype=torch.uint8), torch.ones(2)]),
        ([_I4], [torch.zeros(64, dtype=torch.int8), torch.ones(2)]),
        ([_I6], [torch.zeros(64, dtype=torch.uint8), torch.ones(2)]),  # 64 bytes: int4's size, not int6's 96
        ([_I6], [torch.zeros(96, dtype=torch.uint8), torch.ones(1)]),
        ([{"c": "bf16", "dtype": "float32"}], [torch.zeros(4, 4)]),
        ([_LR], [torch.zeros(4, 7)]),
        ([dict(_LR, hidden=8)], [torch.zeros(4, 8)]),
        ([dict(_LR, seed=-1)], [torch.zeros(4, 8)]),
        ([dict(_LR, hidden=10**9)], [torch.zeros(4, 8)]),
        ([{"c": "zstd"}], [torch.zeros(4)]),
        ([{"c": "raw"}], [torch.zeros(4), torch.zeros(4)]),  # a tensor beyond the entries
        ([{"c": "raw"}, {"c": "raw"}], [torch.zeros(4)]),  # an entry beyond the tensors
        ("int8", [torch.zeros(4)]),
    ],
)
def test_bad_input_is_refused_with_a_reason(entries: object, wire: list[torch.Tensor]) -> None:
    with pytest.raises(WireError, match="compressed|packed|tensors"):
        unpack({"packed": entries}, wire, "forward (step 0, stage 1, microbatch 0)")


def test_bad_settings_are_refused() -> None:
    for meta in ({"mode": "int2"}, {"mode": "int8", "block": 0}, {"mode": "lowrank", "rank": -1}, {"x": 1}, "int8",
                 {"mode": "int8", "ef": "yes"}, {"mode": "lowrank", "seed": 2**70}):  # fmt: skip
        with pytest.raises(WireError):
            Compression.from_meta(meta)
    with pytest.raises(ValueError, match="--compress"):
        Compression(mode="fp8")
    assert Compression.from_meta(Compression(mode="lowrank", rank=4, seed=9).to_meta()) == Compression(
        mode="lowrank", rank=4, seed=9
    )


def test_decode_tensor_rejects_a_lying_entry_count() -> None:
    with pytest.raises(WireError):
        decode_tensor({"c": "int8"}, [torch.zeros(3)])


def test_compressed_reference_without_compression_is_one_process() -> None:
    from layerwise.swarm.lossy_reference import compressed_reference
    from layerwise.swarm.reference import max_diff, reference
    from layerwise.swarm.spec import SwarmSpec

    spec = SwarmSpec(width=16, heads=2, blocks=2, seq=8, batch_size=4, microbatches=2, data=__file__)
    want, losses = reference(spec, 2)
    got, got_losses = compressed_reference(spec, 2, Compression(), [1, 2, 1])
    assert got_losses == losses and max_diff(got, want) == 0.0
    lossy, lossy_losses = compressed_reference(spec, 2, Compression(mode="int8"), [1, 2, 1])
    assert lossy_losses[0] != losses[0] or max_diff(lossy, want) > 0.0
    with pytest.raises(ValueError, match="do not cover"):
        compressed_reference(spec, 1, Compression(), [1, 1])


@pytest.mark.parametrize("bits", [4, 6])
def test_bit_packing_round_trips_every_code(bits: int) -> None:
    from layerwise.swarm.compress import _pack_bits, _unpack_bits

    for n in (1, 2, 3, 5, 64, 4097):
        u = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
        packed = _pack_bits(u, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
        assert torch.equal(_unpack_bits(packed, bits, n), u.to(torch.int32))


def test_to_meta_sends_only_the_settings_of_its_mode() -> None:
    for cfg in (Compression(), Compression(mode="int6", block=32, error_feedback=False),
                Compression(mode="lowrank", rank=4, seed=7), Compression(mode="bf16")):
        assert Compression.from_meta(cfg.to_meta()) == dataclasses.replace(
            Compression(mode=cfg.mode), **{k: getattr(cfg, k) for k in _USED[cfg.mode]})
    assert Compression(mode="int8").to_meta() == {"mode": "int8", "block": 64, "ef": True}


_USED = {"none": (), "bf16": (), "int6": ("block", "error_feedback"), "lowrank": ("rank", "seed")}


def test_cli_compress_options_build_the_compression() -> None:
    import argparse

    from layerwise.commands.swarm import compression_from_args

    ns = argparse.Namespace(compress="int6", compress_rank=8, seed=3, compress_no_ef=True)
    assert compression_from_args(ns) == Compression(mode="int6", seed=3, error_feedback=False)
    ns.compress_no_ef = False
    assert compression_from_args(ns).error_feedback
