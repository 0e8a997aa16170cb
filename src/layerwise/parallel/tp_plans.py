"""The built-in tensor-parallel plans: the GPT's Embedding, Block and Head, and the Llama-family
decoder layers of HuggingFace transformers (Llama, Qwen2, Mistral).

Megatron-LM's split (Shoeybi et al. 2019, section 3): the first matmul of attention (q, k, v) and of
the MLP is column-parallel, the second row-parallel, so each pair needs one all-reduce forward and
one backward; with sequence parallelism the all-reduce becomes a reduce-scatter to sequence chunks
and an all-gather before the next pair (Korthikanti et al. 2022), and the norms run on chunks.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from ..models import gpt
from ..runtime.errors import ConfigError
from .tensor import TPOptions, register_tp_plan


class FusedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a Linear whose output is ``parts`` projections side by side (a fused q, k, v).

    A plain Shard(0) of the (3c, c) weight would give rank 0 all of q and part of k. Here each rank
    holds its slice of every part, [q_r; k_r; v_r], which DTensor describes exactly as
    ``_StridedShard(0, split_factor=parts)``: the logical parameter is unchanged (``full_tensor()``
    is the original weight), and DTensor's linear turns it into an output whose local columns are
    [q_r, k_r, v_r], the rank's heads. The output is returned as that local tensor.
    """

    def __init__(self, *, parts: int, input_layouts: Placement | None = None) -> None:
        super().__init__(input_layouts=input_layouts)
        self.parts = parts

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, param in module.named_parameters():
            # The bias stays replicated (DTensor's add slices it locally): FSDP2 shards a parameter's
            # local tensor in contiguous rows, and rows of [q_r; k_r; v_r] split over dp are a layout
            # no DTensor placement describes; the weight avoids that with fsdp_shard_placement.
            placement = _StridedShard(0, split_factor=self.parts) if pname == "weight" else Replicate()
            dist_param = distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(dist_param, requires_grad=param.requires_grad))

    @staticmethod
    def _prepare_output_fn(output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        # (..., parts * width / tp): keep the strided shard as it is; any other layout would mean
        # this rank computed other heads than its own
        if not isinstance(outputs.placements[0], _StridedShard):
            raise RuntimeError(f"fused projection {mod}: DTensor produced {outputs.placements}, not a strided shard")
        return outputs.to_local()


def _divides(tp: int, name: str, **sizes: int) -> None:
    for what, n in sizes.items():
        if n % tp:
            raise ConfigError(
                f"tensor parallelism: {name} has {what}={n}, not divisible by tp={tp}: choose a tp that divides {n}"
            )


# ---- the built-in GPT (layerwise.models.gpt) ------------------------------------------------------


def _check_embedding(m: nn.Module, tp: int, name: str) -> None:
    _divides(tp, name, vocab=m.tok.num_embeddings)


def _embedding(m: nn.Module, mesh: DeviceMesh, o: TPOptions) -> None:
    # The token table is split over the vocab (each rank looks up the ids it holds, zeros elsewhere,
    # then one all-reduce), as the head's weight, so a tied weight has one sharding. The position
    # table is small and stays replicated; with sequence parallelism the whole output is then cut
    # into chunks (tensor.py's boundary hook), an all-reduce where a reduce-scatter would do, once
    # per model: adding a replicated position embedding to a DTensor chunk would need the tok
    # output as a DTensor, and this layer's boundary must be a plain tensor.
    parallelize_module(m, mesh, {"tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())})


def _check_block(m: nn.Module, tp: int, name: str) -> None:
    _divides(tp, name, heads=m.heads, mlp_width=m.fc.out_features)


def _block(m: nn.Module, mesh: DeviceMesh, o: TPOptions) -> None:
    seq = Shard(1) if o.sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        "qkv": FusedColwiseParallel(parts=3, input_layouts=seq),
        "proj": RowwiseParallel(output_layouts=seq),
        "fc": ColwiseParallel(input_layouts=seq),
        "out": RowwiseParallel(output_layouts=seq),
    }
    if o.sequence_parallel:
        plan.update(ln1=SequenceParallel(use_local_output=True), ln2=SequenceParallel(use_local_output=True))
    parallelize_module(m, mesh, plan)


def _head(m: nn.Module, mesh: DeviceMesh, o: TPOptions) -> None:
    seq = Shard(1) if o.sequence_parallel else Replicate()
    logits = Shard(-1) if o.vocab_parallel_loss else Replicate()  # Replicate: all-gather the vocab
    plan: dict[str, Any] = {"lm": ColwiseParallel(input_layouts=seq, output_layouts=logits)}
    if o.sequence_parallel:
        plan["ln"] = SequenceParallel(use_local_output=True)
    parallelize_module(m, mesh, plan)


register_tp_plan(gpt.Embedding, _embedding, check=_check_embedding, sequence_in=False, sequence_out=False)
register_tp_plan(gpt.Block, _block, check=_check_block)
register_tp_plan(
    gpt.Head, _head, check=lambda m, tp, name: _divides(tp, name, vocab=m.lm.out_features),
    sequence_out=False, vocab_parallel=True,
)  # fmt: skip


# ---- HuggingFace Llama-family decoder layers --------------------------------------------------------


def _check_llama(m: nn.Module, tp: int, name: str) -> None:
    cfg = m.self_attn.config
    _divides(tp, name, num_attention_heads=cfg.num_attention_heads, intermediate_size=m.mlp.gate_proj.out_features)
    if cfg.num_key_value_heads % tp:  # GQA: each rank needs whole kv heads for its query heads
        raise ConfigError(
            f"tensor parallelism: {name} has num_key_value_heads={cfg.num_key_value_heads}, not divisible by "
            f"tp={tp}: choose a tp that divides it (kv heads are not replicated)"
        )


def _llama(m: nn.Module, mesh: DeviceMesh, o: TPOptions) -> None:
    # The attention reshapes to (*input_shape, -1, head_dim), so the local head count follows from
    # the sharded projection's width; the kv groups (heads / kv heads) are the same on every rank.
    seq = Shard(1) if o.sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=seq),
    }
    if o.sequence_parallel:
        # one all-gather before attention and one before the MLP, on the module's input, so that
        # q, k and v (and gate, up) share it; the attention's reshape then sees the whole sequence
        gather = {"hidden_states": Replicate()}
        plan.update({
            "input_layernorm": SequenceParallel(use_local_output=True),
            "post_attention_layernorm": SequenceParallel(use_local_output=True),
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts=gather, use_local_output=True
            ),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
        })  # fmt: skip
    parallelize_module(m, mesh, plan)


for _name in (
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer",
):
    register_tp_plan(_name, _llama, check=_check_llama)
