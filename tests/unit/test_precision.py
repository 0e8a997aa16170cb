"""bf16 mixed precision: computes in bf16, keeps fp32 weights and gradients, stays near fp32.

The tolerances (``BF16_LOSS_RTOL``, ``BF16_GRAD_RTOL``) and why they are what they are: see
:mod:`layerwise.parallel.precision`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerwise.parallel.precision import (
    BF16_GRAD_RTOL,
    BF16_LOSS_RTOL,
    apply_precision,
    fsdp_mixed_precision,
)
from layerwise.parallel import _wrap
from layerwise.runtime.errors import ConfigError

from .memory_models import gpt, gpt_batch, layers_of, prepared, step, structured, structured_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((got[n] - want[n]).norm() / want[n].norm()) for n in want}


@pytest.mark.parametrize(("make", "batch"), [(gpt, gpt_batch), (structured, structured_batch)], ids=["gpt", "structured"])
def test_bf16_close_to_fp32_and_not_equal(make, batch) -> None:  # type: ignore[no-untyped-def]
    base = make()
    x, y = batch()
    want_loss, want = step(copy.deepcopy(base), x, y)
    model, _ = prepared(base, lambda layers: apply_precision(layers, "bf16"))
    loss, got = step(model, x, y)
    assert loss.dtype == torch.float32
    assert abs(float(loss - want_loss)) <= BF16_LOSS_RTOL * abs(float(want_loss))
    errors = rel_errors(got, want)
    assert max(errors.values()) <= BF16_GRAD_RTOL, errors
    assert max(errors.values()) > 1e-4, "no difference from fp32: bf16 did not happen"
    for name, p in model.named_parameters():  # fp32 master weights, fp32 gradients
        assert p.dtype == torch.float32 and got[name].dtype == torch.float32, name
    assert list(model.state_dict()) == list(base.state_dict())


def test_matmuls_run_in_bf16_and_layer_outputs_are_fp32() -> None:
    model = gpt()
    apply_precision(layers_of(model), "bf16")
    seen: dict[str, torch.dtype] = {}
    block = model.blocks[1]

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: object, out: torch.Tensor) -> None:
            seen[name] = out.dtype

        return hook

    for name, module in [("qkv", block.qkv), ("ln1", block.ln1), ("block", block)]:
        module.register_forward_hook(record(name))
    logits = model(gpt_batch()[0])
    assert seen == {"qkv": torch.bfloat16, "ln1": torch.float32, "block": torch.float32}
    assert logits.dtype == torch.float32  # the head's bf16 logits are cast back at the boundary


def test_structured_outputs_keep_their_shape_and_integer_dtypes() -> None:
    model = structured()
    apply_precision(layers_of(model), "bf16")
    out = model[0](structured_batch()[0])
    assert set(out) == {"h", "skip", "pos"}
    assert out["h"].dtype == torch.float32 and out["pos"].dtype == torch.int64
    h, skip = model[1](out)
    assert h.dtype == skip.dtype == torch.float32


def test_fp32_removes_bf16_and_composes_with_checkpointing() -> None:
    from layerwise.parallel.checkpointing import apply_ac

    base = gpt()
    x, y = gpt_batch()
    bf16, _ = prepared(base, lambda layers: apply_precision(layers, "bf16"))
    want_loss, want = step(bf16, x, y)
    # checkpointing under bf16 replays the autocast state: bit-identical to bf16 alone
    for mode in ("full", "selective"):
        model, _ = prepared(base, lambda layers: (apply_precision(layers, "bf16"), apply_ac(layers, mode)))
        loss, got = step(model, x, y)
        assert torch.equal(loss, want_loss) and all(torch.equal(got[n], want[n]) for n in want), mode
    apply_precision(layers_of(bf16), "fp32")
    assert all(not _wrap.tools(layer) and "forward" not in layer.__dict__ for layer in layers_of(bf16))
    fp32_loss, _ = step(bf16, x, y)
    ref_loss, _ = step(copy.deepcopy(base), x, y)
    assert torch.equal(fp32_loss, ref_loss)


def test_fsdp_policy() -> None:
    assert fsdp_mixed_precision("fp32", "cuda") is None
    assert fsdp_mixed_precision("bf16", "cpu") is None  # gloo: no bf16 reductions
    policy = fsdp_mixed_precision("bf16", torch.device("cuda", 0))
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


@pytest.mark.parametrize("call", [lambda: apply_precision([nn.Linear(2, 2)], "fp16"), lambda: fsdp_mixed_precision("half", "cpu")])
def test_unknown_precision_is_a_one_line_error(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="is not one of fp32, bf16") as e:
        call()
    assert "\n" not in str(e.value)
