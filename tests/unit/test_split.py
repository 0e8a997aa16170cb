"""Models to layer lists, partitions to layer counts, and parameters shared across stages."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from layerwise.models import GPT, GPTConfig, mlp
from layerwise.runtime.errors import ConfigError
from layerwise.runtime.split import (
    LayeredModel,
    as_layers,
    resolve_partition,
    stage_bounds,
    tie_slots,
    tied_parameters,
)


def _blocks(n: int) -> list[nn.Module]:
    return [nn.Linear(4, 4) for _ in range(n)]


# -- as_layers -----------------------------------------------------------------------------


def test_sequential_gives_its_children_in_order() -> None:
    model = mlp(width=8, depth=5)
    layers = as_layers(model)
    assert len(layers) == 5
    assert all(a is b for a, b in zip(layers, model))


@pytest.mark.parametrize("container", [list, tuple, nn.ModuleList])
def test_list_of_modules(container: Any) -> None:
    blocks = _blocks(3)
    layers = as_layers(container(blocks))
    assert len(layers) == 3 and all(a is b for a, b in zip(layers, blocks))


def test_layered_model_is_prologue_blocks_epilogue() -> None:
    pro, body, epi = nn.Embedding(10, 4), _blocks(3), [nn.LayerNorm(4), nn.Linear(4, 10)]
    layers = as_layers(LayeredModel(prologue=[pro], blocks=body, epilogue=epi))
    assert [id(x) for x in layers] == [id(x) for x in [pro, *body, *epi]]


def test_model_with_pipeline_layers() -> None:
    model = GPT(GPTConfig(vocab=16, context=8, width=8, heads=2, blocks=3))
    layers = as_layers(model)
    assert len(layers) == 5
    assert layers[0] is model.embed and layers[-1] is model.head
    assert all(a is b for a, b in zip(layers[1:-1], model.blocks))


def test_unsupported_model_is_rejected_with_the_supported_forms() -> None:
    with pytest.raises(ConfigError) as info:
        as_layers(nn.Linear(3, 3))
    msg = str(info.value)
    assert "Linear" in msg
    for form in ("nn.Sequential", "list of modules", "LayeredModel", "pipeline_layers()"):
        assert form in msg


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss()])
def test_loss_inside_the_layers_is_rejected(loss: nn.Module) -> None:
    with pytest.raises(ConfigError) as info:
        as_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), loss))
    msg = str(info.value)
    assert "layer 2" in msg and type(loss).__name__ in msg
    assert "loss_fn" in msg and "last stage" in msg


def test_non_module_layer_and_empty_model_are_rejected() -> None:
    with pytest.raises(ConfigError, match="layer 1 is a builtin_function_or_method, not an nn.Module"):
        as_layers([nn.Linear(2, 2), torch.relu])
    with pytest.raises(ConfigError, match="no layers"):
        as_layers(nn.Sequential())
    with pytest.raises(ConfigError, match="no layers"):
        as_layers(LayeredModel())


# -- resolve_partition ---------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "stages", "want"), [
    (10, 4, [3, 3, 2, 2]),  # the earlier stages get the extra layers
    (7, 3, [3, 2, 2]),
    (8, 4, [2, 2, 2, 2]),
    (5, 5, [1, 1, 1, 1, 1]),
    (9, 1, [9]),
])  # fmt: skip
def test_uniform(layers: int, stages: int, want: list[int]) -> None:
    got = resolve_partition("uniform", layers, stages)
    assert got == want
    assert sum(got) == layers and max(got) - min(got) <= 1


@pytest.mark.parametrize("counts", [[2, 3], (1, 4), [4, 1]])
def test_counts(counts: Any) -> None:
    assert resolve_partition(counts, 5, 2) == list(counts)


def test_index_lists() -> None:
    assert resolve_partition([[0, 1], [2, 3, 4]], 5, 2) == [2, 3]
    assert resolve_partition([[0], [1], [2, 3]], 4, 3) == [1, 1, 2]
    assert resolve_partition([range(0, 2), range(2, 4)], 4, 2) == [2, 2]


def test_more_stages_than_layers_says_how_many() -> None:
    for partition in ("uniform", [1, 1, 1, 1], [[0], [1], [2], [3]]):
        with pytest.raises(ConfigError) as info:
            resolve_partition(partition, 3, 4)
        msg = str(info.value)
        assert "4 stages" in msg and "only 3 layers" in msg
        assert "at most 3 stages" in msg


@pytest.mark.parametrize("partition", [[2, 0, 2], [[0, 1], [], [2, 3]]])
def test_empty_stage(partition: Any) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_partition(partition, 4, 3)
    msg = str(info.value)
    assert "stage 1" in msg and "empty" in msg and ">= 1 layer" in msg


def test_negative_count_is_an_empty_stage() -> None:
    with pytest.raises(ConfigError, match="stage 0 .* is empty"):
        resolve_partition([-1, 6], 5, 2)


@pytest.mark.parametrize(("counts", "covered"), [([2, 2], 4), ([3, 3], 6)])
def test_counts_not_covering_the_model(counts: list[int], covered: int) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_partition(counts, 5, 2)
    msg = str(info.value)
    assert f"covers {covered} layers" in msg and "model has 5" in msg
    assert "add up to the number of layers" in msg


def test_index_lists_not_covering_the_model() -> None:
    with pytest.raises(ConfigError, match="covers 4 layers but the model has 5"):
        resolve_partition([[0, 1], [2, 3]], 5, 2)


def test_round_robin_is_rejected_with_why_and_the_counts_to_use() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_partition([[0, 2], [1, 3]], 4, 2)
    msg = str(info.value)
    assert "stage 0 holds layers [0, 2]" in msg
    assert "contiguous" in msg and "consecutive layers" in msg
    assert "each stage's output is the next stage's input" in msg  # why
    assert "layer counts" in msg and "[2, 2]" in msg  # what to do instead


def test_out_of_order_stages_are_not_contiguous() -> None:
    with pytest.raises(ConfigError, match="stage 0 holds layers \\[2, 3\\]"):
        resolve_partition([[2, 3], [0, 1]], 4, 2)
    with pytest.raises(ConfigError, match="stage 1 holds layers \\[1, 2\\]"):
        resolve_partition([[0, 1], [1, 2]], 3, 2)  # overlapping


@pytest.mark.parametrize("partition", [[2, 2], [[0, 1], [2, 3]]])
def test_wrong_number_of_stages(partition: Any) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_partition(partition, 4, 3)
    msg = str(info.value)
    assert "has 2 stages, expected 3" in msg


def test_unknown_partition_name_and_zero_stages() -> None:
    with pytest.raises(ConfigError, match="unknown partition 'balanced'.*'uniform'"):
        resolve_partition("balanced", 4, 2)
    with pytest.raises(ConfigError, match="must be >= 1, got 0"):
        resolve_partition("uniform", 4, 0)


def test_stage_bounds() -> None:
    assert stage_bounds([3, 1, 2]) == [(0, 3), (3, 4), (4, 6)]
    assert stage_bounds(resolve_partition("uniform", 10, 4)) == [(0, 3), (3, 6), (6, 8), (8, 10)]


# -- parameters shared between stages ------------------------------------------------------


def _gpt(tie: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab=16, context=8, width=8, heads=2, blocks=2, tie_embeddings=tie))


@pytest.mark.parametrize("counts", [[1, 2, 1], [2, 2], [1, 1, 1, 1], [3, 1]])
def test_tied_embedding_is_shared_by_the_first_and_last_stage(counts: list[int]) -> None:
    model = _gpt(tie=True)
    layers = as_layers(model)
    bounds = stage_bounds(counts)
    last = len(counts) - 1
    assert tied_parameters(layers, bounds) == [[0, last]]
    ties = tie_slots(layers, bounds)
    assert len(ties) == 1
    stages, slots = ties[0]
    assert stages == [0, last]
    assert slots[0] == (model.embed.tok, "weight") and slots[last] == (model.head.lm, "weight")


def test_no_shared_parameter_on_a_single_stage_or_without_tying() -> None:
    layers = as_layers(_gpt(tie=True))
    assert tied_parameters(layers, stage_bounds([4])) == []
    assert tie_slots(layers, stage_bounds([4])) == []
    untied = as_layers(_gpt(tie=False))
    for counts in ([1, 2, 1], [2, 2], [1, 1, 1, 1]):
        assert tied_parameters(untied, stage_bounds(counts)) == []
        assert tie_slots(untied, stage_bounds(counts)) == []


def test_a_module_reused_by_three_stages_is_one_shared_parameter() -> None:
    shared = nn.Linear(4, 4)
    layers = [shared, nn.Linear(4, 4), shared, nn.Linear(4, 4), shared]
    bounds = stage_bounds([1, 1, 1, 1, 1])
    assert tied_parameters(layers, bounds) == [[0, 2, 4], [0, 2, 4]]  # weight and bias
    ties = tie_slots(layers, bounds)
    assert [slots[2] for _, slots in ties] == [(shared, "weight"), (shared, "bias")]
    assert [st for st, _ in ties] == [[0, 2, 4], [0, 2, 4]]
    # reuse inside one stage is not a tie between stages
    assert tied_parameters(layers, stage_bounds([3, 2])) == [[0, 1], [0, 1]]
    assert tied_parameters([shared, shared, nn.Linear(4, 4)], stage_bounds([2, 1])) == []
