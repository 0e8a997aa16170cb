"""Cross entropy over logits split by vocabulary across the tensor-parallel ranks.

PyTorch's own answer, ``torch.distributed.tensor.parallel.loss_parallel()``, is a context manager
that must also surround ``backward()``; the pipeline runs ``torch.autograd.backward`` on the loss
later and elsewhere, outside any such context. So this is an autograd Function with its own
(three-number-per-token) all-reduces, as in Megatron-LM (Shoeybi et al. 2019, section 3): the
logits never leave their rank, where gathering them would cost tp times the logits' memory.

    loss_i = log sum_j exp(z_ij - m_i) - (z_i,t_i - m_i),   m_i = max_j z_ij
    dloss_i / dz_ij = softmax(z_i)_j - [j == t_i]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_lm_loss"]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: Any, rank: int, ignore_index: int) -> torch.Tensor:
        # logits (tokens, vocab / tp) this rank's columns; target (tokens,) global vocab ids
        z = logits.float()
        n_local = z.shape[-1]
        start = rank * n_local  # the shard's first id: apply_tp requires the vocab to divide by tp
        m = z.detach().amax(dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m[:, None]
        e = z.exp()
        local_t = target - start
        mine = (local_t >= 0) & (local_t < n_local)
        idx = local_t.clamp(0, n_local - 1)
        sums = torch.stack([e.sum(-1), z.gather(1, idx[:, None]).squeeze(1) * mine])
        dist.all_reduce(sums, group=group)  # (sum of exp, target logit): each target lives on one rank
        valid = target != ignore_index
        count = valid.sum()
        loss = ((sums[0].log() - sums[1]) * valid).sum() / count
        ctx.save_for_backward(e / sums[0][:, None], idx, mine & valid, valid, count)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, idx, hit, valid, count = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(1, idx[:, None], -hit.to(g.dtype)[:, None])
        g *= (valid.to(g.dtype) * grad / count)[:, None]
        return g.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tp_mesh: DeviceMesh, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross entropy of ``logits`` (..., vocab / tp), this rank's vocab shard as the head of
    ``apply_tp(..., vocab_parallel_loss=True)`` returns it, against ``target`` (...) of global ids.
    Equals ``F.cross_entropy`` on the whole logits, on every tp rank."""
    return _VocabParallelCE.apply(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), tp_mesh.get_group(), tp_mesh.get_local_rank(), ignore_index
    )


def vocab_parallel_lm_loss(tp_mesh: DeviceMesh) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``loss_fn`` to use instead of ``layerwise.models.lm_loss`` when the head is vocab-parallel."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, tp_mesh)

    return loss
