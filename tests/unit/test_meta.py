"""Meta-device builds: each rank materializes only its layers, with the eager build's values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.models import GPT, GPTConfig
from layerwise.parallel.meta import is_meta, materialize, materializer
from layerwise.runtime.errors import ConfigError
from layerwise.runtime.split import LayeredModel, as_layers

CFG = GPTConfig(vocab=40, context=8, width=16, heads=2, blocks=4)


def _gpt(meta: bool, seed: int = 7, cfg: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return GPT(cfg)
    return GPT(cfg)


@pytest.mark.parametrize("owned", [[0], [5], [1, 2], [0, 5], [3, 4, 5], list(range(6))])
def test_gpt_layers_equal_the_eager_build(owned: list[int]) -> None:
    eager = as_layers(_gpt(False))
    model = _gpt(True)
    layers = as_layers(model)
    materialize(layers, owned, materializer(model))
    for i in range(len(layers)):
        if i not in owned:
            assert is_meta([layers[i]]), f"layer {i} is not this rank's and must stay unallocated"
            continue
        for (name, a), (_, b) in zip(eager[i].named_parameters(), layers[i].named_parameters()):
            assert torch.equal(a, b), f"layer {i} {name}"
    if 0 in owned and 5 in owned:  # the tie stays one parameter on a rank holding both ends
        assert layers[5].lm.weight is layers[0].tok.weight


def test_untied_gpt_and_the_global_generator_after_the_build() -> None:
    cfg = GPTConfig(vocab=40, context=8, width=16, heads=2, blocks=2, tie_embeddings=False)
    eager = _gpt(False, 3, cfg)
    after_eager = torch.rand(3)
    model = _gpt(True, 3, cfg)
    after_meta = torch.rand(3)
    assert torch.equal(after_eager, after_meta), "both builds must leave the generator alike"
    layers = as_layers(model)
    materialize(layers, [3], materializer(model))
    assert torch.equal(layers[3].lm.weight, eager.head.lm.weight)
    assert not torch.equal(layers[3].lm.weight[: cfg.vocab], eager.embed.tok.weight)


def test_default_init_is_replayed_for_plain_torch_layers() -> None:
    def build() -> nn.Sequential:
        return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh()) for _ in range(5)])

    torch.manual_seed(11)
    eager = build()
    torch.manual_seed(11)
    with torch.device("meta"):
        model = build()
    materialize(list(model), [1, 4])
    for i in (1, 4):
        for a, b in zip(eager[i].parameters(), model[i].parameters()):
            assert torch.equal(a, b)
    assert is_meta([model[0]]) and is_meta([model[2]])


def test_a_tensor_no_reset_parameters_covers_is_refused() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Custom())
    with pytest.raises(ConfigError, match="materialize_layer"):
        materialize(list(model), [1])


def test_a_layered_model_hook_fills_only_owned_layers() -> None:
    seen: list[int] = []

    def fill(i: int, layer: nn.Module) -> None:
        seen.append(i)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for p in layer.parameters():
                p.fill_(float(i))

    with torch.device("meta"):
        blocks = [nn.Linear(3, 3) for _ in range(4)]
    model = LayeredModel(blocks=blocks, materialize=fill)
    layers = as_layers(model)
    materialize(layers, [2], materializer(model))
    assert seen == [2]
    assert torch.equal(layers[2].weight, torch.full((3, 3), 2.0)) and is_meta([layers[1]])
