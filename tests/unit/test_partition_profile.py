"""Profiling and estimating layer costs on small CPU models (no speed asserted: only sleeps' lower bounds)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from layerwise.partition import LayerCost, ProfileError, balance, estimate_layers, profile_layers
from layerwise.partition.profile import profile_optimizer


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_profile_mlp(mlp: nn.Sequential) -> None:
    x = torch.randn(3, 8)
    costs = profile_layers(mlp, x, repeats=3, warmup=1)
    assert len(costs) == 3
    for cost, layer in zip(costs, mlp):
        assert cost.forward_s > 0 and cost.backward_s > 0
        assert cost.param_bytes == _bytes(layer)
        assert cost.grad_bytes == _bytes(layer)
        assert cost.optimizer_bytes == 2 * _bytes(layer)
    # Linear saves its input (3 x 8 floats) for the weight gradient; its weight is not counted.
    assert costs[0].activation_bytes == 3 * 8 * 4
    # ReLU saves its output; the next Linear saves the same tensor, which counts once.
    assert costs[1].activation_bytes == 3 * 16 * 4
    assert costs[2].activation_bytes == 0
    assert all(p.grad is None for p in mlp.parameters()), "profiling must not leave gradients"


def test_optimizer_factor_and_frozen_params(mlp: nn.Sequential) -> None:
    mlp[2].weight.requires_grad_(False)
    costs = profile_layers(mlp, torch.randn(2, 8), repeats=1, warmup=0, optimizer_state_factor=1.0)
    bias = mlp[2].bias.numel() * 4
    assert costs[2].param_bytes == _bytes(mlp[2])
    assert costs[2].grad_bytes == bias and costs[2].optimizer_bytes == bias


def test_tied_weights_counted_once() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(10, 8)
    head = nn.Linear(8, 10)
    head.weight = embed.weight  # tied input/output embeddings, as in GPT-2
    ids = torch.randint(0, 10, (2, 5))  # token ids: integers, never require grad
    for costs in (profile_layers([embed, head], ids, repeats=1, warmup=0), estimate_layers([embed, head], ids)):
        assert costs[0].param_bytes == 10 * 8 * 4
        assert costs[1].param_bytes == 10 * 4  # only the bias; the weight belongs to layer 0
        assert sum(c.param_bytes for c in costs) == _bytes(nn.ModuleList([embed, head]))


def test_failing_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(5, 2))
    with pytest.raises(ProfileError, match=r"layer 1 \(Linear\).*shape=\(3, 6\)"):
        profile_layers(model, torch.randn(3, 8))


def test_estimate_counts_flops(mlp: nn.Sequential) -> None:
    costs = estimate_layers(mlp, torch.randn(3, 8), flops_per_second=1e9)
    assert costs[0].forward_s == pytest.approx(2 * 3 * 8 * 16 / 1e9)
    assert costs[0].backward_s == pytest.approx(2 * costs[0].forward_s)
    assert costs[1].forward_s == 0.0  # element-wise: no FLOPs in the model
    assert [c.activation_bytes for c in costs] == [96, 192, 0]


def test_estimate_on_meta_device() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        x = torch.empty(4, 64)
    costs = estimate_layers(model, x)
    assert [c.param_bytes for c in costs] == [_bytes(model[0]), 0, _bytes(model[2])]
    assert [c.activation_bytes for c in costs] == [4 * 64 * 4, 4 * 64 * 4, 0]
    assert costs[0].forward_s > 0


class _Split(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sin(), x.cos()


class _Join(nn.Module):
    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"out": pair[0] * pair[1]}


def test_tuple_and_dict_outputs_and_in_place_layers() -> None:
    model = [nn.Linear(4, 4), nn.ReLU(inplace=True), _Split(), _Join()]
    costs = profile_layers(model, torch.randn(2, 4), repeats=2, warmup=1)
    assert all(isinstance(c, LayerCost) and c.time_s > 0 for c in costs)
    assert costs[3].activation_bytes > 0  # mul saves both factors


def test_buffers_are_counted_and_restored() -> None:
    norm = nn.BatchNorm1d(4)
    before = norm.running_mean.clone()
    costs = profile_layers([norm], torch.randn(8, 4) + 3.0, repeats=2, warmup=1)
    assert torch.equal(norm.running_mean, before)
    buffers = sum(b.numel() * b.element_size() for b in norm.buffers())
    assert costs[0].param_bytes == _bytes(norm) + buffers


def test_profiled_costs_feed_the_balancer(mlp: nn.Sequential) -> None:
    costs = estimate_layers(mlp, torch.randn(3, 8))
    assert sum(balance(costs, 2)) == 3


class _Probe(nn.Module):
    """Identity that records the gradient arriving at its output during backward."""

    def __init__(self) -> None:
        super().__init__()
        self.grads: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1.0
        y.register_hook(lambda g: self.grads.append(g.detach().clone()))
        return y


class _Sum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (3.0 * x).sum()


def test_backward_runs_in_a_chain_with_the_next_layers_input_gradient() -> None:
    probe = _Probe()
    costs = profile_layers([nn.Linear(4, 4), probe, _Sum()], torch.randn(2, 4), repeats=3, warmup=1)
    assert len(probe.grads) == 4  # one backward of the chain per run
    for g in probe.grads:
        # d(3 * sum)/dx times the last layer's scalar gradient c: every element 3c, not random noise
        assert g.shape == (2, 4) and torch.allclose(g, g.flatten()[0].expand_as(g)) and g.abs().sum() > 0
    assert all(c.forward_s > 0 for c in costs) and costs[0].backward_s > 0


def test_integer_outputs_and_frozen_layers_in_the_chain() -> None:
    embed = nn.Embedding(10, 4)
    embed.weight.requires_grad_(False)  # nothing requires grad before the Linear
    costs = profile_layers([embed, nn.Linear(4, 2)], torch.randint(0, 10, (3, 5)), repeats=2, warmup=1)
    assert costs[0].grad_bytes == 0 and costs[1].backward_s > 0


def test_profile_optimizer_times_each_layer_and_restores_everything(mlp: nn.Sequential) -> None:
    before = [p.detach().clone() for p in mlp.parameters()]
    times = profile_optimizer(mlp, lambda p: torch.optim.AdamW(p, lr=0.1), repeats=2, warmup=1)
    assert len(times) == 3 and times[0] > 0 and times[1] == 0.0 and times[2] > 0
    assert all(torch.equal(p, b) for p, b in zip(mlp.parameters(), before))
    assert all(p.grad is None for p in mlp.parameters())


def test_profile_optimizer_counts_a_tied_weight_once() -> None:
    embed = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embed.weight
    assert profile_optimizer([embed, head], torch.optim.SGD, repeats=1, warmup=0)[1] == 0.0
    with pytest.raises(ValueError, match="repeats"):
        profile_optimizer([embed], torch.optim.SGD, repeats=0)


class _BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no gradient here")


class _BadBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BadGrad.apply(x)  # type: ignore[no-any-return]


def test_failing_backward_is_named() -> None:
    model = [nn.Linear(4, 4), _BadBackward(), nn.Linear(4, 2)]
    with pytest.raises(ProfileError, match=r"backward of layer 1 \(_BadBackward\).*no gradient here"):
        profile_layers(model, torch.randn(3, 4), repeats=1, warmup=0)


class _Uneven(nn.Module):
    """Sleeps 1, 1, 200 ms in the forwards of three runs in turn (after the trace's and the warm-up's)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep({3: 0.001, 4: 0.001, 5: 0.200}.get(self.calls, 0.0))
        return x * 2.0


def test_the_mean_statistic_counts_the_slow_run_the_median_drops() -> None:
    # Call 1 is the memory trace, call 2 the warm-up; the timed runs sleep 1, 1 and 200 ms.
    median = profile_layers([_Uneven(), _Sum()], torch.randn(2, 4), repeats=3, warmup=1)
    mean = profile_layers([_Uneven(), _Sum()], torch.randn(2, 4), repeats=3, warmup=1, statistic="mean")
    assert mean[0].forward_s >= (0.001 + 0.001 + 0.200) / 3  # a sleep is never shorter than asked
    # The median is one of the 1 ms runs: below the mean unless a 1 ms sleep overslept by ~100 ms.
    assert median[0].forward_s < mean[0].forward_s
    with pytest.raises(ValueError, match="statistic"):
        profile_layers([_Uneven()], torch.randn(2, 4), statistic="max")  # type: ignore[arg-type]
