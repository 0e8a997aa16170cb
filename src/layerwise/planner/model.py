"""A decoder-only transformer as numbers: parameter counts and FLOPs (pure Python, no torch).

The counts follow Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM" (SC 2021): Eq. 2 for parameters, Eq. 3 for FLOPs. Eq. 2 and 3 assume GPT-3's
layer (multi-head attention, an MLP of width 4h with biases, two LayerNorms, learned positions,
tied head); :class:`ModelSpec` also describes grouped-query attention, gated MLPs (SwiGLU), RMSNorm
and untied heads so that a HuggingFace Llama config counts exactly, and reduces to the paper's
expressions for a GPT-3 layer (tested).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelSpecError(ValueError):
    """A model description is incomplete or inconsistent."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The shape of a decoder-only transformer."""

    layers: int  # transformer blocks, l
    hidden: int  # h
    heads: int  # attention heads, a
    vocab: int  # V
    seq: int  # sequence length of a training sample, s
    kv_heads: int | None = None  # grouped-query attention; None = heads (multi-head)
    ffn: int | None = None  # MLP width; None = 4 h
    gated_mlp: bool = False  # SwiGLU: three matrices (gate, up, down) instead of two
    bias: bool = True  # linear layers have biases (GPT-2/3), not Llama
    norm: str = "layernorm"  # "layernorm" (weight + bias) or "rmsnorm" (weight only)
    learned_positions: bool = True  # a (seq x h) position embedding (GPT), not rotary (Llama)
    tied_head: bool = True  # the output layer reuses the token embedding
    final_norm: bool = True  # a norm before the head (Eq. 2 leaves it out)
    dropout: bool = True  # dropout masks are saved for backward (Korthikanti et al. count them)
    fused_qkv: bool = False  # one Q/K/V matrix (GPT-2, layerwise's GPT), not three (Llama)
    name: str = "model"

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "vocab", "seq"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ModelSpecError(f"model {field} must be a whole number >= 1, got {value!r}")
        if self.hidden % self.heads:
            raise ModelSpecError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        kv = self.kv_heads_
        if kv < 1 or self.heads % kv:
            raise ModelSpecError(f"kv_heads {kv} must be >= 1 and divide heads {self.heads}")
        if self.ffn is not None and (not isinstance(self.ffn, int) or self.ffn < 1):
            raise ModelSpecError(f"ffn must be a whole number >= 1, got {self.ffn!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ModelSpecError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")

    @property
    def kv_heads_(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def ffn_(self) -> int:
        return 4 * self.hidden if self.ffn is None else self.ffn

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads_ * self.head_dim

    # --- parameters ---------------------------------------------------------------------------

    def matmul_params_per_layer(self) -> int:
        """Weights of the layer's matrix multiplies (what FLOPs scale with)."""
        h, f = self.hidden, self.ffn_
        attention = 2 * h * h + 2 * h * self.kv_dim  # Q and output projection; K and V
        mlp = (3 if self.gated_mlp else 2) * h * f
        return attention + mlp

    def _norm_params(self) -> int:
        return (2 if self.norm == "layernorm" else 1) * self.hidden

    def params_per_layer(self) -> int:
        """One transformer block: matrices, biases and its two norms. 12h^2 + 13h for GPT-3."""
        h, f = self.hidden, self.ffn_
        biases = (h + 2 * self.kv_dim + h + (2 * f if self.gated_mlp else f) + h) if self.bias else 0
        return self.matmul_params_per_layer() + biases + 2 * self._norm_params()

    def block_modules(self) -> list[int]:
        """Parameters of each module of a block that holds some of its own: the linear layers
        (weight and bias) and the two norms. They add up to :meth:`params_per_layer` (tested);
        the runtime's ZeRO-3 gives each large one an FSDP unit of its own (:mod:`.units`)."""
        h, f, kv, b = self.hidden, self.ffn_, self.kv_dim, self.bias
        if self.fused_qkv:
            attention = [h * (h + 2 * kv) + (h + 2 * kv if b else 0)]
        else:
            attention = [h * h + (h if b else 0)] + [h * kv + (kv if b else 0)] * 2
        attention.append(h * h + (h if b else 0))  # output projection
        mlp = [h * f + (f if b else 0)] * (2 if self.gated_mlp else 1) + [f * h + (h if b else 0)]
        return attention + mlp + [self._norm_params()] * 2

    def embedding_modules(self) -> list[int]:
        """Parameters of the embedding layer's modules: token and (learned) position tables."""
        return [self.vocab * self.hidden] + ([self.seq * self.hidden] if self.learned_positions else [])

    def head_modules(self, *, own_copy: bool) -> list[int]:
        """The head layer's modules: final norm and output matrix (a tied head on a stage of
        its own holds a copy of the embedding: ``own_copy``)."""
        out = [self._norm_params()] if self.final_norm else []
        return out + ([self.vocab * self.hidden] if not self.tied_head or own_copy else [])

    def embedding_params(self) -> int:
        """The first stage's extra: token (and learned position) embeddings."""
        return self.vocab * self.hidden + (self.seq * self.hidden if self.learned_positions else 0)

    def head_params(self) -> int:
        """The last stage's extra: final norm and the output layer (0 when tied: counted once)."""
        norm = self._norm_params() if self.final_norm else 0
        return norm + (0 if self.tied_head else self.vocab * self.hidden)

    def params(self) -> int:
        """All parameters, each shared one counted once."""
        return self.layers * self.params_per_layer() + self.embedding_params() + self.head_params()

    # --- FLOPs (Narayanan et al., 2021, Sec. 5.1 / Eq. 3) ------------------------------------

    def forward_flops_per_layer(self, tokens: float) -> float:
        """Forward FLOPs of one block for ``tokens = b * s`` tokens: 2 per multiply-add of the
        matrices (24 b s h^2 for GPT-3) plus the attention scores and their product with V
        (4 b s^2 h; Eq. 3 counts the full, not causal, matrix)."""
        return 2 * tokens * self.matmul_params_per_layer() + 4 * tokens * self.seq * self.hidden

    def forward_flops_head(self, tokens: float) -> float:
        """The output layer's logits: 2 b s h V."""
        return 2 * tokens * self.hidden * self.vocab

    def step_flops(self, batch: int, *, recompute: bool) -> float:
        """FLOPs of one training step of ``batch`` samples: backward = 2 x forward, and with full
        recomputation one more forward of every block (the head is not recomputed). For GPT-3
        layers with recompute this is Eq. 3, 96 B s l h^2 (1 + s/6h + V/16lh)."""
        tokens = batch * self.seq
        passes = 4 if recompute else 3
        return passes * self.layers * self.forward_flops_per_layer(tokens) + 3 * self.forward_flops_head(tokens)

    def describe(self) -> str:
        kv = f", kv_heads {self.kv_heads_}" if self.kv_heads_ != self.heads else ""
        return (
            f"{self.name}: {self.params() / 1e9:.2f}B params, {self.layers} layers, hidden {self.hidden}, "
            f"heads {self.heads}{kv}, ffn {self.ffn_}, vocab {self.vocab}, seq {self.seq}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def eq2_params(layers: int, hidden: int, vocab: int, seq: int) -> float:
    """Narayanan et al. (2021), Eq. 2: P = 12 l h^2 (1 + 13/(12 h) + (V + s)/(12 l h))."""
    l, h = layers, hidden
    return 12 * l * h**2 * (1 + 13 / (12 * h) + (vocab + seq) / (12 * l * h))


def eq3_flops(batch: int, layers: int, hidden: int, vocab: int, seq: int) -> float:
    """Narayanan et al. (2021), Eq. 3 (with full recomputation): 96 B s l h^2 (1 + s/6h + V/16lh)."""
    b, l, h, s = batch, layers, hidden, seq
    return 96 * b * s * l * h**2 * (1 + s / (6 * h) + vocab / (16 * l * h))


_SEQ_CAP = 8192


def from_hf_config(config: dict[str, Any], *, seq: int | None = None, name: str = "hf") -> ModelSpec:
    """A :class:`ModelSpec` from a HuggingFace ``config.json`` (Llama, Mistral, Qwen2, GPT-2 and
    the like). ``seq`` defaults to ``max_position_embeddings`` capped at 8192 (long-context
    models are trained mostly at shorter lengths; pass ``seq`` to choose)."""
    def get(*keys: str) -> Any:
        for k in keys:
            if k in config and config[k] is not None:
                return config[k]
        return None

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]  # fmt: skip
    if missing:
        raise ModelSpecError(f"the HuggingFace config has no {', '.join(missing)}")
    model_type = str(get("model_type") or "").lower()
    gpt2_like = model_type in ("gpt2", "gpt_neo", "gptj", "gpt_bigcode") or "n_embd" in config
    max_pos = get("max_position_embeddings", "n_positions", "n_ctx")
    if seq is None:
        if max_pos is None:
            raise ModelSpecError("the HuggingFace config has no max_position_embeddings: pass --seq")
        seq = min(int(max_pos), _SEQ_CAP)
    ffn = get("intermediate_size", "n_inner")
    act = str(get("hidden_act", "activation_function") or "").lower()
    gated = not gpt2_like and act in ("silu", "swish", "gelu_pytorch_tanh") or "mlp_bias" in config
    return ModelSpec(
        name=name,
        layers=int(layers),
        hidden=int(hidden),
        heads=int(heads),
        kv_heads=int(get("num_key_value_heads") or heads),
        ffn=int(ffn) if ffn else None,
        vocab=int(vocab),
        seq=int(seq),
        gated_mlp=gated,
        bias=gpt2_like or bool(get("attention_bias")),
        norm="layernorm" if gpt2_like else "rmsnorm",
        learned_positions=gpt2_like,
        tied_head=bool(config.get("tie_word_embeddings", gpt2_like)),
        dropout=float(get("attention_dropout", "attn_pdrop") or 0) > 0,
        fused_qkv=gpt2_like,  # GPT-2's c_attn
    )


def load_hf_config(path: str | Path, *, seq: int | None = None) -> ModelSpec:
    p = Path(path)
    try:
        config = json.loads(p.read_text())
    except OSError as err:
        raise ModelSpecError(f"cannot read --hf-config {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ModelSpecError(f"--hf-config {path} is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"--hf-config {path} must hold a JSON object")
    return from_hf_config(config, seq=seq, name=p.stem)


def check_finite(value: float, what: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ModelSpecError(f"{what} must be a number > 0, got {value!r}")
    return float(value)
