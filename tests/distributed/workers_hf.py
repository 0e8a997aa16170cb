"""Ranks of the HuggingFace pipeline tests (module level, so spawn can import them)."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

import layerwise
from layerwise.runtime.split import resolve_partition, stage_bounds

from ..hf_tiny import batch, reference, tiny

ROWS, SEQ, MICROBATCHES = 5, 12, 3  # 5 rows in 3 microbatches: 2, 2, 1 rows of different token counts


def hf_case_key(case: list[Any]) -> str:
    family, tied, padding, source, schedule, targets = case
    return "/".join([family, "tied" if tied else "untied", padding, source, schedule, targets])


def hf_equivalence(cases: list[list[Any]], dirs: dict[str, str], saves: list[list[Any]]) -> dict[str, Any]:
    """For each (family, tied, padding, source, schedule, targets): one pipeline step of the
    from_hf model next to HF's own forward + loss + backward in this process; return the loss
    and largest gradient differences, the HF names of the parameters compared on this rank and,
    for models read from a directory, the tensor names this rank read."""
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out: dict[str, Any] = {}
    for case in cases:
        family, tied, padding, source, schedule, targets = case
        ref = tiny(family, tied=tied)
        reads: list[str] = []
        expected: set[str] = set()
        if source == "dir":  # the same weights, saved by the test; this rank reads its own layers
            lm = layerwise.from_hf(dirs[f"{family}/{tied}"], attn_implementation="eager")
            layers = lm.layers()
            for layer in layers:
                layer.eval()
        else:
            lm = layerwise.from_hf(copy.deepcopy(ref))
            layers = lm.layers()
        # a meta model: the Pipeline calls lm.materialize for the layers this rank owns
        pipe = layerwise.Pipeline(
            lm, schedule=schedule, microbatches=MICROBATCHES, chunks=2, loss_fn=layerwise.causal_lm_loss
        )
        if source == "dir":
            assert schedule == "1f1b"  # stage s on rank s
            reads = list(lm.materialize.read)
            stored = set(lm.materialize.weight_map)
            a, b = stage_bounds(resolve_partition("uniform", len(layers), world))[rank]
            for i in range(a, b):  # each of this rank's tensors under the one name it is stored as
                expected |= {next(n for n in names if n in stored) for names in layers[i].hf_names.values()}
        inputs, labels = batch(padding, ROWS, SEQ, seed=7)
        ref_loss = reference(ref, inputs, labels)
        y = layerwise.causal_lm_targets(labels) if targets == "weighted" else labels
        loss = pipe.forward_backward(inputs, y)
        ref_params = dict(ref.named_parameters())
        grad_diff, compared = 0.0, []
        for name, p in pipe.named_parameters().items():
            index, _, local = name.partition(".")
            hf_name = layers[int(index)].hf_names[local][0]
            grad_diff = max(grad_diff, (ref_params[hf_name].grad - p.grad).abs().max().item())
            compared.append(hf_name)
        out[hf_case_key(case)] = {
            "loss": loss,
            "loss_diff": abs(loss - ref_loss.item()),
            "grad_diff": grad_diff,
            "compared": sorted(set(compared)),
            "all_params": sorted(ref_params),
            "reads": reads,
            "expected_reads": sorted(expected),
            "grad_norm": sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()) ** 0.5,
        }
        pipe.close()
    for family, tied, target in saves:
        out[f"save/{family}/{tied}"] = hf_train_and_save(dirs[f"{family}/{tied}"], target, 2, 0.5)
    return out


def hf_train_and_save(source: str, out: str, steps: int, lr: float) -> list[float]:
    """Read this rank's layers from ``source``, train ``steps`` SGD steps in a pipeline, and save
    HF format to ``out``: each rank its own shard, the first rank also config and index."""

    lm = layerwise.from_hf(source, attn_implementation="eager")
    layers = lm.layers()
    for layer in layers:
        layer.eval()
    pipe = layerwise.Pipeline(
        lm, microbatches=MICROBATCHES, loss_fn=layerwise.causal_lm_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
    )  # fmt: skip
    losses = []
    for step in range(steps):
        inputs, labels = batch("right", ROWS, SEQ, seed=100 + step)
        losses.append(pipe.step(inputs, layerwise.causal_lm_targets(labels)))
    layerwise.save_hf(lm, out, pipeline=pipe)
    pipe.close()
    return losses


def hf_tensor_parallel(cases: list[list[Any]], out_dir: str) -> dict[str, Any]:
    """For each (family, sequence_parallel): one step of a from_hf model on a tp=2 mesh (one
    pipeline stage) next to HF's own; loss and largest gradient difference (full tensors). Then
    both tp ranks save (gathering the shards), the first one writing, to ``out_dir/<family>``."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for family, sp in cases:
        ref = tiny(family, tied=False)
        lm = layerwise.from_hf(copy.deepcopy(ref))
        pipe = layerwise.Pipeline(lm, stages=1, tp=2, sequence_parallel=sp, microbatches=2,
                                  loss_fn=layerwise.causal_lm_loss)  # fmt: skip
        inputs, labels = batch("left", 4, SEQ, seed=8)  # SEQ divides by tp, as sequence parallelism needs
        loss = pipe.forward_backward(inputs, layerwise.causal_lm_targets(labels))
        ref_loss = reference(ref, inputs, labels)
        ref_params, layers, worst, sharded = dict(ref.named_parameters()), lm.layers(), 0.0, 0
        for name, p in pipe.named_parameters().items():
            index, _, local = name.partition(".")
            grad = p.grad
            if hasattr(grad, "full_tensor"):
                grad, sharded = grad.full_tensor(), sharded + 1
            worst = max(worst, (grad - ref_params[layers[int(index)].hf_names[local][0]].grad).abs().max().item())
        out[f"{family}/{'sp' if sp else 'tp'}"] = {"loss_diff": abs(loss - ref_loss.item()), "grad_diff": worst, "sharded": sharded}
        layerwise.save_hf(lm, os.path.join(out_dir, family), pipeline=pipe, write=int(os.environ["RANK"]) == 0)
        pipe.close()
    return out
