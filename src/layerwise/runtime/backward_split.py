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
    # (outputs, their gradients, the parameters to reach; None: the graph is untouched, run it all)
    whole: list[tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]] = field(default_factory=list)


def _node_of(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node  # grad_fn, or the gradient accumulator of a leaf


def _masks(roots: list[Node], marks: dict[Node, int]) -> tuple[dict[Node, int], dict[Node, list[Node]]]:
    """One walk of the graph under ``roots``: for every node, the bit-or of the ``marks`` of the
    nodes reachable from it (itself included), and its children.

    Bits instead of sets and one walk instead of one per question: this analysis runs on every
    microbatch, and on a small layer it costs as much as the backward itself.
    """
    masks: dict[Node, int] = {}
    kids: dict[Node, list[Node]] = {}
    for root in roots:
        if root in masks:
            continue
        stack: list[Node] = [root]
        while stack:  # iterative post-order: graphs of deep stages exceed Python's recursion
            node = stack[-1]
            below = kids.get(node)
            if below is None:
                below = kids[node] = [n for n, _ in node.next_functions if n is not None]
                todo = [c for c in below if c not in masks]
                if todo:
                    stack.extend(todo)
                    continue
            stack.pop()
            if node in masks:
                continue
            m = marks.get(node, 0)
            for c in below:
                m |= masks[c]
            masks[node] = m
    return masks, kids


def _bits(mask: int) -> list[int]:
    out, k = [], 0
    while mask:
        if mask & 1:
            out.append(k)
        mask >>= 1
        k += 1
    return out


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
    if not inputs:  # the first stage: nothing to send back, W does the whole backward
        if any(p.requires_grad for p in params):  # None: a plain backward, as the fused one
            pending.whole.append((list(outputs), None if grads is None else list(grads), None))
        return [], pending
    roots = [_node_of(o) for o in outputs]
    # Bit 0: an input's accumulator is reachable (the node is on the input path); bit k + 1:
    # parameter k's accumulator is.
    marks: dict[Node, int] = {}
    for t in inputs:
        n = _node_of(t)
        marks[n] = marks.get(n, 0) | 1
    for k, p in enumerate(params):
        if p.requires_grad:
            n = _node_of(p)
            marks[n] = marks.get(n, 0) | (2 << k)
    masks, kids = _masks(roots, marks)

    def params_of(mask: int) -> list[torch.Tensor]:
        return [params[k] for k in _bits(mask >> 1)]

    # Outputs that do not depend on the inputs: W does their whole backward.
    whole = [k for k, r in enumerate(roots) if not masks[r] & 1 and masks[r] > 1]
    if whole:
        outs = [outputs[k] for k in whole]
        gs = None if grads is None else [grads[k] for k in whole]
        below = 0
        for k in whole:
            below |= masks[roots[k]]
        pending.whole.append((outs, gs, params_of(below)))

    seen: set[Node] = set()
    stack = [r for r in roots if masks[r] & 1]
    while stack:  # boundary nodes, in a fixed (graph) order
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        path: list[Node] = []
        side = via_path = 0
        for c in kids[node]:
            m = masks[c]
            if m & 1:
                path.append(c)
                via_path |= m
            else:
                side |= m
        if side > 1:
            conflict = path if (side & via_path) >> 1 else []
            pending.boundaries.append(_Boundary(node, params_of(side), conflict))
        stack.extend(path)

    handles = []
    for b in pending.boundaries:
        def keep(grad_outputs: tuple[Any, ...], b: _Boundary = b) -> None:
            b.grads = tuple(grad_outputs)

        handles.append(b.node.register_prehook(keep))
    try:
        used = [k for k, r in enumerate(roots) if masks[r] & 1]
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
        if params is None:
            torch.autograd.backward(outs, gs)
        else:
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
