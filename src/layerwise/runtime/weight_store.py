"""The backward split for linear layers: I defers each ``nn.Linear``'s weight gradient, W computes it.

This is how the zero-bubble paper's own implementation splits the backward (Qi et al., 2023,
Megatron-LM's ``WeightGradStore``): a linear layer's backward is two matrix products, ``dX = dY W``
(needed by the previous stage now) and ``dW = dY^T X`` (needed only by the optimizer). While a
stage runs its forward under :func:`deferring`, each plain ``nn.Linear`` goes through
:class:`_Linear`, an autograd function in the stage's graph. In I (one ordinary backward over the
whole stage, ``store.active`` set) its backward returns ``dX`` and leaves ``(X, dY)`` in the
microbatch's :class:`WeightGrads`; W computes ``dW = dY^T X`` and the bias gradient from them and
accumulates. Nothing is computed twice, and compared with splitting the graph node by node
(:mod:`layerwise.runtime.backward_split`) there is no walk of the graph, no hook and no second
autograd call per layer: on a CPU those cost 10-20% of a GPT block's backward.

Every other parameter (layer norms, embeddings, biases outside linear layers) gets its gradient in
I, in the same backward: their weight gradients are reductions that cost next to nothing, and
splitting a layer norm's backward would recompute its normalized input.

The products are the ones autograd runs for ``F.linear`` (``addmm`` / ``mm`` backward: ``dY.mm(W)``,
``dY.t().mm(X)``, ``dY.sum(0)``, on the same layouts), so the gradients are bit-identical to the
fused backward's; W adds them the way ``AccumulateGrad`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class WeightGrads:
    """What one microbatch's I leaves for its W: per deferred linear layer, its saved input, the
    gradient of its output (both as 2-D matrices) and the parameters still owed a gradient."""

    active: bool = False  # set during I: linear layers defer their weight gradients
    # (X as rows x in, dY as rows x out, the weight or None, the bias or None) per deferred layer
    later: list[tuple[torch.Tensor, torch.Tensor, Any, Any]] = field(default_factory=list)

    def run(self) -> None:
        """W: the weight and bias gradients of every deferred layer, accumulated into ``.grad``.

        Kept to the two kernels per layer and the accumulation: W is a small share of a small
        layer's backward (a 256 x 256 projection on 256 rows: about 0.3 ms), so every Python
        step here shows in the split's cost against the fused backward."""
        with torch.no_grad():  # the saved inputs are in the graph: no graph for their products
            for x2, g2, weight, bias in self.later:
                if weight is not None:  # dW = dY^T X, as mm_mat2_backward computes it
                    _add(weight, g2.t().mm(x2))
                if bias is not None:  # the broadcast bias: sum_to (same reduction as sum(0, keepdim))
                    _add(bias, g2.sum(0))
        self.later.clear()


def _add(p: torch.Tensor, g: torch.Tensor) -> None:
    """``AccumulateGrad`` for one gradient (called under no_grad): the first becomes ``.grad``
    (no copy), later ones are added in place."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g


class _Linear(torch.autograd.Function):
    """``F.linear`` whose weight gradient waits in ``store`` while ``store.active`` is set."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                store: WeightGrads) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight)
        # the parameters themselves: under activation checkpointing the unpacked saved tensors
        # are recomputed aliases, and W must accumulate into the parameters' own ``.grad``
        ctx.params, ctx.store = (weight, bias), store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g2 = g if g.dim() == 2 else g.reshape(-1, g.shape[-1])  # (rows, out), as addmm saw it
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = g2.mm(weight).view(x.shape) if need_x else None
        x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])  # contiguous: checked before the forward
        if ctx.store.active and (need_w or need_b):
            w, b = ctx.params
            ctx.store.later.append((x2, g2, w if need_w else None, b if need_b else None))
            return dx, None, None, None
        dw = g2.t().mm(x2) if need_w else None
        db = g2.sum(0) if need_b else None
        return dx, dw, db, None


def deferrable(layers: Sequence[nn.Module]) -> list[nn.Linear]:
    """The linear layers whose weight gradient can wait for W: exactly ``nn.Linear`` (a subclass
    may compute something else), with plain parameters (not DTensors of FSDP / TP, which run
    their own hooks on the gradients), used by no other module of the stage. (A hook registered
    on an ``AccumulateGrad`` node from C++, as ``DistributedDataParallel``'s, is not seen here;
    layerwise's data parallelism is FSDP2's, on DTensors.) A tied weight
    keeps its whole gradient in I: deferring one of its uses would sum its contributions in
    another order than the fused backward (last-bit differences)."""
    owners: dict[int, int] = {}
    for layer in layers:
        for m in layer.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
    seen: dict[int, nn.Linear] = {}
    for layer in layers:
        for m in layer.modules():
            own = list(m.parameters(recurse=False))
            if (type(m) is nn.Linear and "forward" not in m.__dict__
                    and all(type(p) is nn.Parameter and owners[id(p)] == 1 for p in own)):  # fmt: skip
                seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def deferring(linears: Sequence[nn.Linear], store: WeightGrads) -> Iterator[None]:
    """Run the forward (and any recomputation in the backward, for activation checkpointing)
    of ``linears`` through :class:`_Linear`, recording into ``store``.

    The layers' ``forward`` is replaced on the instance for the duration only, so the model is
    unchanged outside the stage's own calls."""

    def make(m: nn.Linear) -> Any:
        params = m._parameters  # looked up per call (a parameter may be replaced), without Module.__getattr__

        def forward(x: torch.Tensor) -> torch.Tensor:
            w, b = params["weight"], params["bias"]
            if (torch.is_grad_enabled() and x.is_contiguous() and x.dim() in (2, 3) and x.dtype == w.dtype
                    and not torch.is_autocast_enabled(x.device.type) and not _hooked(w, b)):  # fmt: skip
                return _Linear.apply(x, w, b, store)
            return F.linear(x, w, b)  # the fused node of autograd: its gradients come in I

        return forward

    for m in linears:
        m.__dict__["forward"] = make(m)  # the instance attribute wins over the class's method
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def _hooked(w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """A parameter whose gradient has hooks keeps it in I: ``AccumulateGrad`` runs its
    post-accumulate hooks even for the empty gradient a deferred layer returns in I. (Checked on
    every forward: a hook may be added at any time; written out, as it runs per linear layer
    and microbatch.)"""
    return bool(w._backward_hooks or w._post_accumulate_grad_hooks
                or (b is not None and (b._backward_hooks or b._post_accumulate_grad_hooks)))  # fmt: skip
