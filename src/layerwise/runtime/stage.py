"""One pipeline stage on one rank: its layers, and forward / backward for each microbatch.

Each stage keeps its own autograd graph per microbatch: inputs that arrive from another stage
become fresh leaves, so a backward stops at the stage boundary and the input gradient is what is
sent back. For zero-bubble schedules the backward is split into I (input gradient) and W (weight
gradient, Qi et al., 2023) inside the stage's one autograd graph: I runs only the nodes on the
path to the stage's inputs and keeps the gradient at each node where a weight's subgraph branches
off; W starts there and runs only the weight side. Nothing is computed twice; see
:mod:`layerwise.runtime.backward_split` for how.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .backward_split import Pending, backward_input, backward_weight
from .errors import StageError
from .split import describe_layer, sample_shapes
from .wire import flatten


def _is_diff(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _as_leaves(obj: Any) -> tuple[Any, list[torch.Tensor]]:
    """Detach the floating tensors of ``obj`` into new leaves that require grad."""
    tensors, structure = flatten(obj, "stage input")
    leaves = [t.detach().requires_grad_(True) if _is_diff(t) else t for t in tensors]
    return structure.unflatten(leaves), [t for t in leaves if _is_diff(t)]


def _diff_outputs(obj: Any) -> list[torch.Tensor]:
    """The floating tensors of a layer's or stage's output, the ones gradients flow back to."""
    return [t for t in flatten(obj)[0] if _is_diff(t)]


class Stage:
    """Layers ``[first, first + len(layers))`` of the model, run as stage ``index``."""

    def __init__(
        self,
        *,
        index: int,
        layers: Sequence[nn.Module],
        first_layer: int,
        is_first: bool,
        is_last: bool,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None,
        split_backward: bool,
        where: str,
    ) -> None:
        self.index = index
        self.layers = list(layers)
        self.first_layer = first_layer
        self.is_first = is_first
        self.is_last = is_last
        self.loss_fn = loss_fn
        self.split_backward = split_backward
        self.where = where  # "rank 1 (stage 1)", for messages
        self._saved: dict[int, Any] = {}  # microbatch -> what its backward needs

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for layer in self.layers:
            for p in layer.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    # -- forward ---------------------------------------------------------------------------
    def forward(self, mb: int, x: Any, target: Any = None, weight: float = 1.0) -> Any:
        """Run the stage on microbatch ``mb``. Returns the output to hand on, or, on the last
        stage, the detached loss of this microbatch scaled by ``weight``."""
        if self.is_first:
            inputs: list[torch.Tensor] = []
        else:
            x, inputs = _as_leaves(x)
        for j, layer in enumerate(self.layers):
            x = self._call(layer, j, mb, x)
        if self.is_last:
            loss = self._loss(mb, x, target) * weight
            outs = [loss]  # the loss belongs to the last layer's graph
            result: Any = loss.detach()
        else:
            outs = _diff_outputs(x)
            result = x
        self._saved[mb] = (inputs, outs)
        return result

    def drop_saved(self) -> None:
        """Forget what forwards saved for a backward that will not run (forward-only steps)."""
        self._saved.clear()

    def _call(self, layer: nn.Module, j: int, mb: int, x: Any) -> Any:
        try:
            return layer(x)
        except Exception as e:  # name the layer, stage and microbatch instead of a deep torch trace
            where = describe_layer(self.layers, j).replace(f"layer {j}", f"layer {self.first_layer + j}")
            hint = ""
            if j == 0 and not self.is_first:
                hint = (
                    f" This is the first layer of stage {self.index}: its input is the previous "
                    "stage's output, so the split point probably falls where the shapes do not "
                    "fit; move the boundary or check that layer's expected input."
                )
            raise StageError(
                f"{self.where}: {self._which()}{where} failed in the forward of microbatch {mb} on input "
                f"{sample_shapes(x)}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}.{hint}"
            ) from None

    def _which(self) -> str:
        """``"stage 3, "`` when this rank holds several stages, so messages say which one."""
        return "" if self.where.endswith(f"(stage {self.index})") else f"stage {self.index}, "

    def _loss(self, mb: int, out: Any, target: Any) -> torch.Tensor:
        if self.loss_fn is None:
            if isinstance(out, torch.Tensor) and out.numel() == 1:
                return out.reshape(())
            raise StageError(
                f"{self.where}: the last stage produced {sample_shapes(out)} and no loss_fn was "
                "given: pass loss_fn=... to the Pipeline (it runs on the last stage)"
            )
        try:
            loss = self.loss_fn(out, target)
        except Exception as e:
            raise StageError(
                f"{self.where}: loss_fn failed on microbatch {mb} with output {sample_shapes(out)} "
                f"and target {sample_shapes(target)}: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise StageError(f"{self.where}: loss_fn must return a scalar tensor, got {sample_shapes(loss)}")
        return loss.reshape(())

    # -- backward --------------------------------------------------------------------------
    def backward(self, mb: int, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Full backward (B): accumulate weight gradients, return the input gradients."""
        inputs, outs = self._saved.pop(mb)
        pairs = self._pairs(outs, grads, mb)
        if pairs[0]:
            torch.autograd.backward(pairs[0], pairs[1])
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]

    def backward_input(self, mb: int, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Input-gradient half (I): only the gradients the previous stage needs; keeps, at every
        node where a weight's subgraph branches off, the gradient W starts from."""
        inputs, outs = self._saved.pop(mb)
        o, go = self._pairs(outs, grads, mb)
        gin, pending = backward_input(o, go, inputs, self.parameters())
        self._saved[mb] = pending
        return gin if inputs else []

    def backward_weight(self, mb: int) -> None:
        """Weight-gradient half (W): the weight side of the graph, from the gradients I kept."""
        pending: Pending = self._saved.pop(mb)
        backward_weight(pending)

    def _pairs(
        self, outs: list[torch.Tensor], grads: list[torch.Tensor] | None, mb: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if grads is None:  # the loss: d loss / d loss = 1
            keep = [o for o in outs if o.requires_grad]
            return keep, None
        if len(grads) != len(outs):
            raise StageError(
                f"{self.where}: got {len(grads)} gradients for microbatch {mb} but the stage has "
                f"{len(outs)} floating-point outputs; the stages disagree about the boundary"
            )
        kept = [(o, gr) for o, gr in zip(outs, grads) if o.requires_grad]
        for o, gr in kept:
            if o.shape != gr.shape:
                raise StageError(
                    f"{self.where}: gradient for microbatch {mb} has shape {tuple(gr.shape)} but the "
                    f"output has {tuple(o.shape)}"
                )
        return [o for o, _ in kept], [gr for _, gr in kept]
