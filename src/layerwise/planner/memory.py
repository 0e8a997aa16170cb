"""Memory per device: model states under ZeRO and activations under recomputation.

Model states follow Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models" (SC 2020), Sec. 3.1 and 5: mixed-precision Adam holds 2 Psi bytes of fp16
parameters, 2 Psi of fp16 gradients and K Psi of optimizer state (K = 12: fp32 parameters,
momentum and variance), (2 + 2 + K) Psi in all; stage 1 shards the optimizer state over the N_d
data-parallel ranks, stage 2 the gradients too, stage 3 the parameters too.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022), Sec. 4 and Table 2, generalised to grouped-query attention and gated MLPs term by
term (tested to equal Table 2 for a GPT-3 layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import ModelSpec

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per parameter of each model state, and per activation element."""

    name: str
    param: int  # working copy of the weights
    grad: int
    optimizer: int  # K: master weights (if any) + Adam's two moments
    activation: int  # bytes per activation element (2 in Korthikanti et al.)


PRECISIONS = {
    # ZeRO's accounting: fp16/bf16 weights and grads, fp32 master copy + momentum + variance.
    "mixed": Precision(name="mixed", param=2, grad=2, optimizer=12, activation=2),
    # Plain fp32 training with Adam (what runs on a CPU here): no master copy.
    "fp32": Precision(name="fp32", param=4, grad=4, optimizer=8, activation=4),
}


@dataclass(frozen=True)
class ModelStates:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states(psi: float, *, dp: int, zero_stage: int, precision: Precision = PRECISIONS["mixed"],
                 offload: bool = False) -> ModelStates:
    """Bytes of parameters, gradients and optimizer state of ``psi`` parameters on one of ``dp``
    data-parallel ranks (ZeRO, Sec. 5.1-5.3 and Table 1). With ``offload`` (ZeRO-Offload,
    Ren et al., 2021) the optimizer state lives in host memory."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    p = precision.param * psi / (dp if zero_stage >= 3 else 1)
    g = precision.grad * psi / (dp if zero_stage >= 2 else 1)
    o = 0.0 if offload else precision.optimizer * psi / (dp if zero_stage >= 1 else 1)
    return ModelStates(p, g, o)


def layer_activation_elements(model: ModelSpec, *, micro: int, tp: int, sp: bool, recompute: str) -> float:
    """Activation memory of one transformer block for one microbatch, in bytes at 2 bytes per
    element (Korthikanti et al.'s unit), on one of ``tp`` tensor-parallel ranks.

    Korthikanti et al. (2022), Sec. 4.1, for a GPT-3 layer (s b h units, a heads):
      attention 11 sbh + 5 a s^2 b, MLP 19 sbh, two LayerNorms 4 sbh: sbh (34 + 5 a s / h).
    Under tensor parallelism the LayerNorm inputs, the inputs of the first linear of each block
    and the two dropout masks (10 sbh) are replicated unless sequence parallelism splits them too
    (Table 2). Selective recomputation drops the 5 a s^2 b of the attention core; full
    recomputation keeps only the block's input, 2 sbh (divided by t under sequence parallelism).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    s, b, h, a = model.seq, micro, model.hidden, model.heads
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (tp if sp else 1)
    kv, f = model.kv_dim, model.ffn_
    drop = 1 if model.dropout else 0
    # Replicated across tensor-parallel ranks without sequence parallelism (Sec. 4.2.2):
    # both norm inputs (4 sbh), the QKV and first-MLP linear inputs (2 + 2 sbh), 2 dropout masks.
    replicated = 4 * sbh + 2 * sbh + 2 * sbh + 2 * drop * sbh
    # Split over t: Q and K (2 sbh + 2 s b kv) for QK^T, V (2 s b kv), the output projection's
    # input (2 sbh); the MLP's activation input and second linear's input, 2 sb f each (GeLU),
    # or gate, up and their product for SwiGLU (3 x 2 sb f).
    split = 2 * sbh + 4 * s * b * kv + 2 * sbh + (3 if model.gated_mlp else 2) * 2 * s * b * f
    # The attention core: softmax output (2 a s^2 b) plus, with dropout, its mask and output.
    core = (2 + 3 * drop) * a * s * s * b if recompute == "none" else 0
    if sp:
        return (replicated + split + core) / tp
    return replicated + (split + core) / tp


def layer_activation_bytes(model: ModelSpec, *, micro: int, tp: int, sp: bool, recompute: str,
                           precision: Precision) -> float:
    """Bytes of one block's saved activations for one microbatch (Table 2 scaled from 2 bytes per
    element to the precision's)."""
    return layer_activation_elements(model, micro=micro, tp=tp, sp=sp, recompute=recompute) * (
        precision.activation / 2
    )


def embedding_activation_bytes(model: ModelSpec, *, micro: int, tp: int, sp: bool, precision: Precision) -> float:
    """The first stage's extra: the embedding's dropout mask, s b h bytes (Korthikanti Sec. 4.3)."""
    mask = model.seq * micro * model.hidden if model.dropout else 0
    return mask / (tp if sp else 1) * (precision.activation / 2)


def head_activation_bytes(model: ModelSpec, *, micro: int, tp: int, sp: bool, precision: Precision) -> float:
    """The last stage's extra (Korthikanti Sec. 4.3): the final norm's and output layer's inputs
    (2 + 2 s b h) and the logits, kept in fp32 for the cross entropy (4 s b V / t)."""
    s, b = model.seq, micro
    act = 4 * s * b * model.hidden / (tp if sp else 1) * (precision.activation / 2)
    return act + 4 * s * b * model.vocab / tp
