"""A span of layers held by a peer: weights, AdamW state and the committed step count.

The same object is a stage's *holder* (it runs forwards and backwards and keeps the step's
activations) or its *copy* (it only applies the gradients the trainer relays at each commit, so it
stays bit-identical to the holder: same AdamW code, same gradients, same order).

Weight gradients are summed per *group* of microbatches: a stage with one holder has one group
(all its microbatches); replicas of a stage each sum their own microbatches (:mod:`..replicas`),
and a peer that takes over a dead replica's microbatches keeps them in a group of their own, so the
trainer can add the groups in a fixed order whoever computed them. A parameter tied to a layer on
another stage (:mod:`..ties`) is kept per microbatch instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ...models import lm_loss
from ...runtime.stage import Stage
from ..spec import SwarmSpec, build_layers
from ..ties import cross_ties

_INIT_CACHE: dict[str, list[Any]] = {}
T = TypeVar("T")


def init_layers(spec: SwarmSpec, first: int, count: int) -> list[torch.nn.Module]:
    key = repr(spec.to_json())
    if key not in _INIT_CACHE:
        _INIT_CACHE.clear()
        _INIT_CACHE[key] = build_layers(spec)
    return list(copy.deepcopy(_INIT_CACHE[key][first : first + count]))  # one deepcopy keeps ties inside the span


class Span:
    """Layers ``[first, first + count)`` of the model as stage ``stage``."""

    def __init__(self, spec: SwarmSpec, *, stage: int, first: int, count: int, role: str, where: str) -> None:
        self.spec, self.stage, self.first, self.count, self.role = spec, stage, first, count, role
        self.layers = init_layers(spec, first, count)
        self.params = [p for m in self.layers for p in m.parameters()]  # per layer (a tie inside: twice)
        self.unique = list({id(p): p for p in self.params}.values())  # what the optimizer steps
        self.cross = set(cross_ties(spec, first, count))  # positions in unique, kept per microbatch
        self.acc: dict[int, list[torch.Tensor | None]] = {}  # group -> summed weight gradients
        self.counts: dict[int, int] = {}  # group -> backwards summed into it
        self.tied: dict[tuple[int, int], torch.Tensor] = {}  # (position, microbatch) -> gradient
        # foreach=False: the per-tensor loop, the same code on every peer and in the reference
        self.opt = torch.optim.AdamW(self.unique, lr=spec.lr, betas=spec.betas,
                                     weight_decay=spec.weight_decay, foreach=False)  # fmt: skip
        self.step = 0  # committed optimizer steps
        self.where = where
        self.runner: Stage | None = None
        self.fwd_done: set[int] = set()
        self.bwd_done: set[int] = set()
        if role == "holder":
            self.make_holder()

    def make_holder(self) -> None:
        self.role = "holder"
        last = self.first + self.count == self.spec.layers
        self.runner = Stage(index=self.stage, layers=self.layers, first_layer=self.first, is_first=self.first == 0,
                            is_last=last, loss_fn=lm_loss if last else None, split_backward=False,
                            where=self.where)  # fmt: skip
        self.fwd_done.clear()
        self.bwd_done.clear()

    def new_step(self) -> None:
        if self.runner is not None:
            self.runner._saved.clear()
        self.fwd_done.clear()
        self.bwd_done.clear()
        self.acc.clear()
        self.counts.clear()
        self.tied.clear()
        for p in self.params:
            p.grad = None

    def accumulate(self, group: int, mb: int, backward: Callable[[], T]) -> T:
        """Run one microbatch's backward so that its weight gradients add to ``group``'s sums (in
        the order of that group's backwards) and a cross-tied parameter's go to its own record."""
        acc = self.acc.setdefault(group, [None] * len(self.unique))
        for i, p in enumerate(self.unique):
            p.grad = None if i in self.cross else acc[i]
        try:
            out = backward()
        finally:
            for i, p in enumerate(self.unique):
                if i in self.cross:
                    self.tied[(i, mb)] = p.grad if p.grad is not None else torch.zeros_like(p)
                else:
                    acc[i] = p.grad
                p.grad = None
        self.counts[group] = self.counts.get(group, 0) + 1
        return out

    # -- optimizer ----------------------------------------------------------------------------
    def grads(self, group: int = 0) -> list[torch.Tensor]:
        acc = self.acc.get(group, [None] * len(self.unique))
        return [g.detach().clone() if g is not None else torch.zeros_like(p) for g, p in zip(acc, self.unique)]

    def apply(self, grads: list[torch.Tensor], lr: float) -> None:
        """One AdamW step from these gradients (the holder passes its own, a copy the relayed ones)."""
        if len(grads) != len(self.unique) or any(g.shape != p.shape for g, p in zip(grads, self.unique)):
            raise ValueError(f"stage {self.stage}: {len(grads)} gradients do not match its {len(self.unique)} parameters")
        for p, g in zip(self.unique, grads):
            p.grad = g.to(p.dtype).clone()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.new_step()
        self.step += 1

    # -- hand-over -----------------------------------------------------------------------------
    def export(self) -> list[torch.Tensor]:
        """Per parameter: weight, exp_avg, exp_avg_sq (zeros before the first step)."""
        out: list[torch.Tensor] = []
        for p in self.params:
            st = self.opt.state.get(p, {})
            out += [p.detach(), st.get("exp_avg", torch.zeros_like(p)), st.get("exp_avg_sq", torch.zeros_like(p))]
        return out

    def load(self, tensors: list[torch.Tensor], step: int) -> None:
        if len(tensors) != 3 * len(self.params):
            raise ValueError(f"stage {self.stage}: hand-over of {len(tensors)} tensors, expected {3 * len(self.params)}")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                w, m, v = tensors[3 * i : 3 * i + 3]
                if w.shape != p.shape:
                    raise ValueError(f"stage {self.stage}: hand-over shape {tuple(w.shape)} != {tuple(p.shape)}")
                p.copy_(w)
                if step > 0:
                    self.opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.clone(),
                                         "exp_avg_sq": v.clone()}  # fmt: skip
        self.step = step
        self.new_step()

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "first": self.first, "count": self.count, "role": self.role, "step": self.step}
