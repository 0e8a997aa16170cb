"""Per pipeline unit (the embedding, each block, the head): FLOPs of one microbatch and parameters."""

from __future__ import annotations

from .model import ModelSpec
from .strategy import Strategy


def unit_flops(model: ModelSpec, s: Strategy) -> tuple[list[float], list[float], list[float]]:
    """Per unit, FLOPs of forward, input-gradient backward and weight-gradient backward for one
    microbatch on one tensor-parallel rank (recomputation counted in the input-gradient part)."""
    tokens = s.micro * model.seq
    fb = model.forward_flops_per_layer(tokens) / s.tp
    head = model.forward_flops_head(tokens) / s.tp
    redo = {"none": 0.0, "full": fb, "selective": 4 * tokens * model.seq * model.hidden / s.tp}[s.recompute]
    # backward = 2 x forward (Eq. 3): input gradients and weight gradients, one forward each.
    f = [0.0] + [fb] * model.layers + [head]
    i = [0.0] + [fb + redo] * model.layers + [head]
    w = [0.0] + [fb] * model.layers + [head]
    return f, i, w


def unit_params(model: ModelSpec, pp_stages_apart: bool) -> list[float]:
    """Parameters per unit; a tied head held on another stage keeps its own copy (Megatron and
    layerwise.Pipeline both do, and all-reduce the two gradients)."""
    head = model.head_params() + (model.vocab * model.hidden if model.tied_head and pp_stages_apart else 0)
    return [float(model.embedding_params())] + [float(model.params_per_layer())] * model.layers + [float(head)]
