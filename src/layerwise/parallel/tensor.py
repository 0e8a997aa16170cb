"""Tensor and sequence parallelism for pipeline layers, with PyTorch's DTensor ``parallelize_module``.

``apply_tp(layers, tp_mesh)`` parallelizes each layer in place with the plan registered for its
type (``register_tp_plan``); the built-in plans (``tp_plans.py``) cover the GPT's ``Embedding``,
``Block`` and ``Head`` and the Llama-family decoder layers of HuggingFace transformers (Llama,
Qwen2, Mistral), also when a wrapper holds the decoder layer as ``.layer``. A layer with no plan
stays replicated: every tp rank holds all of it and computes the same thing on the same input.

What crosses a layer boundary (and so a pipeline stage boundary) is always a plain
``torch.Tensor``, never a DTensor, the same shape on every rank of one stage's tp group:
- without sequence parallelism it is replicated: every tp rank holds the whole (batch, seq, width);
- with ``sequence_parallel=True`` the hidden state between two planned layers is the rank's
  contiguous chunk of the sequence (batch, seq / tp, width) (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", section 4.2.2); the input of the first
  layer, the output of the last one, and the input and output of layers with no plan stay whole.
  Where a sequence-sharded layer meets a whole one, a DTensor redistribute (a local chunk, or an
  all-gather) is hooked onto the planned side. The sequence length must divide by tp.
The model's input (token ids) and the loss's target are the same on every tp rank.

Parameters keep their names; a sharded one becomes a DTensor whose ``full_tensor()`` is the
unsharded value, so gradients compare with one process and checkpoints keep their meaning.
Parameters shared between layers (tied embeddings) are sharded the same way and stay one
Parameter when both users are parallelized here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..runtime.errors import ConfigError

__all__ = ["TPOptions", "TPPlan", "apply_tp", "fsdp_shard_placement", "register_tp_plan", "tp_plan_for"]


@dataclass(frozen=True, kw_only=True)
class TPOptions:
    """What a plan needs to know besides the layer and the mesh."""

    sequence_parallel: bool = False  # shard the sequence dim between the tensor-parallel matmuls
    vocab_parallel_loss: bool = False  # the LM head returns its vocab shard of the logits (see tp_loss.py)


@dataclass(frozen=True, kw_only=True)
class TPPlan:
    """How to tensor-parallelize one kind of layer.

    ``apply(module, tp_mesh, options)`` parallelizes ``module`` in place (with
    ``parallelize_module``); ``check(module, tp, name)`` raises a one-line ``ConfigError`` when the
    layer cannot be split tp ways; it runs for every layer before any is changed. With sequence
    parallelism, ``sequence_in`` / ``sequence_out`` say whether the layer natively takes / gives
    its hidden state as a sequence chunk (its first positional or ``hidden_states`` argument, and
    its output, must then be plain tensors). ``vocab_parallel``: with ``vocab_parallel_loss`` the
    layer (an LM head) returns its vocab shard of the logits.
    """

    apply: Callable[[nn.Module, DeviceMesh, TPOptions], None]
    check: Callable[[nn.Module, int, str], None] | None = None
    sequence_in: bool = True
    sequence_out: bool = True
    vocab_parallel: bool = False


# Keyed by class, or by "module.QualName" so that a plan for a library's class (transformers)
# does not import that library until a model of it is parallelized.
_PLANS: dict[type | str, TPPlan] = {}


def register_tp_plan(
    cls: type | str,
    fn: Callable[[nn.Module, DeviceMesh, TPOptions], None],
    *,
    check: Callable[[nn.Module, int, str], None] | None = None,
    sequence_in: bool = True,
    sequence_out: bool = True,
    vocab_parallel: bool = False,
) -> None:
    """Use ``fn`` for layers of type ``cls`` (or a subclass); see :class:`TPPlan`."""
    _PLANS[cls] = TPPlan(
        apply=fn, check=check, sequence_in=sequence_in, sequence_out=sequence_out, vocab_parallel=vocab_parallel
    )


def tp_plan_for(layer: nn.Module) -> tuple[nn.Module, TPPlan] | None:
    """The module a plan applies to (the layer, or the layer its wrapper holds as ``.layer``) and the
    plan, or None when the layer has none (it stays replicated)."""
    from . import tp_plans  # noqa: F401  (registers the built-in plans)

    module: Any = layer
    while isinstance(module, nn.Module):
        for klass in type(module).__mro__:
            plan = _PLANS.get(klass) or _PLANS.get(f"{klass.__module__}.{klass.__qualname__}")
            if plan is not None:
                return module, plan
        module = getattr(module, "layer", None)
    return None


def apply_tp(
    layers: Sequence[nn.Module],
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool = False,
    vocab_parallel_loss: bool = False,
    owned: Collection[int] | None = None,
) -> None:
    """Tensor-parallelize the pipeline's layers in place over the 1-D ``tp_mesh``.

    ``layers`` is the whole pipeline in order; ``owned`` the indices of the layers this rank holds
    (default: all; the others may be on the meta device, only their types are read). Only owned
    layers are changed. With sequence parallelism, where the sequence is cut or gathered depends on
    each layer's neighbours, so pass the whole list and ``owned``: a call with only this rank's
    layers takes its first input and last output as whole, which is still exact for contiguous
    stages (at the cost of whole tensors between stages) but wrong for a rank holding several
    chunks (interleaved schedules), whose chunks' neighbours are on other ranks.

    The LM head returns the whole logits (gathered over the vocab), so any ``loss_fn`` works and
    ``backward`` needs no context manager. With ``vocab_parallel_loss=True`` it returns the rank's
    vocab shard instead, (batch, seq, vocab / tp), which saves the gather and tp-fold logits memory;
    the loss must then be :func:`layerwise.parallel.tp_loss.vocab_parallel_lm_loss`.
    """
    if tp_mesh.ndim != 1:
        raise ConfigError(f"apply_tp needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim}-D: pass mesh['tp']")
    owned = set(range(len(layers))) if owned is None else set(owned)
    tp = tp_mesh.size()
    options = TPOptions(sequence_parallel=sequence_parallel, vocab_parallel_loss=vocab_parallel_loss)
    found = [tp_plan_for(layer) for layer in layers]
    if vocab_parallel_loss and (found[-1] is None or not found[-1][1].vocab_parallel):
        raise ConfigError(
            f"vocab_parallel_loss needs a last layer whose plan splits the vocab, and layer {len(layers) - 1} "
            f"({type(layers[-1]).__name__}) has none: keep vocab_parallel_loss=False (the logits stay whole)"
        )
    mine = [(i, entry) for i in sorted(owned) if (entry := found[i]) is not None]
    for i, (module, plan) in mine:
        if plan.check is not None:
            plan.check(module, tp, f"layer {i} ({type(layers[i]).__name__})")
    if tp == 1:
        return
    shared = _shared_parameters([layers[i] for i in sorted(owned)])
    for _, (module, plan) in mine:
        plan.apply(module, tp_mesh, options)
    _retie(shared)
    _settle_grads([layers[i] for i in sorted(owned)])
    if sequence_parallel:
        _hook_sequence_boundaries(layers, found, owned, tp_mesh)


def fsdp_shard_placement(param: nn.Parameter) -> Shard | None:
    """FSDP2's ``shard_placement_fn`` for layers parallelized here: ``fully_shard(...,
    shard_placement_fn=fsdp_shard_placement)``.

    FSDP2 shards dim 0 by default. A weight that apply_tp split per part (the fused qkv,
    ``_StridedShard`` on dim 0) holds [q_r; k_r; v_r] rows; cutting those rows in dp contiguous
    pieces gives a layout no DTensor placement describes, so ``full_tensor()`` and checkpoints
    would be wrong. Such a weight is sharded on dim 1 (its input features) instead."""
    if isinstance(param, DTensor) and any(type(p).__name__ == "_StridedShard" for p in param.placements):
        if param.dim() > 1:
            return Shard(1)
    return None


def _shared_parameters(layers: Sequence[nn.Module]) -> list[list[tuple[nn.Module, str]]]:
    """(module, name) of every use of each Parameter that more than one place holds."""
    uses: dict[int, list[tuple[nn.Module, str]]] = {}
    for layer in layers:
        for module in layer.modules():
            for name, p in module.named_parameters(recurse=False):
                where = uses.setdefault(id(p), [])
                if (module, name) not in where:
                    where.append((module, name))
    return [where for where in uses.values() if len(where) > 1]


def _retie(shared: list[list[tuple[nn.Module, str]]]) -> None:
    """Plans replace each parameter by a new DTensor Parameter, which unties shared ones: make every
    user hold the first one's again (e.g. the GPT's head and token embedding)."""
    for uses in shared:
        first_module, first_name = uses[0]
        kept = getattr(first_module, first_name)
        for module, name in uses[1:]:
            p = getattr(module, name)
            if p is kept:
                continue
            same = isinstance(p, DTensor) == isinstance(kept, DTensor) and (
                not isinstance(p, DTensor) or tuple(p.placements) == tuple(kept.placements)
            )
            if not same:
                where = f"{type(module).__name__}.{name} and {type(first_module).__name__}.{first_name}"
                raise ConfigError(
                    f"tied parameter {where} got different tensor-parallel shardings "
                    f"({_placements(p)} vs {_placements(kept)}): give both layers plans that shard it alike"
                )
            setattr(module, name, kept)


def _settle_grads(layers: Sequence[nn.Module]) -> None:
    """A replicated parameter used on sharded activations gets a gradient laid out otherwise: a
    norm under sequence parallelism a Partial(sum) one (each rank the part from its chunk), the
    fused qkv's bias its rank's q, k, v slices (_StridedShard). Bring it to the parameter's own
    placement as it accumulates (one small all-reduce or all-gather), so that the optimizer,
    clipping and the tied-weight all-reduce see a gradient laid out like its parameter."""
    seen: set[int] = set()
    for layer in layers:
        for p in layer.parameters():
            if isinstance(p, DTensor) and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                p.register_post_accumulate_grad_hook(_settle_grad)


def _settle_grad(p: torch.Tensor) -> None:
    grad = p.grad
    if isinstance(grad, DTensor) and isinstance(p, DTensor) and tuple(grad.placements) != tuple(p.placements):
        p.grad = grad.redistribute(p.device_mesh, p.placements)


def _placements(p: torch.Tensor) -> str:
    return str(tuple(p.placements)) if isinstance(p, DTensor) else "replicated"


def _hook_sequence_boundaries(
    layers: Sequence[nn.Module], found: list[tuple[nn.Module, TPPlan] | None], owned: set[int], mesh: DeviceMesh
) -> None:
    """Where a layer that gives a sequence chunk meets one that wants the whole sequence (or the
    reverse), convert on the planned side: its hidden state is a plain tensor whose layout we know."""
    sharded = False  # the model's input (token ids) is whole on every rank
    for i in range(len(layers) + 1):
        plan = found[i] if i < len(layers) else None
        wants = plan is not None and plan[1].sequence_in
        if wants != sharded:
            convert = _to_chunk if wants else _to_whole
            producer = found[i - 1] if i > 0 else None
            if producer is not None:  # planned producer: convert its output
                if i - 1 in owned:
                    producer[0].register_forward_hook(lambda _m, _a, out, c=convert: c(out, mesh))
            elif plan is not None and i in owned:  # unplanned producer: convert the consumer's input
                plan[0].register_forward_pre_hook(_input_hook(convert, mesh), with_kwargs=True)
        sharded = plan is not None and plan[1].sequence_out


def _input_hook(convert: Callable[[torch.Tensor, DeviceMesh], torch.Tensor], mesh: DeviceMesh) -> Callable[..., Any]:
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (convert(args[0], mesh), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": convert(kwargs["hidden_states"], mesh)}

    return hook


def _to_chunk(x: Any, mesh: DeviceMesh) -> torch.Tensor:
    """Whole (batch, seq, ...) -> this rank's sequence chunk; backward all-gathers the gradient."""
    if not isinstance(x, torch.Tensor) or isinstance(x, DTensor) or x.dim() < 2:
        raise ConfigError(f"sequence parallelism needs a plain (batch, seq, ...) tensor between layers, got {type(x).__name__}")
    tp = mesh.size()
    if x.shape[1] % tp:
        raise ConfigError(
            f"sequence parallelism over tp={tp} needs the sequence length divisible by {tp}, got {x.shape[1]}: "
            "pad or crop the sequences, or turn sequence parallelism off"
        )
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


def _to_whole(x: Any, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's sequence chunk -> the whole sequence (all-gather); backward keeps the chunk's gradient."""
    if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
        raise ConfigError(f"sequence parallelism needs a plain tensor between layers, got {type(x).__name__}")
    return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()
