"""The backward split into I (input gradient) and W (weight gradient) inside one autograd graph.

Zero-bubble schedules (Qi et al., 2023) run a stage's backward in two parts: I, on the critical
path, computes only the gradient with respect to the stage's inputs; W, later, computes the
weight gradients. Neither recomputes what the other did. How, with autograd's own graph:

- The *input path* is every graph node from which a stage input's gradient accumulator is
  reachable: exactly the nodes ``autograd.grad(outputs, inputs)`` runs. A *boundary node* is an
  input-path node with an edge into a subgraph that leads to parameters but not to the inputs
  (e.g. ``AddmmBackward`` of a linear layer: its input edge is on the path, its weight and bias
  edges are not). Autograd only computes the outputs a node is asked for, so in I a boundary
  node computes its input-side gradient and skips the weight-side one.
- I runs ``autograd.grad(outputs, inputs, retain_graph=True)`` with a pre-hook on every boundary
  node that keeps the gradient flowing into it (the gradient of that node's forward output).
- W starts the backward again *at* each boundary node with the kept gradient
  (``autograd.grad`` over ``GradientEdge(node, k)``) and asks only for the parameters its
  weight-side edges lead to. The node now computes only its weight-side outputs (``dW = dY^T X``
  for a linear layer), and the weight-side subgraphs, which I never entered, run once. Outputs
  whose graph does not touch the inputs at all (the first stage, an embedding) are done whole in W.

This is the idea of PyTorch's ``stage_backward_input`` / ``stage_backward_weight``
(torch/distributed/pipelining/_backward.py), written per boundary node rather than per
parameter group. One case costs extra work: a parameter reachable from a boundary node both
through its weight side and through its input side (one module applied twice in a stage). Then
that node's W call blocks the input side with zero gradients so nothing is counted twice; the
node recomputes its input-side output once.

Gradients are identical to the fused backward's (same node functions on the same gradients),
except that a parameter used by several nodes sums their contributions in a fixed order here,
where the fused engine sums in its own order (last-bit differences at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@dataclass
class _Boundary:
    node: Node
    targets: list[torch.Tensor]  # parameters its weight-side edges lead to
    conflict: list[Node]  # input-side children, blocked in W when a target is reachable through them
    grads: tuple[Any, ...] | None = None  # gradient flowing into the node, kept by I


@dataclass
class Pending:
    """What I leaves for W: boundary nodes with their gradients, and outputs W does whole."""

    boundaries: list[_Boundary] = field(default_factory=list)
    whole: list[tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor]]] = field(default_factory=list)


def _node_of(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node  # grad_fn, or the gradient accumulator of a leaf


def _children(node: Node) -> list[Node]:
    return [n for n, _ in node.next_functions if n is not None]


def _reach(roots: list[Node], targets: set[Node]) -> dict[Node, frozenset[Node]]:
    """For every node under ``roots``: the nodes of ``targets`` reachable from it."""
    memo: dict[Node, frozenset[Node]] = {}
    empty: frozenset[Node] = frozenset()
    for root in roots:
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:  # iterative post-order: graphs of deep stages exceed Python's recursion
            node, expanded = stack.pop()
            if node in memo:
                continue
            if expanded:
                below = [memo[c] for c in _children(node)]
                mine = frozenset((node,)) if node in targets else empty
                memo[node] = mine.union(*below) if below else mine
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if c not in memo)
    return memo


def backward_input(
    outputs: list[torch.Tensor],
    grads: list[torch.Tensor] | None,
    inputs: list[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], Pending]:
    """I: the gradients of ``inputs`` (zeros where an input does not affect the outputs), and
    what W needs. ``grads`` None means the outputs are the loss (gradient 1)."""
    pending = Pending()
    if not outputs:
        return [torch.zeros_like(t) for t in inputs], pending
    roots = [_node_of(o) for o in outputs]
    on_path = _reach(roots, {_node_of(t) for t in inputs})
    order = {_node_of(p): k for k, p in enumerate(params) if p.requires_grad}
    below = _reach(roots, set(order))  # the parameters (their accumulators) under each node

    def params_of(nodes: frozenset[Node]) -> list[torch.Tensor]:
        return [params[order[n]] for n in sorted(nodes, key=order.__getitem__)]

    # Outputs that do not depend on the inputs: W does their whole backward.
    whole = [k for k, r in enumerate(roots) if not on_path[r] and below[r]]
    if whole:
        outs = [outputs[k] for k in whole]
        gs = None if grads is None else [grads[k] for k in whole]
        pending.whole.append((outs, gs, params_of(frozenset().union(*(below[roots[k]] for k in whole)))))

    seen: set[Node] = set()
    stack = [r for r in roots if on_path[r]]
    while stack:  # boundary nodes, in a fixed (graph) order
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        path = [c for c in _children(node) if on_path[c]]
        side = [c for c in _children(node) if not on_path[c] and below[c]]
        if side:
            targets = frozenset().union(*(below[c] for c in side))
            via_path = frozenset().union(*(below[c] for c in path))
            pending.boundaries.append(_Boundary(node, params_of(targets), path if targets & via_path else []))
        stack.extend(path)

    handles = []
    for b in pending.boundaries:
        def keep(grad_outputs: tuple[Any, ...], b: _Boundary = b) -> None:
            b.grads = tuple(grad_outputs)

        handles.append(b.node.register_prehook(keep))
    try:
        used = [k for k, r in enumerate(roots) if on_path[r]]
        got: Sequence[torch.Tensor | None] = [None] * len(inputs)
        if used and inputs:
            got = torch.autograd.grad(
                [outputs[k] for k in used],
                inputs,
                None if grads is None else [grads[k] for k in used],
                retain_graph=True,  # W runs the weight side of this graph later
                allow_unused=True,
            )
    finally:
        for h in handles:
            h.remove()
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(got, inputs)], pending


def backward_weight(pending: Pending) -> None:
    """W: accumulate the parameters' gradients from what I kept, without recomputing I."""
    # autograd.backward(..., inputs=params) accumulates through the parameters' own gradient
    # accumulators, in place as the fused backward does, instead of adding copies here.
    for outs, gs, params in pending.whole:
        torch.autograd.backward(outs, gs, retain_graph=True, inputs=params)
    for b in pending.boundaries:
        if b.grads is None:  # I never reached it (its gradient was not needed for the inputs)
            continue
        edges = [GradientEdge(b.node, k) for k, g in enumerate(b.grads) if g is not None]
        gs = [g for g in b.grads if g is not None]
        if not edges:
            continue
        blocks = [c.register_prehook(lambda go: tuple(None if g is None else torch.zeros_like(g) for g in go))
                  for c in b.conflict]  # fmt: skip
        try:
            torch.autograd.backward(edges, gs, retain_graph=True, inputs=b.targets)
        finally:
            for h in blocks:
                h.remove()
    pending.boundaries.clear()
    pending.whole.clear()
