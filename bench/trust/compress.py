"""Compression of activations between stages (``--compress``) on the demo model, against none.

Per mode: ``bytes_ratio`` (bytes per step of the forward and backward messages, the ones that
carry activations and their gradients, over the same with ``none``; whole messages, headers
included), ``total_bytes_ratio`` (every message of a step, with the commit's gradients, which
are not compressed), ``loss_change`` (relative change of the final loss after a fixed number of
steps against ``none``, plus the mean over the last 5 steps), and the median step time with
every peer behind 100 Mbit/s and 50 ms of one-way latency (emulated in the peers).
``int8-noef`` and ``int4-noef`` are without error feedback, for comparison. Peers are real processes on
127.0.0.1; the demo model is ``--model tiny`` (width 64, 4 blocks, seq 32, batch 8 in 4
microbatches), 4 peers, so 4 stages.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from layerwise.swarm.compress import Compression
from layerwise.swarm.local import LocalPeers
from layerwise.swarm.spec import SwarmSpec
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


def _train(peers: LocalPeers, cfg: Compression, steps: int) -> Trainer:
    opts = TrainerOptions(swarm=peers.swarm, join=(peers.endpoint,), min_peers=PEERS, wait_s=180, compress=cfg)
    with Trainer(SPEC, opts) as tr:
        tr.train(steps)
    return tr


def run(quick: bool) -> dict[str, Any]:
    steps, slow_steps = (4, 2) if quick else (40, 4)
    port = 17600 + os.getpid() % 300
    modes: dict[str, dict[str, Any]] = {}
    with _swarm("fast", port, []) as peers:
        for name, cfg in MODES.items():
            tr = _train(peers, cfg, steps)
            act = sum(tr.node.bytes_by_kind.get(k, 0) for k in ("forward", "backward"))
            modes[name] = {"act_bytes_per_step": act / steps,
                           "total_bytes_per_step": (tr.node.bytes_sent + tr.node.bytes_received) / steps,
                           "final_loss": tr.losses[-1], "last5_loss": statistics.mean(tr.losses[-5:]),
                           "stages": len(tr.assignment.stages)}  # fmt: skip
    with _swarm("slow", port + 1, ["--latency-ms", "50", "--bandwidth-mbit", "100"]) as peers:
        for name, cfg in MODES.items():
            tr = _train(peers, cfg, slow_steps)
            modes[name]["step_s_100mbit_50ms"] = statistics.median(t for _, _, t in tr.step_times[1:])
    base = modes["none"]
    out: dict[str, Any] = {"steps": steps, "model": "tiny (width 64, 4 blocks, seq 32, batch 8, 4 microbatches)",
                           "peers": PEERS, "lowrank_rank": MODES["lowrank"].rank}  # fmt: skip
    for name, m in modes.items():
        m["bytes_ratio"] = m["act_bytes_per_step"] / base["act_bytes_per_step"]
        m["total_bytes_ratio"] = m["total_bytes_per_step"] / base["total_bytes_per_step"]
        m["loss_change"] = (m["final_loss"] - base["final_loss"]) / base["final_loss"]
        m["loss_change_last5"] = (m["last5_loss"] - base["last5_loss"]) / base["last5_loss"]
        m["step_time_ratio"] = m["step_s_100mbit_50ms"] / base["step_s_100mbit_50ms"]
        for key in ("bytes_ratio", "loss_change", "step_s_100mbit_50ms"):  # flat, for the printed table
            out[f"{name}.{key}"] = round(m[key], 5)
    out["modes"] = modes
    return out
