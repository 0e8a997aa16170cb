"""Weights shared by layers (tied embeddings), as the trainer and every peer see them.

A parameter is named by ``(layer, index)``: its position in ``layers[layer].parameters()``. A tie
is the list of names one tensor has in the model built from the spec (found by identity, as
:func:`layerwise.runtime.split.tied_parameters` does for the pipeline). A span holds its layers'
parameters once each (a tie inside the span stays one tensor); a tie that leaves the span is a
*cross tie*: the span holds a copy of the tensor, records its gradient per microbatch, and the
trainer sums the uses per microbatch and the microbatches in order, which is exactly what autograd
computes in one process (the two uses of a microbatch meet in one buffer, ``h + e``, then the
buffer is added to ``.grad``). Both copies then take that gradient and stay equal.

Cost of a cross tie: each of the two stages keeps its gradient once per microbatch
(``microbatches x`` the tensor's size; 256 x width floats for the byte-level GPT) and sends them
at the commit; the trainer sends the sum back to both.
"""

from __future__ import annotations

from functools import lru_cache

from .spec import SwarmSpec, build_layers

Name = tuple[int, int]


@lru_cache(maxsize=8)
def ties(spec: SwarmSpec) -> tuple[tuple[Name, ...], ...]:
    """Every tensor used by more than one layer, as its names in model order."""
    seen: dict[int, list[Name]] = {}
    for i, m in enumerate(build_layers(spec)):
        for j, p in enumerate(m.parameters()):
            seen.setdefault(id(p), []).append((i, j))
    return tuple(tuple(v) for v in seen.values() if len({i for i, _ in v}) > 1)


def canonical(spec: SwarmSpec) -> dict[Name, Name]:
    """Each tied name -> the tie's first name (where one process counts it, e.g. in a norm)."""
    return {n: tie[0] for tie in ties(spec) for n in tie}


def span_names(spec: SwarmSpec, first: int, count: int) -> list[Name]:
    """The span's parameters, each once, in the order a peer's optimizer holds them."""
    canon = canonical(spec)
    out: list[Name] = []
    held: set[Name] = set()
    counts = _param_counts(spec)
    for i in range(first, first + count):
        for j in range(counts[i]):
            c = canon.get((i, j), (i, j))
            if c in held and (i, j) in canon:
                continue  # a tie inside the span: the same tensor as an earlier layer's
            held.add(c)
            out.append((i, j))
    return out


def cross_ties(spec: SwarmSpec, first: int, count: int) -> list[int]:
    """Positions in :func:`span_names` of the parameters tied to a layer outside the span."""
    inside = range(first, first + count)
    out = []
    for k, name in enumerate(span_names(spec, first, count)):
        for tie in ties(spec):
            if name in tie and any(i not in inside for i, _ in tie):
                out.append(k)
    return out


@lru_cache(maxsize=8)
def _param_counts(spec: SwarmSpec) -> tuple[int, ...]:
    return tuple(len(list(m.parameters())) for m in build_layers(spec))
