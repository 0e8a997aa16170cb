"""Models and probes shared by the memory tools' tests (checkpointing, precision, offload)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from layerwise.models import GPT, GPTConfig, lm_loss

CFG = GPTConfig(vocab=64, context=16, width=32, heads=4, blocks=4)


def gpt(seed: int = 0, cfg: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def gpt_batch(seed: int = 1, rows: int = 3, cfg: GPTConfig = CFG) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, cfg.vocab, (rows, cfg.context), generator=g),
        torch.randint(0, cfg.vocab, (rows, cfg.context), generator=g),
    )


class ToDict(nn.Module):
    """tensor -> dict with a hidden state, a skip tensor and an integer tensor (no gradient)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": F.gelu(self.lin(x)), "skip": x, "pos": torch.arange(x.shape[0])}


class DictToTuple(nn.Module):
    """dict -> (hidden, skip), with dropout: checkpointing must replay the same mask."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)
        self.back = nn.Linear(2 * width, width)
        self.drop = nn.Dropout(0.25)

    def forward(self, d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.back(self.drop(torch.tanh(self.fc(d["h"]))))
        return h * (d["pos"][:, None] % 2 + 1), d["skip"]


class TupleToTuple(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin = nn.Linear(width, width)

    def forward(self, t: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, skip = t
        return self.lin(F.silu(self.norm(h))) + skip, skip


class TupleOut(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 3)

    def forward(self, t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.lin(t[0] + t[1])


def structured(seed: int = 0, width: int = 16) -> nn.Sequential:
    """Layers passing tensors, dicts and tuples, one with dropout (left in training mode)."""
    torch.manual_seed(seed)
    return nn.Sequential(ToDict(width), DictToTuple(width), TupleToTuple(width), TupleToTuple(width), TupleOut(width))


def structured_batch(seed: int = 1, rows: int = 6, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g), torch.randn(rows, 3, generator=g)


def layers_of(model: nn.Module) -> list[nn.Module]:
    return model.pipeline_layers() if isinstance(model, GPT) else list(model)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return lm_loss(out, y) if isinstance(model, GPT) else F.mse_loss(out, y)


def prepared(base: nn.Module, apply: Callable[[list[nn.Module]], Any]) -> tuple[nn.Module, Any]:
    """A copy of ``base`` with ``apply`` run on its layers; returns (model, what apply returned)."""
    model = copy.deepcopy(base)
    return model, apply(layers_of(model))


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every parameter's gradient of one forward + backward (dropout drawn from ``seed``)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_of(model, x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run while active (the backward included: modes follow autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
