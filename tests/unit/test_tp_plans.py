"""The tensor-parallel plan registry and its checks, without processes (the equivalence with one
process is tests/distributed/test_tp.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from layerwise.models import GPT, GPTConfig
from layerwise.models import gpt as gpt_module
from layerwise.parallel.tensor import apply_tp, fsdp_shard_placement, register_tp_plan, tp_plan_for
from layerwise.runtime.errors import ConfigError


class _Mesh:
    """Just enough of a 1-D DeviceMesh for apply_tp's checks, which run before any collective."""

    ndim = 1

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _gpt(**kw: Any) -> list[nn.Module]:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab": 48, "context": 16, "width": 24, "heads": 4, "blocks": 2, **kw})).pipeline_layers()


def test_gpt_layers_have_plans() -> None:
    for layer, plan_of in zip(_gpt(), ["_embedding", "_block", "_block", "_head"]):
        found = tp_plan_for(layer)
        assert found is not None and found[0] is layer and found[1].apply.__name__ == plan_of


def test_plan_found_through_a_wrappers_layer_attribute() -> None:
    block = _gpt()[1]

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = block

    found = tp_plan_for(Wrapper())
    assert found is not None and found[0] is block


def test_library_classes_match_by_name_without_importing_the_library() -> None:
    fake = type("LlamaDecoderLayer", (nn.Module,), {"__module__": "transformers.models.llama.modeling_llama"})
    found = tp_plan_for(fake())
    assert found is not None and found[1].apply.__name__ == "_llama"


def test_layers_without_plan_and_registered_subclasses() -> None:
    assert tp_plan_for(nn.Linear(2, 2)) is None

    class MyBlock(gpt_module.Block):  # a subclass uses its base's plan
        pass

    found = tp_plan_for(MyBlock(GPTConfig(width=24, heads=4)))
    assert found is not None and found[1].apply.__name__ == "_block"

    class Custom(nn.Module):
        pass

    register_tp_plan(Custom, lambda m, mesh, o: None, sequence_in=False)
    found = tp_plan_for(Custom())
    assert found is not None and not found[1].sequence_in


@pytest.mark.parametrize(
    ("kw", "tp", "message"),
    [
        ({"width": 24, "heads": 3}, 2, "layer 1 (Block) has heads=3, not divisible by tp=2"),
        ({"vocab": 49}, 2, "layer 0 (Embedding) has vocab=49, not divisible by tp=2"),
        ({"width": 24, "heads": 4}, 8, "has heads=4, not divisible by tp=8"),
    ],
)
def test_indivisible_sizes_are_one_line_errors(kw: dict[str, Any], tp: int, message: str) -> None:
    layers = _gpt(**kw)
    before = [p.clone() for layer in layers for p in layer.parameters()]
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        apply_tp(layers, _Mesh(tp))  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, (p for layer in layers for p in layer.parameters())))


def test_vocab_parallel_loss_needs_a_vocab_parallel_head() -> None:
    with pytest.raises(ConfigError, match=r"vocab_parallel_loss needs a last layer .* layer 2 \(Block\)"):
        apply_tp(_gpt()[:3], _Mesh(2), vocab_parallel_loss=True)  # type: ignore[arg-type]


def test_a_two_dimensional_mesh_is_refused() -> None:
    mesh = _Mesh(2)
    mesh.ndim = 2
    with pytest.raises(ConfigError, match=r"mesh\['tp'\]"):
        apply_tp(_gpt(), mesh)  # type: ignore[arg-type]


def test_fsdp_keeps_its_default_for_plain_parameters() -> None:
    assert fsdp_shard_placement(nn.Parameter(torch.zeros(4, 4))) is None
