"""The split backward of a stage with linear layers: I defers their weight gradients, W computes
them; every gradient is bit-identical to the stage's fused backward, and nothing is computed twice."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from layerwise.models import GPT, GPTConfig, lm_loss
from layerwise.parallel.checkpointing import apply_ac
from layerwise.runtime.stage import Stage
from layerwise.runtime.weight_store import deferrable, deferring

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = GPTConfig(vocab=64, context=16, width=32, heads=4, blocks=2)


def _stage(layers: list[nn.Module], first: bool, last: bool, split: bool) -> Stage:
    return Stage(index=0 if first else 1, layers=layers, first_layer=0, is_first=first, is_last=last,
                 loss_fn=lm_loss if last else None, split_backward=split, where="rank 0 (stage 0)")  # fmt: skip


def _params(layers: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return list(nn.ModuleList(layers).named_parameters())


def _run(layers: list[nn.Module], first: bool, last: bool, split: bool, data: list[tuple[Any, Any]]) -> list[Any]:
    """Forward every microbatch, then backward them in order (split: every I, then every W)."""
    st = _stage(layers, first, last, split)
    gins = []
    for mb, (x, y) in enumerate(data):
        st.forward(mb, x, y if last else None, 0.5)
    for mb, (_, y) in enumerate(data):
        g = None if last else [y]
        gins.append(st.backward_input(mb, g) if split else st.backward(mb, g))
    if split:
        linear_weights = [m.weight for m in st._linears]
        assert linear_weights and all(w.grad is None for w in linear_weights), "I must leave linear weights to W"
        for mb in range(len(data)):
            st.backward_weight(mb)
    return gins


def _data(first: bool, last: bool, n: int = 3) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, CFG.vocab, (2, CFG.context + 1), generator=g)
        x = tokens[:, :-1] if first else torch.randn(2, CFG.context, CFG.width, generator=g)
        y = tokens[:, 1:] if last else torch.randn(2, CFG.context, CFG.width, generator=g)
        out.append((x, y))
    return out


@pytest.mark.parametrize("where", ["first", "middle", "last", "whole", "whole_tied"])
@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_split_stage_gives_the_fused_stages_gradients_bit_for_bit(where: str, ac: str) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=CFG.vocab, context=CFG.context, width=CFG.width, heads=CFG.heads, blocks=2,
                          tie_embeddings=where == "whole_tied"))  # fmt: skip
    layers = model.pipeline_layers()
    first, last = where in ("first", "whole", "whole_tied"), where in ("last", "whole", "whole_tied")
    layers = layers if where.startswith("whole") else layers[:2] if first else layers[2:] if last else layers[1:3]
    fused, split = copy.deepcopy(layers), copy.deepcopy(layers)
    apply_ac(fused, ac)
    apply_ac(split, ac)
    data = _data(first, last)
    gin_f = _run(fused, first, last, False, data)
    gin_s = _run(split, first, last, True, data)
    for a, b in zip(gin_f, gin_s):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    for (name, pf), (_, ps) in zip(_params(fused), _params(split)):
        assert ps.grad is not None, f"{name} got no gradient"
        assert torch.equal(pf.grad, ps.grad), f"{name} differs by {(pf.grad - ps.grad).abs().max()}"


def test_input_and_weight_halves_cost_the_fused_flops() -> None:
    layers = GPT(CFG).pipeline_layers()[1:3]
    fused, split = copy.deepcopy(layers), copy.deepcopy(layers)
    (x, gy), = _data(False, False, 1)  # fmt: skip
    sf, ss = _stage(fused, False, False, False), _stage(split, False, False, True)
    sf.forward(0, x)
    ss.forward(0, x)
    with FlopCounterMode(display=False) as whole:
        sf.backward(0, [gy])
    with FlopCounterMode(display=False) as first:
        ss.backward_input(0, [gy])
    with FlopCounterMode(display=False) as second:
        ss.backward_weight(0)
    assert first.get_total_flops() + second.get_total_flops() == whole.get_total_flops()
    assert second.get_total_flops() > 0.3 * whole.get_total_flops()  # dW of every linear layer


def test_tied_subclassed_and_hooked_layers() -> None:
    """A weight two modules use, a subclass of nn.Linear and a parameter with a gradient hook
    keep their gradients in I; the hook runs once, with the fused backward's gradient."""

    class MyLinear(nn.Linear):
        pass

    shared = nn.Linear(8, 8)
    other = nn.Linear(8, 8)
    other.weight = shared.weight
    sub, hooked = MyLinear(8, 8), nn.Linear(8, 8)
    assert deferrable([nn.Sequential(shared, other, sub, hooked)]) == [hooked]
    ref = copy.deepcopy(hooked)
    seen: list[torch.Tensor] = []
    hooked.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    x = torch.randn(4, 8)
    gy = torch.randn(4, 8)
    st = _stage([hooked], False, False, True)
    st.forward(0, x)
    st.backward_input(0, [gy])
    assert len(seen) == 1 and hooked.weight.grad is not None  # the hooked layer ran whole in I
    st.backward_weight(0)
    ref(x).backward(gy)
    assert len(seen) == 1 and torch.equal(seen[0], ref.weight.grad) and torch.equal(hooked.weight.grad, ref.weight.grad)
    assert torch.equal(hooked.bias.grad, ref.bias.grad)


def test_deferring_leaves_the_module_as_it_was() -> None:
    lin = nn.Linear(4, 4)
    with deferring([lin], store=None):  # type: ignore[arg-type]
        assert "forward" in lin.__dict__
    assert "forward" not in lin.__dict__
    with torch.no_grad(), deferring([lin], store=None):  # type: ignore[arg-type]
        lin(torch.randn(2, 4))  # no graph: plain F.linear, the store is never touched


class _Matmul(nn.Module):
    """A matrix weight outside nn.Linear: the stage falls back to the general graph split."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w)


@pytest.mark.parametrize(("make", "mode"), [(lambda: nn.LayerNorm(8), "whole"), (_Matmul, "graph"),
                                            (lambda: nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), "deferred")])  # fmt: skip
def test_each_split_mode_gives_the_fused_gradients(make: Any, mode: str) -> None:
    torch.manual_seed(0)
    layer = make()
    ref = copy.deepcopy(layer)
    st = _stage([layer], False, False, True)
    assert st._split == mode
    x, gy = torch.randn(4, 8), torch.randn(4, 8)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(gy)
    st.forward(0, x)
    (gin,) = st.backward_input(0, [gy])
    assert torch.equal(gin, xr.grad)
    matrices = [p for p in layer.parameters() if p.dim() == 2]
    assert all((p.grad is None) == (mode != "whole") for p in matrices), "I leaves matrix weights to W unless whole"
    st.backward_weight(0)
    for pr, p in zip(ref.parameters(), layer.parameters()):
        assert torch.equal(pr.grad, p.grad)
