"""What compression (``--compress``) does to the loss: many seeds, paired against ``none``.

The demo model (``--model tiny``) trained for ``steps`` steps with each codec, in one process with
the swarm's codecs and its split of the layers ([2, 1, 1, 2], :func:`compressed_reference`, equal
to a swarm run bit for bit, which the ``compress`` section checks); the loss does not depend on the
link's speed, only on what the codecs do. Per seed ``s`` (model initialisation, data order and the
low-rank projection), the *held-out loss* of a run is the mean loss on 16 batches no step trained
on, of the models after each of the last 50 steps in steps of 10 (``tail``: 5 models, which
averages over where a run is inside a loss spike) and of the final model alone (``final``).

``loss_change`` is the mean over seeds of ``(mode - none) / none`` for the same seed (paired), with
its standard deviation ``loss_change_sd`` and standard error ``loss_change_se``
(``sd / sqrt(seeds)``). Two references for what "no change" looks like: ``rounding``, the same
training with 2 microbatches of 4 instead of 4 of 2 (the same math, other floating-point rounding:
a perturbation that changes nothing but the trajectory), and ``seed_spread``, the relative standard
deviation of ``none``'s held-out loss over seeds.
"""

from __future__ import annotations

import dataclasses
import statistics
from multiprocessing import get_context
from typing import Any

from layerwise.swarm.compress import Compression
from layerwise.swarm.lossy_reference import compressed_reference

from .compress import SPEC

COUNTS = [2, 1, 1, 2]
MODES = {
    "none": Compression(),
    "rounding": Compression(),  # with 2 microbatches instead of 4
    "bf16": Compression(mode="bf16"),
    "int8": Compression(mode="int8"),
    "int6": Compression(mode="int6"),
    "int6-noef": Compression(mode="int6", error_feedback=False),
    "int4": Compression(mode="int4"),
    "int4-noef": Compression(mode="int4", error_feedback=False),
    "lowrank": Compression(mode="lowrank", rank=8),
}


def _one(job: tuple[str, int, int]) -> tuple[str, int, float, float]:
    name, seed, steps = job
    spec = dataclasses.replace(SPEC, seed=seed, microbatches=2 if name == "rounding" else SPEC.microbatches)
    cfg = dataclasses.replace(MODES[name], seed=seed)
    tail: list[float] = []

    def after(step: int, params: list[Any]) -> None:
        if step >= steps - 50 and (step + 1) % 10 == 0:
            tail.append(held_out_loss(spec, params))

    params, _ = compressed_reference(spec, steps, cfg, COUNTS, after)
    return name, seed, statistics.mean(tail), held_out_loss(spec, params)


def held_out_loss(spec: Any, params: list[Any], batches: int = 16) -> float:
    """Mean loss of the model with ``params`` on batches far past any training step."""
    import torch

    from layerwise.models import lm_loss
    from layerwise.swarm.spec import build_layers, load_corpus, step_batch

    layers = build_layers(spec)
    corpus = load_corpus(spec)
    with torch.no_grad():
        for p, q in zip((p for m in layers for p in m.parameters()), params, strict=True):
            p.copy_(q)
        total = 0.0
        for k in range(batches):
            x, y = step_batch(spec, corpus, 1_000_000 + k)
            for m in layers:
                x = m(x)
            total += float(lm_loss(x, y))
    return total / batches


def run(quick: bool) -> dict[str, Any]:
    steps, seeds = (60, 2) if quick else (200, 14)
    jobs = [(name, seed, steps) for seed in range(seeds) for name in MODES]
    got: dict[str, dict[str, dict[int, float]]] = {"tail": {}, "final": {}}
    with get_context("spawn").Pool(2) as pool:  # one thread each (as the peers run): both cores busy
        for name, seed, tail, final in pool.imap_unordered(_one, jobs):
            got["tail"].setdefault(name, {})[seed] = tail
            got["final"].setdefault(name, {})[seed] = final
    out: dict[str, Any] = {"steps": steps, "seeds": seeds, "counts": COUNTS, "measure": "tail",
                           "model": "tiny (width 64, 4 blocks, seq 32, batch 8, 4 microbatches)"}  # fmt: skip
    for which, table in got.items():
        base = [table["none"][s] for s in range(seeds)]
        out[f"{which}.seed_spread"] = round(statistics.stdev(base) / statistics.mean(base), 5)
        for name in MODES:
            vals = [table[name][s] for s in range(seeds)]
            ch = [(a - b) / b for a, b in zip(vals, base)]
            sd = statistics.stdev(ch)
            row = {"held_out_loss": vals, "loss_change_per_seed": ch, "loss_change": statistics.mean(ch),
                   "loss_change_sd": sd, "loss_change_se": sd / seeds**0.5,
                   "loss_change_median": statistics.median(ch)}  # fmt: skip
            out.setdefault(which + "_modes", {})[name] = row
            if which == "tail":
                for key in ("loss_change", "loss_change_se"):
                    out[f"{name}.{key}"] = round(row[key], 5)
    return out
