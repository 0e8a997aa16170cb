"""Activation checkpointing: same gradients as none, fewer activations kept, the right ops recomputed.

The gradients are compared with ``torch.equal``, not a tolerance: recomputation replays the same
kernels on the same inputs, with the same RNG state (dropout) and in the same order, and on the
CPU those kernels are deterministic, so every bit matches. (On a GPU, kernels that accumulate with
atomics could differ in the last bits; the tests here run on the CPU.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from layerwise.parallel.activation_memory import ActivationTracker
from layerwise.parallel.checkpointing import ac_mode, apply_ac
from layerwise.runtime.errors import ConfigError

from .memory_models import OpCounter, gpt, gpt_batch, layers_of, loss_of, prepared, step, structured, structured_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, torch.Tensor]]]] = {
    "gpt": (gpt, gpt_batch),
    "structured": (structured, structured_batch),  # dicts and tuples between layers, dropout
}
CASES = [("full", 1), ("full", 2), ("full", 3), ("selective", 1), ("selective", 2)]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize(("mode", "every"), CASES)
def test_gradients_equal_no_checkpointing(model_name: str, mode: str, every: int) -> None:
    make, batch = MODELS[model_name]
    base = make()
    x, y = batch()
    want_loss, want = step(copy.deepcopy(base), x, y)
    model, _ = prepared(base, lambda layers: apply_ac(layers, mode, every=every))
    loss, got = step(model, x, y)
    assert torch.equal(loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        assert want[name].abs().sum() > 0, name
        assert torch.equal(got[name], want[name]), name
    # names, and so state_dict keys, are those of the unwrapped model
    assert list(model.state_dict()) == list(base.state_dict())
    modes = [ac_mode(layer) for layer in layers_of(model)]
    assert modes == [mode if (i + 1) % every == 0 else "none" for i in range(len(modes))]


def _kept_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, OpCounter]:
    """(bytes the forward leaves alive, bytes that went through saved-tensor hooks, ops the
    backward ran)."""
    hooked = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        hooked[0] += t.numel() * t.element_size()
        return t

    with ActivationTracker() as tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    kept = tracker.live_bytes(exclude=[*model.parameters(), loss])
    with OpCounter() as ops:
        loss.backward()
    return kept, hooked[0], ops


@pytest.mark.parametrize("model_name", MODELS)
def test_checkpointing_keeps_fewer_activations(model_name: str) -> None:
    make, batch = MODELS[model_name]
    base = make()
    x, y = batch()
    kept, hooked = {}, {}
    for mode, every in [("none", 1), ("full", 1), ("full", 2), ("selective", 1)]:
        model, _ = prepared(base, lambda layers: apply_ac(layers, mode, every=every))
        kept[mode, every], hooked[mode, every], _ = _kept_bytes(model, x, y)
    # full keeps only each layer's inputs; selective also its matmul outputs; every 2nd in between
    assert kept["full", 1] < 0.5 * kept["none", 1]
    assert kept["full", 1] < kept["selective", 1] < kept["none", 1]
    assert kept["full", 1] < kept["full", 2] < kept["none", 1]
    # inside a checkpointed region checkpoint's own hooks take the saved tensors: an outer hook
    # sees only what is saved outside the layers (the loss), and half of it with every=2
    assert hooked["full", 1] < 0.2 * hooked["none", 1]
    assert hooked["full", 1] < hooked["full", 2] < hooked["none", 1]


def test_full_recomputes_everything_selective_only_the_cheap_ops() -> None:
    base = gpt()
    x, y = gpt_batch()
    ops = {}
    for mode in ("none", "full", "selective"):
        model, _ = prepared(base, lambda layers: apply_ac(layers, mode))
        ops[mode] = _kept_bytes(model, x, y)[2].counts
    blocks = 4
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    # gelu and the attention kernel are forward ops: the backward runs them only to recompute
    assert ops["none"]["gelu"] == 0 and ops["none"][sdpa] == 0
    assert ops["full"]["gelu"] == blocks and ops["full"][sdpa] == blocks
    assert ops["full"]["addmm"] > 0  # the linears' forward matmuls, recomputed
    assert ops["selective"]["gelu"] == blocks  # cheap: recomputed
    assert ops["selective"][sdpa] == 0 and ops["selective"]["addmm"] == 0  # kept
    assert ops["selective"]["mm"] == ops["none"]["mm"]  # the backward's own matmuls, no more


def test_none_unwraps_and_deepcopy_wraps_the_copy() -> None:
    model = gpt()
    block = model.blocks[0]
    apply_ac([block], "full")
    assert "forward" in block.__dict__
    clone = copy.deepcopy(block)
    assert clone.forward.__self__ is clone  # the copy runs its own weights, not the original's
    assert ac_mode(clone) == "full"
    apply_ac([block], "selective")
    assert ac_mode(block) == "selective"
    apply_ac([block], "none")
    assert "forward" not in block.__dict__ and ac_mode(block) == "none"
    x = torch.randn(2, 16, 32)
    assert torch.equal(block(x), clone(x))


def test_keyword_arguments_and_no_grad() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return torch.tanh(self.lin(x)) * scale

    torch.manual_seed(0)
    layer = Scaled()
    x = torch.randn(3, 4, requires_grad=True)
    want = layer(x, scale=2.0)
    want.sum().backward()
    want_grad = [x.grad.clone(), layer.lin.weight.grad.clone()]
    x.grad, layer.lin.weight.grad = None, None
    apply_ac([layer], "full")
    with torch.no_grad():  # evaluation: nothing to checkpoint, just the forward
        assert torch.equal(layer(x, scale=2.0), want.detach())
    got = layer(x, scale=2.0)
    got.sum().backward()
    assert torch.equal(x.grad, want_grad[0]) and torch.equal(layer.lin.weight.grad, want_grad[1])


def test_indices_count_every_kth_over_the_whole_model() -> None:
    layers = [nn.Linear(2, 2) for _ in range(3)]
    apply_ac(layers, "full", every=2, indices=[3, 4, 5])  # model layers 3, 4, 5: the 4th and 6th
    assert [ac_mode(m) for m in layers] == ["full", "none", "full"]
    apply_ac(layers, "full", every=2, indices=[1, 6, 9])  # an interleaved rank's two chunks
    assert [ac_mode(m) for m in layers] == ["full", "none", "full"]
    with pytest.raises(ConfigError, match="3 layers but 2 indices"):
        apply_ac(layers, "full", indices=[0, 1])


@pytest.mark.parametrize(
    ("mode", "every", "says"),
    [("partial", 1, "'partial' is not one of none, full, selective"), ("full", 0, "every=0"),
     ("full", 1.5, "every=1.5"), ("full", True, "every=True")],
)  # fmt: skip
def test_bad_options_are_one_line_errors(mode: str, every: int, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_ac([nn.Linear(2, 2)], mode, every=every)
    assert says in str(e.value) and "\n" not in str(e.value)
