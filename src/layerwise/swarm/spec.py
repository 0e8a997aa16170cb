"""What a swarm trains: the model, the data and the optimizer, as one validated, JSON-able spec.

Every peer builds its layers from the spec alone (deterministic init from ``seed``), so the
trainer never ships initial weights. With ``tie_embeddings`` the head's weight is the token
embedding's, as in the demo GPT: when the first and the last layer sit on different stages, each
of the two holds a copy and the trainer sums the two uses' gradients at the commit, so both copies
take the same update (:mod:`.ties`). ``max_grad_norm`` clips the whole model's gradient norm at
each commit as ``torch.nn.utils.clip_grad_norm_`` does in one process (:mod:`.trainer.commit`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

MAX_WIDTH = 8192
MAX_BLOCKS = 256


@dataclass(frozen=True, kw_only=True)
class SwarmSpec:
    width: int = 64  # embedding size of the GPT
    heads: int = 4
    blocks: int = 4  # transformer blocks; the model has blocks + 2 layers (embedding, head)
    seq: int = 32  # tokens per sequence (the model's context)
    seed: int = 0  # weights and data
    batch_size: int = 8  # sequences per step
    microbatches: int = 4
    schedule: str = "gpipe"  # or "1f1b": the order each stage runs its forwards and backwards
    lr: float = 3e-3
    warmup: int = 5  # steps of linear learning-rate warm-up
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    data: str = "stdlib"  # "stdlib" (the Python standard library's source) or a path to a file
    tie_embeddings: bool = False  # the head's weight is the token embedding's (the demo GPT's default)
    max_grad_norm: float = 0.0  # clip the global gradient norm to this at each step; 0 = no clipping

    def __post_init__(self) -> None:
        ints = {"width": (1, MAX_WIDTH), "heads": (1, 256), "blocks": (1, MAX_BLOCKS), "seq": (2, 1 << 16),
                "batch_size": (1, 1 << 16), "microbatches": (1, 1 << 12), "warmup": (0, 1 << 30),
                "seed": (0, 1 << 62)}  # fmt: skip
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"SwarmSpec.{name} must be a whole number in [{lo}, {hi}], got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"SwarmSpec: width {self.width} must be divisible by heads {self.heads}")
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"SwarmSpec: batch_size {self.batch_size} must divide into {self.microbatches} microbatches"
            )
        if self.schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"SwarmSpec.schedule must be 'gpipe' or '1f1b', got {self.schedule!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"SwarmSpec.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SwarmSpec.{name} must be a finite number >= 0, got {v!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"SwarmSpec.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError("SwarmSpec.data must be 'stdlib' or a file path")

    @property
    def layers(self) -> int:
        return self.blocks + 2

    def layer_name(self, i: int) -> str:
        return "embedding" if i == 0 else "head" if i == self.layers - 1 else f"block {i - 1}"

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant: the trainer sends it with every commit."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: Any) -> SwarmSpec:
        if not isinstance(d, dict) or set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"not a swarm spec: {d!r}"[:200])
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def build_layers(spec: SwarmSpec) -> list[Any]:
    """All layers of the model, initialised from ``spec.seed`` exactly as in one process."""
    import torch

    from ..models import GPT, GPTConfig

    torch.manual_seed(spec.seed)
    cfg = GPTConfig(vocab=256, context=spec.seq, width=spec.width, heads=spec.heads, blocks=spec.blocks,
                    tie_embeddings=spec.tie_embeddings)  # fmt: skip
    return GPT(cfg).pipeline_layers()


def load_corpus(spec: SwarmSpec) -> Any:
    import torch

    from ..demo.data import stdlib_corpus

    if spec.data == "stdlib":
        return stdlib_corpus(1_000_000)
    with open(spec.data, "rb") as f:
        raw = f.read(64 << 20)
    if len(raw) < spec.seq + 2:
        raise ValueError(f"--data {spec.data}: {len(raw)} bytes is shorter than one sequence ({spec.seq + 1})")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def step_batch(spec: SwarmSpec, corpus: Any, step: int) -> tuple[Any, Any]:
    from ..demo.data import batch

    return batch(corpus, step, spec.batch_size, spec.seq, spec.seed)


def init_checksum(spec: SwarmSpec) -> float:
    """A fingerprint of the initial weights: peers running other code would train another model."""
    import torch

    with torch.no_grad():
        return float(sum(p.double().abs().sum() for m in build_layers(spec) for p in m.parameters()))
