"""Stages driven by hand, as the executor drives them: microbatched gradients equal full-batch ones.

Each test splits a model into Stage objects, runs every microbatch's forward through them, hands
the outputs on and the input gradients back (directly, as between two stages on one rank, or
through the wire format, as between ranks), weights each microbatch's loss by its share of the
batch, and compares the accumulated parameter gradients with one backward of the unsplit model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerwise.models import GPT, GPTConfig, lm_loss, mlp
from layerwise.runtime.errors import StageError
from layerwise.runtime.microbatch import split_batch
from layerwise.runtime.split import as_layers, stage_bounds
from layerwise.runtime.stage import Stage
from layerwise.runtime.wire import GRADS, decode_header, decode_payload, encode, flatten

TOL = dict(rtol=1e-6, atol=1e-6)
M = 3  # microbatches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stages(layers: Sequence[nn.Module], counts: Sequence[int], loss_fn: Any, split: bool) -> list[Stage]:
    n = len(counts)
    return [
        Stage(index=s, layers=layers[a:b], first_layer=a, is_first=s == 0, is_last=s == n - 1,
              loss_fn=loss_fn, split_backward=split, where=f"rank {s} (stage {s})")
        for s, (a, b) in enumerate(stage_bounds(counts))
    ]  # fmt: skip


def _over_wire(obj: Any, structure: Any = None) -> Any:
    tensors, st = flatten(obj) if structure is None else (obj, structure)
    header, payload = encode(tensors, st)
    meta = decode_header(header, "peer")
    return meta.structure.unflatten(decode_payload(meta, payload.clone()))


def _run(
    stages: list[Stage], inputs: Any, targets: Any, *, split: bool, wire: bool, w_order: str = "reverse"
) -> torch.Tensor:
    """One training step by hand: all forwards, then the backwards (GPipe order)."""
    xs, ts = split_batch(inputs, M, "inputs"), split_batch(targets, M, "targets")
    sizes = [t.shape[0] for t in ts]
    weights = [n / sum(sizes) for n in sizes]
    hand = _over_wire if wire else (lambda o: o)
    loss = torch.zeros(())
    for mb in range(M):
        x = xs[mb]
        for st in stages[:-1]:
            x = hand(st.forward(mb, x))
        loss = loss + stages[-1].forward(mb, x, ts[mb], weights[mb])
    for mb in range(M):
        g = None
        for st in reversed(stages):
            g = st.backward_input(mb, g) if split else st.backward(mb, g)
            g = _over_wire(g, GRADS) if wire else g
            assert isinstance(g, (list, tuple))
        assert list(g) == []  # the first stage has no floating inputs: an empty gradient message
    if split:
        mbs = list(reversed(range(M))) if w_order == "reverse" else [1, 2, 0]
        for mb in mbs:  # W in a different order than I, and stage by stage backwards
            for st in reversed(stages):
                st.backward_weight(mb)
    for st in stages:
        assert st._saved == {}  # nothing kept after the step
    return loss


def _full_batch_grads(
    model: nn.Module, loss_of: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_grads(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, want[name], **TOL, msg=lambda m: f"{name}: {m}")


# -- gradients equal the unsplit model's ---------------------------------------------------

SPLITS = [
    pytest.param(False, False, "reverse", id="B"),
    pytest.param(False, True, "reverse", id="B-wire"),
    pytest.param(True, False, "reverse", id="IW-reverse"),
    pytest.param(True, True, "reverse", id="IW-reverse-wire"),
    pytest.param(True, False, "mixed", id="IW-mixed"),
]


@pytest.mark.parametrize(("split", "wire", "w_order"), SPLITS)
@pytest.mark.parametrize("counts", [[2, 2], [1, 3], [1, 1, 2]])
def test_mlp_microbatched_gradients_equal_full_batch(split: bool, wire: bool, w_order: str, counts: list[int]) -> None:
    torch.manual_seed(1)
    model = mlp(width=6, depth=4)
    x, y = torch.randn(10, 6), torch.randn(10, 6)  # 10 rows in 3 microbatches: 4, 3, 3
    want_loss, want = _full_batch_grads(model, lambda: F.mse_loss(model(x), y))
    stages = _stages(as_layers(model), counts, F.mse_loss, split)
    loss = _run(stages, x, y, split=split, wire=wire, w_order=w_order)
    torch.testing.assert_close(loss, want_loss, **TOL)
    _assert_grads(model, want)


@pytest.mark.parametrize(("split", "wire", "w_order"), SPLITS)
@pytest.mark.parametrize("tie", [True, False])
def test_gpt_microbatched_gradients_equal_full_batch(split: bool, wire: bool, w_order: str, tie: bool) -> None:
    torch.manual_seed(2)
    cfg = GPTConfig(vocab=32, context=8, width=16, heads=2, blocks=2, tie_embeddings=tie)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab, (5, cfg.context))  # 5 rows: 2, 2, 1
    tgt = torch.randint(0, cfg.vocab, (5, cfg.context))
    want_loss, want = _full_batch_grads(model, lambda: lm_loss(model(idx), tgt))
    # [embed, block, block, head] -> stage 0 holds the embedding, stage 1 the (tied) head
    stages = _stages(as_layers(model), [2, 2], lm_loss, split)
    loss = _run(stages, idx, tgt, split=split, wire=wire, w_order=w_order)
    torch.testing.assert_close(loss, want_loss, **TOL)
    _assert_grads(model, want)


class _Carry(nn.Module):
    """Returns (hidden, raw input, int positions): a boundary with a non-differentiable tensor
    and a floating tensor that does not require grad on the sending stage."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(x)), x, torch.arange(x.shape[0])


class _Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, h: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, raw, pos = h
        return self.lin(hidden) * self.scale + raw * (pos[:, None] % 3 + 1)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("wire", [False, True])
def test_tuple_boundary_with_integer_and_grad_free_tensors(split: bool, wire: bool) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(_Carry(), _Merge(), nn.Linear(4, 2))
    x, y = torch.randn(7, 4), torch.randn(7, 2)

    def full() -> torch.Tensor:
        # the unsplit model sees microbatch-local positions, as the stages do
        outs = [model(xm) for xm in split_batch(x, M, "x")]
        ys = split_batch(y, M, "y")
        return sum(F.mse_loss(o, t) * (t.shape[0] / 7) for o, t in zip(outs, ys))

    want_loss, want = _full_batch_grads(model, full)
    stages = _stages(as_layers(model), [1, 2], F.mse_loss, split)
    loss = _run(stages, x, y, split=split, wire=wire)
    torch.testing.assert_close(loss, want_loss, **TOL)
    _assert_grads(model, want)


def test_split_backward_input_gradient_equals_full_backward() -> None:
    torch.manual_seed(4)
    layers = as_layers(mlp(width=5, depth=3))
    h, g = torch.randn(4, 5), torch.randn(4, 5)
    full = _stages(layers, [1, 2], None, False)[1]
    full.is_last = False
    split = _stages(layers, [1, 2], None, True)[1]
    split.is_last = False
    full.forward(0, h)
    split.forward(0, h)
    gi_full = full.backward(0, [g])
    gi_split = split.backward_input(0, [g])
    assert len(gi_full) == len(gi_split) == 1
    torch.testing.assert_close(gi_split[0], gi_full[0], **TOL)
    # I alone leaves the weights untouched; W adds exactly what B added
    b_grads = [p.grad.clone() for p in full.parameters()]
    for p in full.parameters():
        p.grad = None
    split.backward_weight(0)
    for p, want in zip(split.parameters(), b_grads):
        torch.testing.assert_close(p.grad, want, **TOL)


# -- errors --------------------------------------------------------------------------------


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom at the bad layer")


def test_failing_first_layer_of_a_later_stage_names_layer_stage_microbatch_and_split_point() -> None:
    stage = Stage(index=1, layers=[nn.Linear(7, 4), nn.Tanh()], first_layer=2, is_first=False,
                  is_last=False, loss_fn=None, split_backward=False, where="rank 1 (stage 1)")  # fmt: skip
    with pytest.raises(StageError) as info:
        stage.forward(2, torch.randn(3, 8))  # the previous stage hands over width 8, not 7
    msg = str(info.value)
    assert "rank 1 (stage 1)" in msg
    assert "layer 2 (Linear(in_features=7" in msg  # the global index, not the stage-local 0
    assert "microbatch 2" in msg
    assert "(3, 8) float32" in msg  # the input it failed on
    assert "RuntimeError" in msg
    assert "first layer of stage 1" in msg and "split point" in msg
    assert info.value.__cause__ is None


@pytest.mark.parametrize("split", [False, True])
def test_failing_inner_layer_names_it_without_the_split_point_hint(split: bool) -> None:
    stage = Stage(index=2, layers=[nn.Linear(3, 3), _Boom(), nn.Linear(3, 3)], first_layer=5,
                  is_first=False, is_last=False, loss_fn=None, split_backward=split,
                  where="rank 2 (stage 2)")  # fmt: skip
    with pytest.raises(StageError) as info:
        stage.forward(0, torch.randn(2, 3))
    msg = str(info.value)
    assert "rank 2 (stage 2)" in msg and "layer 6 (_Boom())" in msg and "microbatch 0" in msg
    assert "ValueError: boom at the bad layer" in msg
    assert "split point" not in msg


def test_failing_first_layer_of_the_first_stage_has_no_split_point_hint() -> None:
    stage = Stage(index=0, layers=[_Boom()], first_layer=0, is_first=True, is_last=False,
                  loss_fn=None, split_backward=False, where="rank 0 (stage 0)")  # fmt: skip
    with pytest.raises(StageError) as info:
        stage.forward(4, torch.randn(2, 3))
    msg = str(info.value)
    assert "layer 0" in msg and "microbatch 4" in msg and "split point" not in msg


def test_failing_layer_names_its_stage_when_a_rank_holds_several() -> None:
    stage = Stage(index=3, layers=[nn.Linear(3, 3), _Boom()], first_layer=6, is_first=False,
                  is_last=False, loss_fn=None, split_backward=False, where="rank 1 (stages 1, 3)")  # fmt: skip
    with pytest.raises(StageError) as info:
        stage.forward(0, torch.randn(2, 3))
    assert "stage 3" in str(info.value)


@pytest.mark.parametrize("bad", [
    lambda out, t: (out - t) ** 2,  # forgot the mean: a (batch, width) tensor
    lambda out, t: F.mse_loss(out, t, reduction="none"),
    lambda out, t: 1.5,  # not a tensor
])  # fmt: skip
def test_loss_fn_that_returns_a_non_scalar_gives_stage_error(bad: Any) -> None:
    stage = Stage(index=1, layers=[nn.Linear(3, 3)], first_layer=4, is_first=False, is_last=True,
                  loss_fn=bad, split_backward=False, where="rank 1 (stage 1)")  # fmt: skip
    with pytest.raises(StageError, match=r"rank 1 \(stage 1\): loss_fn must return a scalar tensor, got "):
        stage.forward(0, torch.randn(2, 3), torch.randn(2, 3))


def test_loss_fn_that_raises_and_missing_loss_fn_give_stage_error() -> None:
    stage = Stage(index=1, layers=[nn.Linear(3, 3)], first_layer=1, is_first=False, is_last=True,
                  loss_fn=F.cross_entropy, split_backward=False, where="rank 1 (stage 1)")  # fmt: skip
    with pytest.raises(StageError) as info:
        stage.forward(2, torch.randn(2, 3), torch.randn(5, 7))
    msg = str(info.value)
    assert "loss_fn failed on microbatch 2" in msg and "(2, 3) float32" in msg and "(5, 7) float32" in msg
    stage.loss_fn = None
    with pytest.raises(StageError, match="pass loss_fn=..."):
        stage.forward(0, torch.randn(2, 3), torch.randn(2, 3))


def test_single_element_output_is_the_loss_without_loss_fn() -> None:
    torch.manual_seed(5)
    lin = nn.Linear(3, 1)
    stage = Stage(index=0, layers=[lin], first_layer=0, is_first=True, is_last=True,
                  loss_fn=None, split_backward=False, where="rank 0 (stage 0)")  # fmt: skip
    x = torch.randn(1, 3)
    loss = stage.forward(0, x, None, 0.5)
    torch.testing.assert_close(loss, (lin(x) * 0.5).reshape(()).detach(), **TOL)
    assert stage.backward(0, None) == []
    torch.testing.assert_close(lin.weight.grad, 0.5 * x, **TOL)


def test_gradient_count_or_shape_mismatch_gives_stage_error() -> None:
    stage = Stage(index=0, layers=[nn.Linear(3, 3)], first_layer=0, is_first=True, is_last=False,
                  loss_fn=None, split_backward=False, where="rank 0 (stage 0)")  # fmt: skip
    stage.forward(0, torch.randn(2, 3))
    with pytest.raises(StageError, match="got 2 gradients for microbatch 0 but the stage has 1"):
        stage.backward(0, [torch.randn(2, 3), torch.randn(2, 3)])
    stage.forward(1, torch.randn(2, 3))
    with pytest.raises(StageError, match=r"shape \(4, 3\) but the output has \(2, 3\)"):
        stage.backward(1, [torch.randn(4, 3)])
