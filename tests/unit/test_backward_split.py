"""I then W gives exactly the fused backward's gradients, per layer kind, and computes nothing twice."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from layerwise.models import GPTConfig
from layerwise.models.gpt import Block, Embedding, Head
from layerwise.runtime.backward_split import backward_input, backward_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = GPTConfig(vocab=64, context=16, width=32, heads=4, blocks=1)


class Attention(nn.Module):
    """The attention half of a GPT block: norm, qkv, causal attention, projection, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block(CFG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.block
        b, t, c = x.shape
        q, k, v = blk.qkv(blk.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, blk.heads, c // blk.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + blk.proj(y.transpose(1, 2).reshape(b, t, c))


class Twice(nn.Module):
    """One linear applied twice: its weight is reachable from a boundary node on both sides."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def _tokens(g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, CFG.vocab, (3, CFG.context), generator=g)


def _hidden(g: torch.Generator) -> torch.Tensor:
    return torch.randn(3, CFG.context, CFG.width, generator=g)


KINDS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(32, 48), _hidden),
    "layer_norm": (lambda: nn.LayerNorm(32), _hidden),
    "embedding": (lambda: Embedding(CFG), _tokens),
    "attention": (Attention, _hidden),
    "gpt_block": (lambda: Block(CFG), _hidden),
    "head": (lambda: Head(CFG), _hidden),
    "shared_weight": (Twice, _hidden),
}


def _setup(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    make, data = KINDS[kind]
    layer = make()
    g = torch.Generator().manual_seed(1)
    x = data(g)
    with torch.no_grad():
        out_shape = layer(x).shape
    return layer, copy.deepcopy(layer), x, torch.randn(out_shape, generator=g)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(x.is_floating_point())


def _split(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    xs = _leaf(x)
    inputs = [xs] if xs.requires_grad else []
    y = layer(xs)
    return backward_input([y], [gy], inputs, list(layer.parameters()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_input_then_weight_equals_fused_backward(kind: str) -> None:
    fused, split, x, gy = _setup(kind)
    xf = _leaf(x)
    fused(xf).backward(gy)
    gin, pending = _split(split, x, gy)
    assert all(p.grad is None for p in split.parameters()), "I must not compute weight gradients"
    if xf.requires_grad:
        assert torch.equal(gin[0], xf.grad)
    else:
        assert gin == []
    backward_weight(pending)
    for (name, pf), ps in zip(fused.named_parameters(), split.parameters()):
        if pf.grad is None:  # not used by this layer kind (the attention half of a block)
            assert ps.grad is None, f"{kind}: {name} is unused but got a gradient"
            continue
        assert ps.grad is not None, f"{kind}: {name} got no gradient from W"
        if kind == "shared_weight":  # two contributions, summed in another order than autograd's
            torch.testing.assert_close(ps.grad, pf.grad, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(ps.grad, pf.grad), f"{kind}: {name} differs by {(ps.grad - pf.grad).abs().max()}"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "shared_weight"])
def test_input_and_weight_together_cost_the_fused_backwards_flops(kind: str) -> None:
    """No recomputation: the FLOPs of I plus W are those of the fused backward, and I's FLOPs
    are only the input-gradient part (less than the whole whenever the layer has weights)."""
    fused, split, x, gy = _setup(kind)
    xf = _leaf(x)
    y = fused(xf)
    with FlopCounterMode(display=False) as whole:
        y.backward(gy)
    xs = _leaf(x)
    ys = split(xs)
    with FlopCounterMode(display=False) as first:
        _, pending = backward_input([ys], [gy], [xs] if xs.requires_grad else [], list(split.parameters()))
    with FlopCounterMode(display=False) as second:
        backward_weight(pending)
    total = whole.get_total_flops()
    assert first.get_total_flops() + second.get_total_flops() == total
    if total:
        assert second.get_total_flops() > 0


def test_weight_gradients_accumulate_over_microbatches_in_any_order() -> None:
    fused, split, _, _ = _setup("gpt_block")
    g = torch.Generator().manual_seed(5)
    data = [(_hidden(g), torch.randn(3, CFG.context, CFG.width, generator=g)) for _ in range(3)]
    for x, gy in data:
        fused(_leaf(x)).backward(gy)
    pendings = [_split(split, x, gy)[1] for x, gy in data]
    for k in (0, 1, 2):  # W in the order I ran; float sums are order-sensitive, so keep it
        backward_weight(pendings[k])
    for pf, ps in zip(fused.parameters(), split.parameters()):
        assert torch.equal(ps.grad, pf.grad)


def test_loss_output_and_unused_input() -> None:
    """The last stage's output is the loss (gradient None); an input that does not reach the
    loss gets a zero gradient, as in the fused backward."""
    lin = nn.Linear(8, 8)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss = lin(a).pow(2).mean()
    gin, pending = backward_input([loss], None, [a, b], list(lin.parameters()))
    assert torch.equal(gin[1], torch.zeros_like(b))
    backward_weight(pending)
    ref = copy.deepcopy(lin)
    ra = a.detach().clone().requires_grad_(True)
    ref(ra).pow(2).mean().backward()
    assert torch.equal(gin[0], ra.grad)
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(lin.bias.grad, ref.bias.grad)
