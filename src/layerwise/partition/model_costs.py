"""Per-layer costs of a model without a timed run, and with its loss as a layer of its own.

Used by :func:`layerwise.partition.api.partition`; torch is imported only inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .costs import LayerCost

if TYPE_CHECKING:
    import torch


def profile_with_loss(
    model: Any, sample: Any, loss_fn: Any, targets: Any, **profile_kwargs: Any
) -> list[LayerCost]:
    """``profile_layers`` of the model's layers plus one trailing entry for ``loss_fn(out, targets)``.

    The loss runs on the last stage; for a large vocabulary its softmax costs as much as a
    transformer block, so leaving it out under-predicts the last stage. Pass the result as
    ``costs=`` to :func:`partition`.
    """
    from ..runtime.split import as_layers
    from .profile import profile_layers

    return profile_layers([*as_layers(model), _loss_layer(loss_fn, targets)], sample, **profile_kwargs)


def _loss_layer(loss_fn: Any, targets: Any) -> Any:
    """``loss_fn(out, targets)`` as a layer, so the loss is profiled in the chain like the others
    (a function: this module imports torch only when called)."""
    from torch import nn

    class _LossLayer(nn.Module):
        def forward(self, out: Any) -> torch.Tensor:
            return loss_fn(out, targets)  # type: ignore[no-any-return]

    return _LossLayer()


def merge(a: LayerCost, b: LayerCost) -> LayerCost:
    return LayerCost(
        forward_s=a.forward_s + b.forward_s,
        backward_s=a.backward_s + b.backward_s,
        param_bytes=a.param_bytes + b.param_bytes,
        grad_bytes=a.grad_bytes + b.grad_bytes,
        optimizer_bytes=a.optimizer_bytes + b.optimizer_bytes,
        activation_bytes=a.activation_bytes + b.activation_bytes,
    )


def unique_params(layers: Sequence[Any]) -> list[list[Any]]:
    """Per layer, its parameters not already held by an earlier layer (tied weights count once)."""
    seen: set[int] = set()
    out = []
    for layer in layers:
        mine = [p for p in layer.parameters() if id(p) not in seen]
        seen.update(id(p) for p in mine)
        out.append(mine)
    return out


def static_costs(layers: Sequence[Any]) -> list[LayerCost]:
    """Memory from the parameters alone (no sample: no activations, no time); Adam's 2 moments."""
    out = []
    for ps in unique_params(layers):
        size = sum(p.numel() * p.element_size() for p in ps)
        grads = sum(p.numel() * p.element_size() for p in ps if p.requires_grad)
        out.append(LayerCost(forward_s=0.0, backward_s=0.0, param_bytes=size, grad_bytes=grads,
                             optimizer_bytes=2.0 * grads, activation_bytes=0.0))  # fmt: skip
    return out
