"""Activation offload: identical results, and every saved activation goes through the host hooks.

On this CPU-only machine the tensors already live in host memory, so offload changes nothing in
the numbers (compared with ``torch.equal``); the counters show the hooks ran on every saved tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch

from layerwise.parallel import _wrap
from layerwise.parallel.checkpointing import apply_ac
from layerwise.parallel.offload import apply_activation_offload, fsdp_cpu_offload
from layerwise.parallel.precision import apply_precision

from .memory_models import gpt, gpt_batch, layers_of, loss_of, prepared, step, structured, structured_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODELS = [(gpt, gpt_batch), (structured, structured_batch)]


def _saved_count(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Tensors autograd saves in the layers (the loss outside them excluded)."""
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return count[0] if out is not None else 0


@pytest.mark.parametrize(("make", "batch"), MODELS, ids=["gpt", "structured"])
@pytest.mark.parametrize("pin", [False, True])
def test_offload_equals_none_and_packs_every_saved_activation(make, batch, pin: bool) -> None:  # type: ignore[no-untyped-def]
    base = make()
    x, y = batch()
    want_loss, want = step(copy.deepcopy(base), x, y)
    model, stats = prepared(base, lambda layers: apply_activation_offload(layers, pin_memory=pin))
    loss, got = step(model, x, y)
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert list(model.state_dict()) == list(base.state_dict())
    saved = _saved_count(copy.deepcopy(base), x, y)
    assert stats.packed > 0 and stats.packed_bytes > 0
    assert stats.kept > 0  # the weights the matmuls save stay where they are
    assert stats.packed + stats.kept == saved  # nothing escaped the hooks


def test_offload_composes_with_bf16_and_checkpointing() -> None:
    base = gpt()
    x, y = gpt_batch()
    bf16, _ = prepared(base, lambda layers: apply_precision(layers, "bf16"))
    want_loss, want = step(bf16, x, y)
    model, stats = prepared(base, lambda layers: (apply_precision(layers, "bf16"), apply_activation_offload(layers))[1])
    loss, got = step(model, x, y)
    assert torch.equal(loss, want_loss) and all(torch.equal(got[n], want[n]) for n in want)
    assert stats.packed > 0
    # bf16 activations go through the hooks as bf16: half the bytes of some fp32 ones
    fp32, fp32_stats = prepared(base, lambda layers: apply_activation_offload(layers))
    step(fp32, x, y)
    assert stats.packed_bytes < fp32_stats.packed_bytes
    # a checkpointed layer saves only its input, through the offload hooks: one tensor per layer
    model, stats = prepared(base, lambda layers: (apply_ac(layers, "full"), apply_activation_offload(layers))[1])
    loss, got = step(model, x, y)
    assert stats.packed == len(layers_of(model)) and stats.kept == 0
    want_loss, want = step(copy.deepcopy(base), x, y)
    assert torch.equal(loss, want_loss) and all(torch.equal(got[n], want[n]) for n in want)


def test_disable_restores_the_layer() -> None:
    model = structured()
    layers = layers_of(model)
    stats = apply_activation_offload(layers)
    apply_activation_offload(layers, False)
    assert all(not _wrap.tools(layer) and "forward" not in layer.__dict__ for layer in layers)
    x, y = structured_batch()
    loss_of(model, x, y).backward()
    assert stats.packed == 0


def test_fsdp_offload_policy() -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    on, off = fsdp_cpu_offload(True), fsdp_cpu_offload(False)
    assert isinstance(on, CPUOffloadPolicy) and on.pin_memory == torch.cuda.is_available()
    assert type(off) is OffloadPolicy


def test_tensor_parallel_layers_keep_their_dtensors() -> None:
    """DTensors (a tensor-parallel layer's weights and the activations saved at DTensor level)
    stay in place; plain activations in the same layer are still offloaded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if dist.is_initialized():  # a 1-rank group of our own is needed, and torch allows one
        pytest.skip("another test left a process group up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        x = torch.randn(4, 8)
        want = {}
        for offload in (False, True):
            model = copy.deepcopy(base)
            parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
            stats = apply_activation_offload([model]) if offload else None
            model(x).pow(2).sum().backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            if not offload:
                want = grads
        assert stats is not None and stats.kept > 0 and stats.packed > 0  # the GELU's input is plain
        assert all(torch.equal(grads[n], want[n]) for n in want)
    finally:
        dist.destroy_process_group()
