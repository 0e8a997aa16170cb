"""The same training in one process, to check a swarm against: same init, data, optimizer, lr.

``microbatched=True`` sums the microbatch gradients in the order every swarm stage does, so a
failure-free swarm run matches it bit for bit; ``False`` is plain full-batch training, which
matches to rounding (the sum over the batch is taken in another order).

``groups`` gives, per layer, the microbatch groups a stage's replicas sum apart, in slot order
(``[[0, 2], [1, 3]]`` for two replicas of four microbatches): each group is summed in order, then
the groups in slot order, as the trainer adds its replicas' sums. A weight tied across layers is
always summed microbatch by microbatch (what the swarm does for a tie that crosses stages). With
``spec.max_grad_norm`` the gradients are clipped by ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import lm_loss
from .spec import SwarmSpec, build_layers, load_corpus, step_batch

Groups = Sequence[Sequence[Sequence[int]]]  # per layer: microbatch groups in slot order


def reference(spec: SwarmSpec, steps: int, *, microbatched: bool = True,
              groups: Groups | None = None) -> tuple[list[torch.Tensor], list[float]]:  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the peers run
    try:
        layers = build_layers(spec)
        params = [p for m in layers for p in m.parameters()]  # per layer, as the swarm reports them
        unique = list({id(p): p for p in params}.values())
        opt = torch.optim.AdamW(unique, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, foreach=False)
        corpus = load_corpus(spec)
        losses = []
        for step in range(steps):
            x, y = step_batch(spec, corpus, step)
            chunks = list(zip(x.chunk(spec.microbatches), y.chunk(spec.microbatches))) if microbatched else [(x, y)]
            total = 0.0
            per_mb: list[list[torch.Tensor | None]] = []
            for xm, ym in chunks:
                out = xm
                for m in layers:
                    out = m(out)
                loss = lm_loss(out, ym) * (1.0 / len(chunks))
                loss.backward()
                total += loss.item()
                if groups is not None:  # keep each microbatch's gradients apart, to be summed by group
                    per_mb.append([p.grad for p in unique])
                    for p in unique:
                        p.grad = None
            if groups is not None:
                _sum_groups(layers, unique, per_mb, groups)
            if spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(unique, spec.max_grad_norm, foreach=False)
            for g in opt.param_groups:
                g["lr"] = spec.lr_at(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
        return [p.detach().clone() for p in params], losses
    finally:
        torch.set_num_threads(threads)


def _sum_groups(layers: list[torch.nn.Module], unique: list[torch.Tensor], per_mb: list[list[torch.Tensor | None]],
                groups: Groups) -> None:  # fmt: skip
    users: dict[int, list[int]] = {}
    for i, m in enumerate(layers):
        for p in m.parameters():
            users.setdefault(id(p), []).append(i)
    for k, p in enumerate(unique):
        layer = users[id(p)]
        order = [list(range(len(per_mb)))] if len(set(layer)) > 1 else groups[layer[0]]
        total: torch.Tensor | None = None
        for group in order:
            part: torch.Tensor | None = None
            for mb in group:
                g = per_mb[mb][k]
                g = torch.zeros_like(p) if g is None else g
                part = g.clone() if part is None else part + g
            if part is not None:
                total = part if total is None else total + part
        p.grad = total


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} parameters against {len(b)}")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))
