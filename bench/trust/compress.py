"""Compression of activations between stages (``--compress``) on the demo model, against none.

Per mode, from real swarm runs (4 peer processes on 127.0.0.1, 4 stages, the demo model
``--model tiny``: width 64, 4 blocks, seq 32, batch 8 in 4 microbatches, seed 0):
``bytes_ratio`` (bytes per step of the forward and backward messages, the ones that carry
activations and their gradients, over the same with ``none``; whole messages, headers included),
``total_bytes_ratio`` (every message of a step, with the commit's gradients, which are not
compressed), ``train_loss_change`` (relative change of the swarm's last training loss after
``steps`` steps), ``matches_one_process_codec`` (the swarm's final parameters equal
:func:`compressed_reference`'s bit for bit), and the median step time with every peer behind
100 Mbit/s and 50 ms of one-way latency (emulated in the peers).

``loss_change``: the relative change of the *held-out* loss (16 batches the run never saw) of the
final model after ``steps`` steps, against ``none``, averaged over ``seeds`` seeds; computed with
:func:`compressed_reference` (equal to the swarm bit for bit, as checked above for seed 0),
because a last training batch's loss is noisy: this small model at lr 3e-3 has loss spikes, and
where a run meets one decides several percent of its final loss. ``noise`` is the same change for
full-batch one-process training, which differs from ``none`` only by rounding.
``int8-noef`` and ``int4-noef`` are without error feedback, for comparison.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

import torch

from layerwise.models import lm_loss
from layerwise.swarm.compress import Compression
from layerwise.swarm.local import LocalPeers
from layerwise.swarm.lossy_reference import compressed_reference
from layerwise.swarm.reference import max_diff, reference
from layerwise.swarm.spec import SwarmSpec, build_layers, load_corpus, step_batch
from layerwise.swarm.trainer import Trainer, TrainerOptions

SPEC = SwarmSpec(width=64, heads=4, blocks=4, seq=32, batch_size=8, microbatches=4)
MODES = {
    "none": Compression(),
    "bf16": Compression(mode="bf16"),
    "int8": Compression(mode="int8"),
    "int8-noef": Compression(mode="int8", error_feedback=False),
    "int4": Compression(mode="int4"),
    "int4-noef": Compression(mode="int4", error_feedback=False),
    "lowrank": Compression(mode="lowrank", rank=8),
}
PEERS = 4


def _swarm(tag: str, port: int, extra: list[str]) -> LocalPeers:
    peers = LocalPeers(f"bench-compress-{os.getpid()}-{tag}", f"tcp/127.0.0.1:{port}")
    peers.start_seed()
    for i in range(PEERS):
        peers.start(f"p{i}", extra)
    return peers


def _train(peers: LocalPeers, cfg: Compression, steps: int) -> tuple[Trainer, list[torch.Tensor]]:
    opts = TrainerOptions(swarm=peers.swarm, join=(peers.endpoint,), min_peers=PEERS, wait_s=180, compress=cfg)
    with Trainer(SPEC, opts) as tr:
        tr.train(steps)
        return tr, tr.final_params()


def held_out_loss(spec: SwarmSpec, params: list[torch.Tensor], batches: int = 16) -> float:
    """Mean loss of the model with ``params`` on batches far past any training step."""
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
    steps, slow_steps, seeds = (4, 2, 1) if quick else (40, 4, 3)
    port = 17600 + os.getpid() % 300
    modes: dict[str, dict[str, Any]] = {}
    counts: list[int] = []
    held: dict[str, list[float]] = {}
    with _swarm("fast", port, []) as peers:
        for name, cfg in MODES.items():
            tr, final = _train(peers, cfg, steps)
            act = sum(tr.node.bytes_by_kind.get(k, 0) for k in ("forward", "backward"))
            counts = tr.assignment.counts()
            params, _ = compressed_reference(SPEC, steps, cfg, counts)
            held[name] = [held_out_loss(SPEC, params)]  # seed 0
            modes[name] = {"act_bytes_per_step": act / steps,
                           "total_bytes_per_step": (tr.node.bytes_sent + tr.node.bytes_received) / steps,
                           "final_loss": tr.losses[-1], "counts": counts,
                           "matches_one_process_codec": max_diff(final, params) == 0.0}  # fmt: skip
    with _swarm("slow", port + 1, ["--latency-ms", "50", "--bandwidth-mbit", "100"]) as peers:
        for name, cfg in MODES.items():
            tr, _ = _train(peers, cfg, slow_steps)
            modes[name]["step_s_100mbit_50ms"] = statistics.median(t for _, _, t in tr.step_times[1:])
    # held-out loss over seeds, in one process with the swarm's codecs and split (equal to the swarm)
    held["noise"] = []
    for seed in range(seeds):
        spec = dataclasses.replace(SPEC, seed=seed)
        for name, cfg in MODES.items() if seed else ():
            cfg_seed = dataclasses.replace(cfg, seed=seed)
            params, _ = compressed_reference(spec, steps, cfg_seed, modes[name]["counts"])
            held[name].append(held_out_loss(spec, params))
        full, _ = reference(spec, steps, microbatched=False)
        held["noise"].append(held_out_loss(spec, full))
    base = modes["none"]
    out: dict[str, Any] = {"steps": steps, "seeds": seeds, "peers": PEERS, "lowrank_rank": MODES["lowrank"].rank,
                           "model": "tiny (width 64, 4 blocks, seq 32, batch 8, 4 microbatches)",
                           "noise": statistics.mean((a - b) / b for a, b in zip(held["noise"], held["none"]))}  # fmt: skip
    for name, m in modes.items():
        m["bytes_ratio"] = m["act_bytes_per_step"] / base["act_bytes_per_step"]
        m["total_bytes_ratio"] = m["total_bytes_per_step"] / base["total_bytes_per_step"]
        m["train_loss_change"] = (m["final_loss"] - base["final_loss"]) / base["final_loss"]
        changes = [(a - b) / b for a, b in zip(held[name], held["none"])]
        m["loss_change"] = statistics.mean(changes)
        m["loss_change_per_seed"] = changes
        m["held_out_loss"] = held[name]
        m["step_time_ratio"] = m["step_s_100mbit_50ms"] / base["step_s_100mbit_50ms"]
        for key in ("bytes_ratio", "loss_change", "train_loss_change", "step_s_100mbit_50ms"):  # the printed table
            out[f"{name}.{key}"] = round(m[key], 5)
        out[f"{name}.matches_one_process_codec"] = m["matches_one_process_codec"]
    out["modes"] = modes
    return out
