"""The causal language-modelling loss, as HuggingFace computes it, for pipelines.

HF (``transformers.loss.loss_utils.ForCausalLMLoss``) pads the labels on the right with -100,
shifts them left by one (the logits at position t predict token t + 1), and takes the mean
cross entropy in fp32 over the labels that are not -100, across the whole batch.

A pipeline computes the loss per microbatch and weights each by its share of the batch's rows.
That equals the whole batch's mean over tokens only when every row has the same number of
labelled tokens (packed, unpadded data). For padded batches, pass ``causal_lm_targets(labels)``
as the targets: each row then carries the batch's rows-per-labelled-token ratio, and each
microbatch's loss becomes its token sum scaled so that the row-weighted sum is the token mean of
the whole batch, whatever the microbatch split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, labels: Any) -> torch.Tensor:
    """Mean next-token cross entropy, labels -100 ignored, shifted as HF shifts them.

    ``labels``: (batch, seq) token ids, or the dict from :func:`causal_lm_targets`.
    ``logits``: (batch, seq, vocab).
    """
    if isinstance(labels, dict):
        tokens, scale = labels["labels"], labels["rows_per_token"]
    else:
        tokens, scale = labels, None
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(tokens.shape)} do not match logits {tuple(logits.shape)}: need (batch, seq)")
    shifted = F.pad(tokens, (0, 1), value=IGNORE)[:, 1:]  # position t is scored on token t + 1
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    if scale is None:
        return F.cross_entropy(flat_logits, shifted.reshape(-1), ignore_index=IGNORE)
    total = F.cross_entropy(flat_logits, shifted.reshape(-1), ignore_index=IGNORE, reduction="sum")
    # the Pipeline weights this by rows / batch rows, giving total / batch tokens
    return total * scale[0].to(total.dtype) / tokens.shape[0]


def causal_lm_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets that make a pipeline's loss the whole batch's token mean (as HF's) when rows have
    different numbers of labelled tokens (padding). Use with ``loss_reduction="mean"`` (the
    default) and :func:`causal_lm_loss`."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq), got {tuple(labels.shape)}")
    count = int((labels[:, 1:] != IGNORE).sum())
    rows = labels.shape[0]
    ratio = rows / count if count else 0.0
    return {"labels": labels, "rows_per_token": torch.full((rows,), ratio, dtype=torch.float64)}
