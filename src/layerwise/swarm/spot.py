"""Spot checks: what a stage's messages must hold, and recomputing its outputs on another holder.

A sampled forward or backward of a stage is recomputed by another holder of the same layers (the
stage's copy, which holds the committed weights the holder uses during the step) and the two
results are compared with :func:`tolerance`. On a mismatch the trainer recomputes the output
itself from the copy's weights and blames whichever side disagrees with it.

**The tolerance.** Two honest peers run the same code on the same weights and inputs; on the same
kind of CPU the results are bit-identical, and across machines they differ only by the order in
which fp32 sums are taken (BLAS blocking, SIMD width, threads). The classic bound on one sum of
``n`` products is ``|fl(sum) - sum| <= gamma_n * sum |a_i b_i|`` with ``gamma_n = n u / (1 - n u)``
and unit roundoff ``u = 2^-24`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
2002, eq. 3.5). A transformer block chains about ten reductions (two layer norms, q/k/v, scores,
softmax, the weighted sum, the output projection, two MLP matmuls), the longest of length
``n = max(4 * width, seq)``; a span of ``count`` layers chains ``count`` of them and a backward
about three times as many. Each of two computations may be off by that much from the exact
result, so we allow ``2 * 3^[backward] * 10 * count * n * u`` in the norm-wise relative error
``max |a - b| / max |b|``. This is a worst-case bound (errors of random sign grow like ``sqrt(n)``,
not ``n``): the unit test checks that fp32 against fp64, which is a larger perturbation than any
reordering, stays more than ten times below it. A corruption smaller than the tolerance changes
the result by less than rounding could and goes unseen by design.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import lm_loss
from .guard import Expect
from .spec import SwarmSpec, build_layers

VOCAB = 256  # the demo GPT's byte vocabulary (spec.build_layers)
U = 2.0**-24  # fp32 unit roundoff
REDUCTIONS_PER_LAYER = 10


def tolerance(spec: SwarmSpec, count: int, what: str) -> float:
    n = max(4 * spec.width, spec.seq)
    return 2 * (3 if what == "backward" else 1) * REDUCTIONS_PER_LAYER * count * n * U


def expected(spec: SwarmSpec, first: int, count: int, kind: str) -> tuple[list[Expect], list[Expect]]:
    """The tensors of a ``forward``/``backward``/``check:forward``/``check:backward`` request and its reply."""
    rows = spec.batch_size // spec.microbatches
    tokens = Expect((rows, spec.seq), False, VOCAB)
    hidden = Expect((rows, spec.seq, spec.width), True)
    is_first, is_last = first == 0, first + count == spec.layers
    fwd_in = [tokens if is_first else hidden] + ([tokens] if is_last else [])
    fwd_out = [Expect((), True)] if is_last else [hidden]
    bwd_in = [] if is_last else [hidden]
    bwd_out = [] if is_first else [hidden]
    return {
        "forward": (fwd_in, fwd_out),
        "backward": (bwd_in, bwd_out),
        "check:forward": (fwd_in, fwd_out),
        "check:backward": (fwd_in + bwd_in, bwd_out),
    }[kind]


def recompute(layers: list[torch.nn.Module], *, is_first: bool, is_last: bool, what: str,
              tensors: list[torch.Tensor], weight: float) -> list[torch.Tensor]:  # fmt: skip
    """One microbatch through ``layers`` as the holder's :class:`~layerwise.runtime.stage.Stage` runs it.

    ``what="forward"``: ``tensors`` = input (+ targets on the last stage); returns the output (the
    scaled loss on the last stage). ``"backward"``: input (+ targets), then the output's gradient
    (none on the last stage); returns the input's gradient. Parameter gradients are not touched.
    """
    x = tensors[0]
    target = tensors[1] if is_last else None
    if what == "forward":
        with torch.no_grad():
            out = _run(layers, x, target, is_last, weight)
        return [out]
    if is_first:
        return []
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = _run(layers, x, target, is_last, weight)
        grad_out = None if is_last else tensors[1]
        (gx,) = torch.autograd.grad(out, x, grad_outputs=grad_out)
    return [gx]


def _run(layers: list[torch.nn.Module], x: Any, target: Any, is_last: bool, weight: float) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    if is_last:
        return lm_loss(x, target).reshape(()) * weight
    return x


def load_layers(spec: SwarmSpec, first: int, count: int, state: list[torch.Tensor]) -> list[torch.nn.Module]:
    """Layers ``[first, first + count)`` with the weights of a ``get_state`` reply (weight, m, v per parameter)."""
    layers = build_layers(spec)[first : first + count]
    params = [p for m in layers for p in m.parameters()]
    if len(state) != 3 * len(params):
        raise ValueError(f"a state of {len(state)} tensors for {len(params)} parameters")
    with torch.no_grad():
        for p, w in zip(params, state[0::3]):
            if w.shape != p.shape:
                raise ValueError(f"a weight of shape {tuple(w.shape)} for a parameter of {tuple(p.shape)}")
            p.copy_(w)
    return layers


def corrupt(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What ``--fault corrupt:P`` does to an output: noise of 5% of its largest value, far above the tolerance."""
    scale = float(t.detach().abs().max()) if t.numel() else 0.0
    noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return t + 0.05 * (scale or 1.0) * noise
