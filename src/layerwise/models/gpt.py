"""A small GPT-style byte-level language model (after nanoGPT), written as pipeline layers.

``pipeline_layers()`` returns [embedding, block, ..., block, head]; the head's weight is the
token embedding's (weight tying), so in a pipeline the first and last stages share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab: int = 256  # bytes
    context: int = 64  # longest sequence
    width: int = 64  # embedding size
    heads: int = 4
    blocks: int = 4
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: (batch, seq) int64 -> (batch, seq, width)
        t = idx.shape[1]
        return self.tok(idx) + self.pos(torch.arange(t, device=idx.device))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP, each with a residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes come from the qkv output, not from x: under tensor parallelism (parallel/tp_plans.py)
        # it holds this rank's heads only, [q_r, k_r, v_r], and with sequence parallelism x is a
        # chunk of the sequence while qkv sees all of it.
        qkv = self.qkv(self.ln1(x))  # (batch, seq, 3 * width), or 3 * width / tp
        b, t, _ = qkv.shape
        q, k, v = qkv.chunk(3, dim=2)
        # (batch, heads, seq, head_dim)
        q, k, v = (z.view(b, t, -1, self.qkv.in_features // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, q.shape[1] * q.shape[3]))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.width)
        self.lm = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.ln(x))  # (batch, seq, vocab)


class GPT(nn.Module):
    """The model. Built eagerly or on the meta device (``with torch.device("meta"): GPT(cfg)``),
    it has the same values once materialized: each pipeline layer is initialized from its own
    generator, seeded from one number drawn from torch's global generator at construction, so a
    pipeline rank can initialize its own layers without the others (see ``materialize_layer``)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # device="cpu" so that a meta-device build draws the same seed as an eager one
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        # The submodules' own default init is overwritten below; fork_rng keeps it from moving the
        # global generator, so eager and meta builds leave it in the same state for what follows.
        with torch.random.fork_rng(devices=[]):
            self.embed = Embedding(cfg)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
            self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.lm.weight = self.embed.tok.weight
        if not self.embed.tok.weight.is_meta:
            done: set[int] = set()
            for i, layer in enumerate(self.pipeline_layers()):
                self._init_layer(i, layer, done)

    def materialize_layer(self, index: int, layer: nn.Module) -> None:
        """Allocate pipeline layer ``index`` (built on the meta device) on the CPU and initialize it
        exactly as an eager build does. Tied weights are filled by their first layer's init."""
        layer.to_empty(device="cpu")
        self._init_layer(index, layer, set())

    def _init_layer(self, index: int, layer: nn.Module, done: set[int]) -> None:
        """GPT-2's init (normal 0.02, zero biases, residual projections scaled by 1/sqrt(2 blocks)),
        drawn from this layer's own generator. Parameters in ``done`` (tied, already initialized by
        an earlier layer) are left as they are."""
        g = torch.Generator(device="cpu").manual_seed((self.init_seed + 1_000_003 * (index + 1)) % 2**63)
        with torch.no_grad():
            for name, m in layer.named_modules():
                for pname, p in m.named_parameters(recurse=False):
                    if id(p) in done:
                        continue
                    done.add(id(p))
                    if isinstance(m, nn.LayerNorm):
                        p.fill_(1.0 if pname == "weight" else 0.0)
                    elif pname == "bias":
                        p.zero_()
                    else:
                        scaled = name.endswith(("proj", "out"))  # GPT-2's scaled residual init
                        std = 0.02 / math.sqrt(2 * self.cfg.blocks) if scaled else 0.02
                        p.normal_(0.0, std, generator=g)

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.pipeline_layers():
            x = layer(x)
        return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (batch, seq, vocab), targets (batch, seq)."""
    logits = logits.float()  # the loss in fp32 even when the logits come from bf16 compute
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
