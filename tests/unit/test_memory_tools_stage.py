"""The memory tools inside pipeline stages: Stage forward/backward, the zero-bubble I/W split,
and the wire format between stages, against the same stages without the tools.

Two stages on one process, driven by hand as the executor drives them (all forwards, then the
backwards; with the split, all I then all W in reverse order). Checkpointing and offload give
bit-identical gradients (see test_checkpointing for why); bf16 stays within its tolerance of fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerwise.models import lm_loss
from layerwise.parallel.checkpointing import apply_ac
from layerwise.parallel.offload import apply_activation_offload
from layerwise.parallel.precision import BF16_GRAD_RTOL, BF16_LOSS_RTOL, apply_precision
from layerwise.runtime.microbatch import split_batch
from layerwise.runtime.stage import Stage
from layerwise.runtime.wire import GRADS, decode_header, decode_payload, encode, flatten

from .memory_models import gpt, gpt_batch, layers_of, structured, structured_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
M = 3
SPLIT = 3  # layers [0, 3) on stage 0, the rest on stage 1: the GPT's tied weights span both


def _over_wire(obj: Any, structure: Any = None) -> Any:
    tensors, st = flatten(obj) if structure is None else (obj, structure)
    header, payload = encode(tensors, st)
    meta = decode_header(header, "peer")
    return meta.structure.unflatten(decode_payload(meta, payload.clone()))


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, split: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layers = layers_of(model)
    loss_fn = lm_loss if len(layers) == 6 else F.mse_loss
    stages = [
        Stage(index=s, layers=part, first_layer=first, is_first=s == 0, is_last=s == 1, loss_fn=loss_fn,
              split_backward=split, where=f"rank {s} (stage {s})")
        for s, (first, part) in enumerate([(0, layers[:SPLIT]), (SPLIT, layers[SPLIT:])])
    ]  # fmt: skip
    xs, ys = split_batch(x, M, "x"), split_batch(y, M, "y")
    torch.manual_seed(7)  # dropout in the structured model
    loss = torch.zeros(())
    for mb in range(M):
        h = _over_wire(stages[0].forward(mb, xs[mb]))
        loss = loss + stages[1].forward(mb, h, ys[mb], ys[mb].shape[0] / x.shape[0])
    for mb in range(M):
        g = _over_wire(stages[1].backward_input(mb, None) if split else stages[1].backward(mb, None), GRADS)
        assert (stages[0].backward_input(mb, list(g)) if split else stages[0].backward(mb, list(g))) == []
    if split:
        for mb in reversed(range(M)):
            for st in reversed(stages):
                st.backward_weight(mb)
    assert all(st._saved == {} for st in stages)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


Tools = Callable[[Sequence[nn.Module]], Any]
EXACT: dict[str, Tools] = {
    "full": lambda layers: apply_ac(layers, "full"),
    "every-2": lambda layers: apply_ac(layers, "full", every=2),
    "selective": lambda layers: apply_ac(layers, "selective"),
    "offload": lambda layers: apply_activation_offload(layers),
    "selective+offload": lambda layers: (apply_ac(layers, "selective"), apply_activation_offload(layers)),
}
MODELS = {"gpt": (gpt, gpt_batch), "structured": (structured, structured_batch)}


@pytest.mark.parametrize("split", [False, True], ids=["B", "IW"])
@pytest.mark.parametrize("tool", EXACT)
@pytest.mark.parametrize("model_name", MODELS)
def test_stage_gradients_equal_without_the_tool(model_name: str, tool: str, split: bool) -> None:
    make, batch = MODELS[model_name]
    base = make()
    x, y = batch(rows=7)
    want_loss, want = _train_step(copy.deepcopy(base), x, y, split)
    model = copy.deepcopy(base)
    EXACT[tool](layers_of(model))
    loss, got = _train_step(model, x, y, split)
    assert torch.equal(loss, want_loss)
    for name in want:
        assert want[name].abs().sum() > 0, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("split", [False, True], ids=["B", "IW"])
def test_stage_bf16_with_checkpointing_near_fp32(split: bool) -> None:
    base = gpt()
    x, y = gpt_batch(rows=7)
    want_loss, want = _train_step(copy.deepcopy(base), x, y, split)
    model = copy.deepcopy(base)
    apply_precision(layers_of(model), "bf16")
    apply_ac(layers_of(model), "selective")
    loss, got = _train_step(model, x, y, split)
    assert abs(float(loss - want_loss)) <= BF16_LOSS_RTOL * abs(float(want_loss))
    errors = {n: float((got[n] - want[n]).norm() / want[n].norm()) for n in want}
    assert 1e-4 < max(errors.values()) <= BF16_GRAD_RTOL, errors
