"""The same training in one process, to check a swarm against: same init, data, optimizer, lr.

``microbatched=True`` sums the microbatch gradients in the order every swarm stage does, so a
failure-free swarm run matches it bit for bit; ``False`` is plain full-batch training, which
matches to rounding (the sum over the batch is taken in another order).
"""

from __future__ import annotations

import torch

from ..models import lm_loss
from .spec import SwarmSpec, build_layers, load_corpus, step_batch


def reference(spec: SwarmSpec, steps: int, *, microbatched: bool = True) -> tuple[list[torch.Tensor], list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the peers run
    try:
        layers = build_layers(spec)
        params = [p for m in layers for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, foreach=False)
        corpus = load_corpus(spec)
        losses = []
        for step in range(steps):
            x, y = step_batch(spec, corpus, step)
            chunks = list(zip(x.chunk(spec.microbatches), y.chunk(spec.microbatches))) if microbatched else [(x, y)]
            total = 0.0
            for xm, ym in chunks:
                out = xm
                for m in layers:
                    out = m(out)
                loss = lm_loss(out, ym) * (1.0 / len(chunks))
                loss.backward()
                total += loss.item()
            for g in opt.param_groups:
                g["lr"] = spec.lr_at(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
        return [p.detach().clone() for p in params], losses
    finally:
        torch.set_num_threads(threads)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} parameters against {len(b)}")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))
