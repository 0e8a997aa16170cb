"""Compression of activations between stages (``--compress``) on the demo model: bytes and step time.

Per mode, from real swarm runs (4 peer processes on 127.0.0.1, 4 stages, the demo model
``--model tiny``: width 64, 4 blocks, seq 32, batch 8 in 4 microbatches, seed 0):
``bytes_ratio`` (bytes per step of the forward and backward messages, the ones that carry
activations and their gradients, over the same with ``none``: whole messages as they go on the
wire, routing header, JSON meta and tensor headers included; the requests carry the token ids
and targets too, which are never compressed), ``fewer`` (its inverse), ``total_bytes_ratio``
(every message of a step, with the commit's gradients, which are not compressed),
``matches_one_process_codec`` (the swarm's final parameters equal
:func:`compressed_reference`'s bit for bit), and the median step time with every peer behind
100 Mbit/s and 50 ms of one-way latency (emulated in the peers). Bytes per step do not depend on
the link (the same messages cross it), so they are counted on the fast links.

The loss change of each mode is measured by the ``compress_loss`` section (many seeds, one process).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch

from layerwise.swarm.compress import Compression
from layerwise.swarm.local import LocalPeers
from layerwise.swarm.lossy_reference import compressed_reference
from layerwise.swarm.reference import max_diff
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.trainer import Trainer, TrainerOptions

SPEC = SwarmSpec(width=64, heads=4, blocks=4, seq=32, batch_size=8, microbatches=4)
MODES = {
    "none": Compression(),
    "bf16": Compression(mode="bf16"),
    "int8": Compression(mode="int8"),
    "int6": Compression(mode="int6"),
    "int6-noef": Compression(mode="int6", error_feedback=False),
    "int4": Compression(mode="int4"),
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


def run(quick: bool) -> dict[str, Any]:
    steps, slow_steps = (2, 2) if quick else (8, 4)
    port = 17600 + os.getpid() % 300
    modes: dict[str, dict[str, Any]] = {}
    with _swarm("fast", port, []) as peers:
        for name, cfg in MODES.items():
            tr, final = _train(peers, cfg, steps)
            act = sum(tr.node.bytes_by_kind.get(k, 0) for k in ("forward", "backward"))
            counts = tr.assignment.counts()
            params, _ = compressed_reference(SPEC, steps, cfg, counts)
            modes[name] = {"act_bytes_per_step": act / steps,
                           "total_bytes_per_step": (tr.node.bytes_sent + tr.node.bytes_received) / steps,
                           "counts": counts, "matches_one_process_codec": max_diff(final, params) == 0.0}  # fmt: skip
    with _swarm("slow", port + 1, ["--latency-ms", "50", "--bandwidth-mbit", "100"]) as peers:
        for name, cfg in MODES.items():
            tr, _ = _train(peers, cfg, slow_steps)
            modes[name]["step_s_100mbit_50ms"] = statistics.median(t for _, _, t in tr.step_times[1:])
    base = modes["none"]
    out: dict[str, Any] = {"steps": steps, "peers": PEERS, "lowrank_rank": MODES["lowrank"].rank,
                           "model": "tiny (width 64, 4 blocks, seq 32, batch 8, 4 microbatches)"}  # fmt: skip
    for name, m in modes.items():
        m["bytes_ratio"] = m["act_bytes_per_step"] / base["act_bytes_per_step"]
        m["fewer"] = base["act_bytes_per_step"] / m["act_bytes_per_step"]
        m["total_bytes_ratio"] = m["total_bytes_per_step"] / base["total_bytes_per_step"]
        m["step_time_ratio"] = m["step_s_100mbit_50ms"] / base["step_s_100mbit_50ms"]
        for key in ("bytes_ratio", "fewer", "step_s_100mbit_50ms"):  # the printed table
            out[f"{name}.{key}"] = round(m[key], 4)
        out[f"{name}.matches_one_process_codec"] = m["matches_one_process_codec"]
    out["modes"] = modes
    return out
