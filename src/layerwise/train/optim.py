"""AdamW and its learning-rate schedule: linear warm-up, then a cosine decay.

Warm-up as in Goyal et al. (2017, "Accurate, Large Minibatch SGD", Sec. 2.2, gradual warm-up);
the cosine as in Loshchilov & Hutter (2017, "SGDR", Eq. 5) with one period and no restart:
lr_t = lr_min + (lr_max - lr_min) * (1 + cos(pi * t / T)) / 2. Weight decay is decoupled
(Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization") and, as in GPT-2/nanoGPT,
applied to matrices only: decaying norms' gains and biases towards zero only hurts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True)
class WarmupCosine:
    """The learning rate's multiplier at step ``s`` (0-based: the s-th optimizer step).

    A plain object (not a closure) so that ``LambdaLR.state_dict()`` records its settings.
    """

    warmup: int
    total: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(params: Sequence[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (decayed) and vectors (norm gains, biases: not decayed).

    ``betas=(0.9, 0.95)`` as in GPT-3 (Brown et al., 2020, App. B) and most LLM pre-training since.
    """
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over every parameter group; call ``.step()`` after each optimizer step."""
    fn = WarmupCosine(warmup=warmup, total=total, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [fn] * len(optimizer.param_groups))


def set_current_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Put the schedule's current learning rates into the optimizer (after restoring both)."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
