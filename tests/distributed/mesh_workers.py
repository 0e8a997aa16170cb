"""Functions run inside the launched ranks for the mesh tests (dp x pp x tp, memory tools, meta)."""

from __future__ import annotations

from typing import Any

import torch

import layerwise
from layerwise.models import GPT, GPTConfig, lm_loss
from layerwise.runtime.split import as_layers

from .workers import param_differences, reference_backward

BATCHES = (8, 7, 12)  # 7 rows do not split evenly over 2 replicas or into 3 microbatches
CFG = GPTConfig(vocab=48, context=16, width=32, heads=4, blocks=6)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor. Collective for DTensors."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor; no communication."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _batch(n: int, g: torch.Generator, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    seq = int(torch.randint(8, CFG.context + 1, (1,), generator=g)) // multiple * multiple  # changes per step
    tokens = torch.randint(0, CFG.vocab, (n, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def mesh_equivalence(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """For each case (Pipeline keyword arguments, plus "meta": build on the meta device): train 3
    steps and, in the same process, the unsplit model from the same seed; return the largest loss,
    gradient and parameter differences."""
    out: dict[str, Any] = {}
    for case in cases:
        kw = dict(case)
        meta = kw.pop("meta", False)
        clip = kw.pop("max_grad_norm", None)
        torch.manual_seed(1234)
        ref = GPT(CFG)
        torch.manual_seed(1234)
        if meta:
            with torch.device("meta"):
                model = GPT(CFG)
        else:
            model = GPT(CFG)
        ref_layers = as_layers(ref)
        if kw.get("precision", "fp32") != "fp32":  # the reference computes in the same precision
            from layerwise.parallel.precision import apply_precision

            apply_precision(ref_layers, kw["precision"])
        # SGD with momentum is linear in the gradients, so rounding (sums in another order) stays
        # at rounding size; Adam divides by sqrt(v) and can amplify it for tiny gradients.
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        pipe = layerwise.Pipeline(
            model, loss_fn=lm_loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            max_grad_norm=clip, **kw,
        )  # fmt: skip
        ref_params = {f"{i}.{n}": p for i, layer in enumerate(ref_layers) for n, p in layer.named_parameters()}
        g = torch.Generator().manual_seed(99)
        loss_diff = grad_diff = grad_rel = eval_diff = 0.0
        losses = []
        ex, ey = _batch(9, torch.Generator().manual_seed(7), kw.get("tp", 1) if kw.get("sequence_parallel") else 1)
        for n in BATCHES:
            # sequence parallelism splits the sequence over the tp ranks
            x, y = _batch(n, g, kw.get("tp", 1) if kw.get("sequence_parallel") else 1)
            loss = pipe.forward_backward(x, y)
            ref_loss = reference_backward(ref_layers, lm_loss, ref_opt, x, y)
            for name, p in pipe.named_parameters().items():
                delta = ref_params[name].grad - _full(p.grad)
                grad_diff = max(grad_diff, delta.abs().max().item())
                grad_rel = max(grad_rel, (delta.norm() / ref_params[name].grad.norm().clamp_min(1e-12)).item())
            if clip is not None:
                norm = pipe.clip_grad_norm_(clip)
                ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
                grad_diff = max(grad_diff, abs(norm - ref_norm))
            pipe.optimizer.step()
            ref_opt.step()
            loss_diff = max(loss_diff, abs(loss - ref_loss.item()))
            losses.append(loss)
            # a forward-only evaluation between steps: the same loss as the unsplit model's, and
            # no gradient touched (the next steps, still compared above, see FSDP's state intact)
            grads = [None if p.grad is None else _local(p.grad).clone() for p in pipe.parameters()]
            ev = pipe.evaluate(ex, ey)
            with torch.no_grad():
                h = ex
                for layer in ref_layers:
                    h = layer(h)
                eval_diff = max(eval_diff, abs(ev - lm_loss(h, ey).item()))
            for before, p in zip(grads, pipe.parameters()):
                assert (before is None) == (p.grad is None) and (before is None or torch.equal(before, _local(p.grad))), \
                    "evaluate() changed a gradient"
        param_diff, compared = param_differences(pipe, ref_params, _full)
        out[mesh_key(case)] = {
            "loss_diff": loss_diff, "eval_diff": eval_diff, "grad_diff": grad_diff, "grad_rel": grad_rel, "param_diff": param_diff, "losses": losses,
            "compared": compared, "all_params": sorted(ref_params),
            "sharded": any(hasattr(p, "full_tensor") for p in pipe.parameters()),
        }  # fmt: skip
        pipe.close()
    return out


def mesh_key(case: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(case.items()))
