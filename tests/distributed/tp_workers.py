"""Functions run inside the launched ranks for test_tp.py (module level, so spawn can import them)."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from layerwise.models import GPT, GPTConfig, lm_loss
from layerwise.parallel.tensor import apply_tp, fsdp_shard_placement
from layerwise.parallel.tp_loss import vocab_parallel_lm_loss
from layerwise.runtime.errors import ConfigError

STEPS = 3


class _Prologue(nn.Module):
    """HF embeddings + rotary: no tensor-parallel plan, so replicated (dicts cross the boundary)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.embed, self.rotary = hf.model.embed_tokens, hf.model.rotary_emb

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(ids)
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        cos, sin = self.rotary(h, pos)
        return {"h": h, "cos": cos, "sin": sin}


class _Wrapped(nn.Module):
    """A wrapper holding the HF decoder layer as ``.layer`` (the plan must look through it); it
    passes the hidden state as the ``hidden_states`` keyword."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.layer(hidden_states=d["h"], attention_mask=None, position_embeddings=(d["cos"], d["sin"]))
        return {**d, "h": h}


class _Epilogue(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = hf.model.norm, hf.lm_head

    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm_head(self.norm(d["h"]))


def _hf_layers(kind: str) -> tuple[nn.Module, list[nn.Module]]:
    """A tiny random HF model (GQA: 4 query heads, 2 kv heads) as [prologue, wrapped layer, bare layer, epilogue]."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q, k, v with biases
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    cfg = config_cls(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=32, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = model_cls(cfg)
    layers = model.model.layers
    return model, [_Prologue(model), _Wrapped(layers[0]), layers[1], _Epilogue(model)]


def _run(layers: list[nn.Module], x: torch.Tensor, boundaries: list[Any] | None = None) -> Any:
    h: Any = x
    for layer in layers:
        if isinstance(layer, (GPT, _Prologue, _Wrapped, _Epilogue)) or not hasattr(layer, "self_attn"):
            h = layer(h)
        else:  # a bare HF decoder layer, hidden state positional
            h = {**h, "h": layer(h["h"], attention_mask=None, position_embeddings=(h["cos"], h["sin"]))}
        if boundaries is not None:
            t = h["h"] if isinstance(h, dict) else h
            boundaries.append([type(t).__name__, list(t.shape)])
    return h


def _build(kind: str) -> tuple[nn.Module, list[nn.Module], int]:
    torch.manual_seed(1234)
    if kind == "gpt":
        cfg = GPTConfig(vocab=48, context=16, width=32, heads=4, blocks=3)
        model = GPT(cfg)
        return model, model.pipeline_layers(), cfg.vocab
    model, layers = _hf_layers(kind)
    return model, layers, model.config.vocab_size


def _case(kind: str, sp: bool, vp: bool, split: int | None, mesh: DeviceMesh) -> dict[str, Any]:
    """``split``: parallelize layers [0, split) and [split, n) in two calls, as two pipeline stages
    would (each owns its layers); a weight tied across them becomes two Parameters whose gradients
    are summed, as the pipeline's tied-weight all-reduce does."""
    model, layers, vocab = _build(kind)
    ref = copy.deepcopy(model)
    ref_layers = ref.pipeline_layers() if kind == "gpt" else _hf_layers_like(ref, layers)
    parts = [range(len(layers))] if split is None else [range(split), range(split, len(layers))]
    for owned in parts:
        apply_tp(layers, mesh, sequence_parallel=sp, vocab_parallel_loss=vp, owned=owned)
    out: dict[str, Any] = {"keys_same": list(model.state_dict()) == list(ref.state_dict())}
    if kind == "gpt":
        head, tok = model.head.lm.weight, model.embed.tok.weight
        out["tied"] = head is tok  # one Parameter when one call parallelizes both
        out["tied_layout"] = [str(head.placements), list(head.to_local().shape), str(tok.placements), list(tok.to_local().shape)]
        out["qkv_local"] = list(model.blocks[0].qkv.weight.to_local().shape)
    named = dict(model.named_parameters(remove_duplicate=False))
    ref_named = dict(ref.named_parameters(remove_duplicate=False))
    out["names_same"] = list(named) == list(ref_named)
    out["sharded"] = sorted(n for n, p in named.items() if isinstance(p, DTensor) and p.to_local().shape != p.shape)
    out["init_diff"] = max((_full(p) - ref_named[n]).abs().max().item() for n, p in named.items())
    loss_fn = vocab_parallel_lm_loss(mesh) if vp else lm_loss
    # Adam's first step moves each weight by about lr * g / (|g| + eps): for a gradient that
    # cancels to ~1e-9 (a GELU-dead unit, the key bias) the rounding of a sum taken in another
    # order (a few 1e-10) becomes lr * 1e-2 with the default eps=1e-8. eps=1e-6 bounds that
    # amplification at lr / eps; the rest of Adam and the gradients are compared as they are.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    out.update(loss_diff=0.0, grad_diff=[0.0, ""], losses=[], grad_placements_ok=True)
    for step in range(STEPS):
        tokens = torch.randint(0, vocab, (3, 9 if step else 17), generator=g)  # seq 8 and 16
        x, y = tokens[:, :-1], tokens[:, 1:]
        boundaries: list[Any] = []
        loss = loss_fn(_run(layers, x, boundaries), y)
        ref_loss = lm_loss(_run(ref_layers, x), y)
        torch.autograd.backward(loss)  # as the pipeline does: outside any context manager
        ref_loss.backward()
        if kind == "gpt" and split is not None:  # the stages' all-reduce of the tied weight's gradient
            tied = [model.embed.tok.weight, model.head.lm.weight]
            total = tied[0].grad + tied[1].grad
            for p in tied:
                p.grad = total.clone()
        out["boundaries"] = boundaries
        for n, p in named.items():
            out["grad_diff"] = max(out["grad_diff"], [(_full(p.grad) - ref_named[n].grad).abs().max().item(), n])
            if isinstance(p, DTensor):  # the optimizer steps on the grad as it is: it must be laid out like p
                if tuple(p.grad.placements) != tuple(p.placements):
                    out["grad_placements_ok"] = f"{n}: {p.grad.placements} for {p.placements}"
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        out["loss_diff"] = max(out["loss_diff"], abs(loss.item() - ref_loss.item()))
        out["losses"].append(loss.item())
    out["param_diff"] = max([(_full(p) - ref_named[n]).abs().max().item(), n] for n, p in named.items())
    return out


def _hf_layers_like(ref: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    rl = ref.model.layers
    return [_Prologue(ref), _Wrapped(rl[0]), rl[1], _Epilogue(ref)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _error(fn: Any) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return "no error"


def _errors(mesh: DeviceMesh) -> dict[str, str]:
    def gpt(**kw: Any) -> list[nn.Module]:
        return GPT(GPTConfig(**{"vocab": 48, "context": 16, "width": 24, "heads": 4, "blocks": 1, **kw})).pipeline_layers()

    def odd_sequence() -> None:
        layers = gpt()
        apply_tp(layers, mesh, sequence_parallel=True)
        _run(layers, torch.randint(0, 48, (2, 7)))

    def kv_heads() -> None:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=32, num_attention_heads=4,
                                       num_key_value_heads=1, num_hidden_layers=1)  # fmt: skip
        apply_tp(list(transformers.LlamaForCausalLM(cfg).model.layers), mesh)

    return {
        "heads": _error(lambda: apply_tp(gpt(width=24, heads=3), mesh)),
        "vocab": _error(lambda: apply_tp(gpt(vocab=49), mesh)),
        "kv_heads": _error(kv_heads),
        "odd_sequence": _error(odd_sequence),
        "vocab_loss_without_head": _error(lambda: apply_tp(_hf_layers("llama")[1], mesh, vocab_parallel_loss=True)),
    }


def case_key(case: list[Any]) -> str:
    kind, sp, vp, split = case
    return "-".join([kind] + ["sp"] * sp + ["vocab_loss"] * vp + [f"split{split}"] * (split is not None))


def tp_equivalence(cases: list[list[Any]]) -> dict[str, Any]:
    """Each case (model, sequence_parallel, vocab_parallel_loss): 3 AdamW steps with apply_tp over
    all ranks and, in the same process, the unsharded model from the same seed."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    out: dict[str, Any] = {case_key(c): _case(*c, mesh) for c in cases}
    out["errors"] = _errors(mesh)
    out["vocab_loss"] = _vocab_loss(mesh)
    return out


def _vocab_loss(mesh: DeviceMesh) -> dict[str, float]:
    """vocab_parallel_cross_entropy on this rank's vocab columns against F.cross_entropy on all of
    them, with ignored targets (-100) and logits far from zero (the max subtraction matters)."""
    from layerwise.parallel.tp_loss import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 48, generator=g) * 30).requires_grad_()
    target = torch.randint(0, 48, (2, 5), generator=g)
    target[0, :2] = -100
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 48), target.reshape(-1))
    ref.backward()
    r, tp = mesh.get_local_rank(), mesh.size()
    local = logits.detach()[..., r * 48 // tp : (r + 1) * 48 // tp].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, mesh)
    (2 * loss).backward()  # an upstream gradient other than 1
    want = 2 * logits.grad[..., r * 48 // tp : (r + 1) * 48 // tp]
    return {"loss_diff": abs(loss.item() - ref.item()), "grad_diff": (local.grad - want).abs().max().item()}


def tp_dp_equivalence(sequence_parallel: list[bool]) -> dict[str, Any]:
    """dp=2 x tp=2 on one 2-D mesh, for each sequence_parallel flag."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return {f"sp={sp}": _tp_dp_case(sp, mesh) for sp in sequence_parallel}


def _tp_dp_case(sequence_parallel: bool, mesh: DeviceMesh) -> dict[str, Any]:
    """apply_tp on the mesh's tp dim, then FSDP2 ``fully_shard`` on its dp dim (each block, then
    the root with the tied embedding and head); each replica trains on its half of the batch.
    Compared with one process on the whole batch."""
    from torch.distributed.fsdp import fully_shard

    model, layers, vocab = _build("gpt")
    ref = copy.deepcopy(model)
    apply_tp(layers, mesh["tp"], sequence_parallel=sequence_parallel)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"], shard_placement_fn=fsdp_shard_placement)
    fully_shard(model, mesh=mesh["dp"], shard_placement_fn=fsdp_shard_placement)
    named = dict(model.named_parameters())
    ref_named = dict(ref.named_parameters())
    out: dict[str, Any] = {"names_same": list(named) == list(ref_named)}
    out["init_diff"] = max((_full(p) - ref_named[n]).abs().max().item() for n, p in named.items())
    out["qkv_placements"] = [str(p.placements) for p in (model.blocks[0].qkv.weight, model.blocks[0].qkv.bias)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.1)  # eps: see _case
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    rows = slice(2 * mesh["dp"].get_local_rank(), 2 * mesh["dp"].get_local_rank() + 2)
    out.update(loss_diff=0.0, grad_diff=[0.0, ""], losses=[])
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (4, 9), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        loss = lm_loss(model(x[rows]), y[rows])
        ref_loss = lm_loss(ref(x), y)
        loss.backward()
        ref_loss.backward()
        for n, p in named.items():  # FSDP2 averages the replicas' gradients: the whole batch's mean
            out["grad_diff"] = max(out["grad_diff"], [(_full(p.grad) - ref_named[n].grad).abs().max().item(), n])
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        out["loss_diff"] = max(out["loss_diff"], abs(total.item() / 2 - ref_loss.item()))
        out["losses"].append(total.item() / 2)
    out["param_diff"] = max([(_full(p) - ref_named[n]).abs().max().item(), n] for n, p in named.items())
    return out
